"""Load a Stable Diffusion base and tell its family; the only module that knows diffusers' loaders.

A base is named by one string, as on the command line:
    "embedded"              the tiny model shipped in samples/embedded (the default)
    "embedded-sdxl"         its SDXL-family sibling in samples/embedded-sdxl (two text encoders, added conditioning)
    a folder                a diffusers pipeline folder (model_index.json inside)
    a .safetensors file     a single-file checkpoint in the original (LDM) layout
    owner/name              a hub id, when the machine is online or the hub cache holds it
Families: "sd1" (CLIP ViT-L text encoder), "sd2" (OpenCLIP ViT-H, GELU), "sdxl" (two text encoders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SdloraError

EMBEDDED = "embedded"
EMBEDDED_SDXL = "embedded-sdxl"
FAMILIES = ("sd1", "sd2", "sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Base:
    """A loaded base pipeline and what we know of it; quantize it, inject adapters, mix them."""

    pipe: object  # StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # one of FAMILIES
    source: str  # the name the user gave
    kind: str  # "embedded" | "folder" | "single_file" | "hub"
    quant: str | None = None
    adapter_info: dict = field(default_factory=dict)  # name -> config, targets, source file
    _mixer: object = field(default=None, repr=False)

    @property
    def native_size(self) -> int:
        """The picture side the UNet was trained at: latent side x VAE factor (64 for embedded)."""
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def models(self) -> dict:
        """The adaptable models by role: unet, text_encoder and (SDXL) text_encoder_2."""
        roles = ("unet", "text_encoder", "text_encoder_2")
        return {r: getattr(self.pipe, r) for r in roles if getattr(self.pipe, r, None) is not None}

    @property
    def mixer(self):
        """The one Mixer of this base: its lock keeps fused calls from overlapping other calls."""
        from .mixing import Mixer

        if self._mixer is None:
            self._mixer = Mixer(self.models())
        return self._mixer

    def quantize(self, mode: str, *, convs: bool = True, compute_dtype: torch.dtype = torch.float32) -> dict:
        """Quantize the UNet (linear layers, and with convs=True its convolutions in NF4) and the
        text encoders (linear layers) in place; the VAE stays float. Returns a QuantReport per role."""
        from .quant import quantize_model

        device = self.pipe.unet.device
        reports = {role: quantize_model(model, mode, convs=convs and role == "unet", compute_dtype=compute_dtype,
                                        device=device)
                   for role, model in self.models().items()}
        self._batch_invariant()  # quantizing replaced layers
        self.quant = mode
        return reports

    def _batch_invariant(self) -> None:
        """A picture's bits must not depend on its batch (sdlora/batch_invariance.py): (batch, channels) layers
        run row by row, convolutions through its conv2d, and the VAE encodes and decodes one picture at a time
        (diffusers' slicing)."""
        from .batch_invariance import make_batch_invariant

        for model in self.models().values():
            make_batch_invariant(model)
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()

    def add_adapter(self, name: str, config, *, targets: str = "attn", text_encoder: bool | tuple = False,
                    rank_of=None) -> int:
        """Wrap the preset's UNet layers (and the text encoders': all with text_encoder=True, or those of a
        tuple of roles) and build adapter `name` on them; VeRA goes on linear layers only. `rank_of(region)`
        (regions: sdlora.inject.region_of) gives a layer's rank, 0 for none: block-wise ranks; default
        config.rank everywhere. Returns the number of layers."""
        from .adapter_io import check_name
        from .adapters import method_class
        from .inject import add_adapter, region_of, text_encoder_targets, unet_targets, wrap

        check_name(name)
        total = 0
        shared: dict = {}  # VeRA's projections, one pair per shape across the whole pipeline
        generator = torch.Generator().manual_seed(config.seed)  # one stream over every role, in order
        for role, model in self.models().items():
            if role != "unet" and not (text_encoder is True or role in (text_encoder or ())):
                continue
            names = unet_targets(model, targets) if role == "unet" else text_encoder_targets(model)
            ranks = {n: rank_of(region_of(role, n)) for n in names} if rank_of else {}
            names = [n for n in names if ranks.get(n, config.rank) > 0]  # rank 0: that block gets no adapter
            layers = wrap(model, names, role)
            if not method_class(config.method).convs:  # VeRA
                layers = {n: layer for n, layer in layers.items() if not layer.geometry.is_conv}
            if layers:
                total += add_adapter(layers, name, config, generator=generator, shared=shared, ranks=ranks)
        if not total:
            raise SdloraError(f"adapter '{name}' would sit on no layer", "give some block a rank and lr above 0")
        self.adapter_info[name] = {"config": dataclasses.asdict(config), "targets": targets,
                                   "text_encoder": bool(text_encoder)}
        return total

    def load_adapter(self, path: str | Path, name: str | None = None, *, replace: bool = False):
        """Load an adapter file of any supported layout as `name` (sdlora.adapter_io.load_adapter); with
        replace=True a checked new file takes the place of what is loaded under that name."""
        from .adapter_io import load_adapter

        return load_adapter(self, path, name, replace=replace)

    def pipeline_with(self, **replace):
        """A new pipeline object over this base's components with some replaced (a scheduler, fresh models);
        the other components are shared, not copied. Pipelines are cheap; schedulers hold per-call state."""
        import inspect

        components = dict(self.pipe.components)
        components.update(replace)
        # The pipeline's own settings go along: SDXL's force_zeros_for_empty_prompt defaults to True, and a base
        # that learned its unconditional model from empty captions (the embedded SDXL base) must keep False, or
        # guidance pushes away from zeros it never saw and every picture comes out noise.
        accepted = inspect.signature(type(self.pipe).__init__).parameters
        settings = {k: v for k, v in self.pipe.config.items() if k in accepted and k not in components
                    and not k.startswith("_")}
        components.update(settings)
        if "safety_checker" in components:
            components["requires_safety_checker"] = False
        return type(self.pipe)(**components)

    def save(self, folder: str | Path, **replace) -> None:
        """Save the pipeline (with `replace`d components) as a diffusers folder, weights in safetensors."""
        self.pipeline_with(**replace).save_pretrained(folder, safe_serialization=True)

    def remove_adapter(self, name: str) -> int:
        """Take adapter `name` off every layer of every model and out of `adapter_info`, together, so the
        name can be loaded again (a changed file, a retrained adapter). Returns the number of layers."""
        from .inject import adapter_layers, remove_adapter

        if name not in self.adapter_info:
            raise SdloraError(f"no adapter named '{name}' is loaded",
                              f"loaded: {', '.join(self.adapter_info) or 'none'}")
        count = sum(remove_adapter(adapter_layers(model), name) for model in self.models().values())
        del self.adapter_info[name]
        return count


def embedded_path(name: str = EMBEDDED) -> Path:
    """An embedded base's folder: for "embedded" $SDLORA_EMBEDDED, else samples/embedded beside the package;
    for "embedded-sdxl" samples/embedded-sdxl."""
    env = os.environ.get("SDLORA_EMBEDDED") if name == EMBEDDED else None
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "samples" / name
    if not (path / "model_index.json").is_file():
        rebuild = "make embedded" if name == EMBEDDED else "make embedded-sdxl"
        raise SdloraError(
            f"the {name} base is missing at {path}",
            "install sdlora from its source tree (pip install -e .), set SDLORA_EMBEDDED to the folder, "
            f"or rebuild it with: {rebuild}",
        )
    return path


def family_from_configs(model_index: dict, unet_config: dict, text_encoder_config: dict | None) -> str:
    """Family of a diffusers folder from its configs (no weights read)."""
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2 swapped OpenAI CLIP (quick_gelu) for OpenCLIP ViT-H (gelu, 1024 wide).
    if (text_encoder_config or {}).get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def family_from_checkpoint_keys(keys, path: str = "checkpoint") -> str:
    """Family of an original-layout (LDM) single-file checkpoint from its tensor names."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SdloraError(
        f"{path} is not a Stable Diffusion checkpoint: no text-encoder keys (cond_stage_model.* or "
        f"conditioner.embedders.*) among its {len(keys)} tensors",
        "pass a full SD1/SD2/SDXL checkpoint, or a diffusers folder",
    )


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SdloraError(f"cannot read {path}: {err}", "check the base folder is a complete diffusers pipeline") from err


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[object, str]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise SdloraError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json)",
            "point --base at the folder that holds model_index.json, unet/ and vae/",
        )
    index = _read_json(index_file)
    te_config = path / "text_encoder" / "config.json"
    family = family_from_configs(
        index, _read_json(path / "unet" / "config.json"), _read_json(te_config) if te_config.is_file() else None
    )
    cls = pipeline_class(family)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    try:
        pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise SdloraError(f"cannot load the diffusers folder {path}: {err}", "check that every component is complete") from err
    return pipe, family


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> tuple[object, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise SdloraError(f"{path} is not a readable .safetensors file ({err})", "re-download or re-export it") from err
    family = family_from_checkpoint_keys(keys, str(path))
    cls = pipeline_class(family)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    try:
        pipe = cls.from_single_file(
            str(path), config=config, dtype=dtype, local_files_only=config is not None, **kwargs
        )
    except Exception as err:  # diffusers raises OSError, ValueError or hub errors depending on what is missing
        raise SdloraError(
            f"cannot load the {family} checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            "a single file holds weights only; pass --base-config DIR, a diffusers folder of the same "
            "architecture, so its configs and tokenizer are read locally",
        ) from err
    return pipe, family


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[object, str]:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
    except Exception as err:  # offline: huggingface_hub raises connection or cache-miss errors
        raise SdloraError(
            f"'{repo_id}' is not a local path, and it could not be fetched as a hub model id "
            f"({type(err).__name__})",
            f"on a machine with network run `hf download {repo_id} --local-dir DIR`, copy DIR here and pass --base DIR",
        ) from err
    unet_config = dict(pipe.unet.config)
    te = getattr(pipe, "text_encoder", None)
    family = family_from_configs(
        {"text_encoder_2": 1} if getattr(pipe, "text_encoder_2", None) is not None else {},
        unet_config,
        dict(te.config.to_dict()) if te is not None else None,
    )
    return pipe, family


def load_base(base: str = EMBEDDED, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              config: str | None = None) -> Base:
    """Load the base named by `base` (see the module docstring) in `dtype` on `device`.

    `config` is a diffusers folder whose configs and tokenizer describe a single-file checkpoint's
    architecture; without it diffusers looks them up on the hub.
    """
    if base in (EMBEDDED, EMBEDDED_SDXL):
        pipe, family = _load_folder(embedded_path(base), dtype)
        kind = "embedded"
    else:
        path = Path(base).expanduser()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise SdloraError(
                f"{base} is a pickle checkpoint ({path.suffix}); sdlora never unpickles files, since loading a "
                "pickle can run arbitrary code",
                "convert it to .safetensors with a tool you trust, or use the model's diffusers folder",
            )
        if path.is_dir():
            pipe, family = _load_folder(path, dtype)
            kind = "folder"
        elif path.is_file():
            if path.suffix.lower() != ".safetensors":
                raise SdloraError(f"{base} is neither a diffusers folder nor a .safetensors checkpoint",
                                  "pass a diffusers folder, a .safetensors file, a hub id or 'embedded'")
            pipe, family = _load_single_file(path, dtype, config)
            kind = "single_file"
        elif _HUB_ID.match(base) and not base.startswith((".", "~")):
            pipe, family = _load_hub(base, dtype)
            kind = "hub"
        else:
            raise SdloraError(
                f"no base at '{base}': no such folder or file, and not a hub id (owner/name)",
                "pass 'embedded', a diffusers folder, a .safetensors checkpoint or a hub id",
            )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)  # the base is frozen: only adapters ever train
    loaded = Base(pipe=pipe, family=family, source=base, kind=kind)
    loaded._batch_invariant()
    return loaded


def make_scheduler(name: str, base_config):
    """A new sampler `name` (sdlora.schedulers.SCHEDULERS) from the base's scheduler config, so the training
    schedule (betas, prediction type) always comes from the model; fresh per call (schedulers hold state)."""
    import diffusers

    from .schedulers import SCHEDULERS

    if name not in SCHEDULERS:
        raise SdloraError(f"unknown scheduler '{name}'", f"choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    if base_config.get("rescale_betas_zero_snr"):
        if not carries_zero_terminal_snr(cls):  # it would sample the rescaled base on the old betas, silently
            able = [n for n, (c, _) in SCHEDULERS.items() if carries_zero_terminal_snr(getattr(diffusers, c))]
            raise SdloraError(f"scheduler '{name}' cannot sample a zero-terminal-SNR base", f"choose one of: {', '.join(able)}")
        # A zero-terminal-SNR base must start sampling at the last timestep, where the picture is pure
        # noise: "trailing" spacing (Lin et al. 2024, "Common Diffusion Noise Schedules ... Are Flawed").
        extra = {**extra, "timestep_spacing": "trailing"}
    return cls.from_config(base_config, **extra)


def retrained_scheduler(base: Base, prediction_type: str, zero_terminal_snr: bool):
    """The base's sampler with another prediction type and/or zero terminal SNR (trailing spacing), for a
    baked folder that must sample what its adapters were trained for. A sampler class that cannot carry
    zero terminal SNR (SD1.5's PNDM) becomes Euler, which can."""
    import diffusers

    cls = type(base.pipe.scheduler)
    if zero_terminal_snr and not carries_zero_terminal_snr(cls):
        cls = diffusers.EulerDiscreteScheduler
    extra = {"rescale_betas_zero_snr": zero_terminal_snr} if carries_zero_terminal_snr(cls) else {}
    if zero_terminal_snr:
        extra["timestep_spacing"] = "trailing"
    return cls.from_config(base.pipe.scheduler.config, prediction_type=prediction_type, **extra)


def carries_zero_terminal_snr(scheduler_class) -> bool:
    """Whether a diffusers scheduler class takes rescale_betas_zero_snr (Euler, DDIM, DPM++, UniPC do;
    PNDM, LMS and Heun do not, and from_config would drop the setting without a word)."""
    import inspect

    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


def training_scheduler(base: Base, prediction_type: str | None = None, zero_terminal_snr: bool = False):
    """The noise schedule training adds noise with: DDPM over the base's own betas and prediction type,
    or another prediction type, or its betas rescaled to zero terminal SNR (diffusers'
    rescale_zero_terminal_snr, the DDPM config's rescale_betas_zero_snr)."""
    from diffusers import DDPMScheduler

    overrides = {}
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    if zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(base.pipe.scheduler.config, **overrides)

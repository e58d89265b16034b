"""kohya layout, read by A1111, ComfyUI and Forge: one flat module name per adapted layer.

    lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha / .dora_scale
    lora_te_<text_model path>      (SD1/SD2)     lora_te1_ / lora_te2_ (SDXL's two encoders)

SD1/SD2 UNet names are diffusers paths with "." -> "_"; SDXL UNet names follow the original
(SGM) layout: input_blocks / middle_block / output_blocks. Underscores make names ambiguous, so
both directions go through a table built from the base's real modules.
"""

from __future__ import annotations

import json

import torch

from ..errors import SdloraError
from .adapter import AdapterFile, ModuleWeights, public_training, scalar
from .ldm_checkpoint import unet_to_ldm

_TE_NAMES = {"sd1": {"text_encoder": "lora_te"}, "sd2": {"text_encoder": "lora_te"},
             "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}
_LYCORIS = ("hada_", "lokr_")


def is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def family_of(keys, metadata: dict) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    # Not lora_te1_ alone: diffusers' convert_state_dict_to_kohya names SD1's only encoder so too.
    sgm = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
    if version.startswith("sdxl") or any(k.startswith(("lora_te2_", *sgm)) for k in keys):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    return "sd1" if version.startswith("sd_v1") else None


def name_table(module_paths: dict[str, list[str]], family: str, unet_config: dict, unet_weight_keys: list[str]) -> dict[str, str]:
    """Canonical "role/path" -> kohya module name for every given module of the base.
    module_paths: role -> paths of adaptable modules; unet_weight_keys: every UNet state-dict
    key (the SGM mapping needs the whole layout to number blocks)."""
    table: dict[str, str] = {}
    ldm = {}
    if family == "sdxl":
        ldm = {v: k for k, v in unet_to_ldm({k: k for k in unet_weight_keys}, unet_config).items()}
    for role, paths in module_paths.items():
        for path in paths:
            if role == "unet":
                name = ldm[path + ".weight"].removesuffix(".weight") if family == "sdxl" else path
                table[f"unet/{path}"] = "lora_unet_" + name.replace(".", "_")
            elif role in _TE_NAMES.get(family, {}):
                full = path if path.startswith("text_model.") else "text_model." + path
                table[f"{role}/{path}"] = _TE_NAMES[family][role] + "_" + full.replace(".", "_")
    return table


def inverse_table(table: dict[str, str], family: str) -> dict[str, str]:
    """kohya name -> canonical key; on SD1/SD2 also under lora_te1_, the name diffusers'
    convert_state_dict_to_kohya gives the single text encoder."""
    inverse = {v: k for k, v in table.items()}
    for name, key in list(inverse.items()):
        if not name.startswith("lora_te"):
            continue
        prefix, _, rest = name.partition("_text_model_")
        # transformers 5 dropped "text_model." from CLIP's module names, and converters running on
        # it (diffusers' convert_state_dict_to_kohya) write names without it: read both forms.
        aliases = [f"{prefix}_{rest}"]
        if family != "sdxl" and prefix == "lora_te":
            aliases += [f"lora_te1_text_model_{rest}", f"lora_te1_{rest}"]
        inverse.update({a: key for a in aliases})
    return inverse


def to_state_dict(af: AdapterFile, table: dict[str, str], family: str | None, title: str = "") -> tuple[dict, dict]:
    refuse_unportable(af, "kohya")
    tensors: dict[str, torch.Tensor] = {}
    for key, m in af.modules.items():
        if key not in table:
            raise SdloraError(f"module '{key}' has no kohya name on a {family} base", "export for the base it was trained on")
        name = table[key]
        if m.down is None:  # LoHa / LoKr: LyCORIS's parts, and the alpha its reader divides by its rank
            tensors.update({f"{name}.{part}": t for part, t in m.parts.items()})
            tensors[f"{name}.alpha"] = torch.tensor(float(_lycoris_alpha(m)))
            continue
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = m.down, m.up
        tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha))
        if m.magnitude is not None:
            # On the output axis, first, as ComfyUI tells the axis by shape[0]: (out, 1) or (out, 1, 1, 1).
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(-1, *([1] * (m.down.dim() - 1)))
    first = next(iter(af.modules.values()))
    dora = any(m.magnitude is not None for m in af.modules.values())
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": f"{first.alpha:g}",
        "ss_network_args": json.dumps({"algo": "lora", "dora_wd": True} if dora else {}),
        **_lycoris_network(af),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "sdlora",
        "modelspec.title": title,
        "modelspec.trigger_phrase": ", ".join(af.trigger_words),
    }
    if family in BASE_VERSION:  # a file resized without a base and with no stated family says nothing false
        metadata["ss_base_model_version"], metadata["modelspec.architecture"] = BASE_VERSION[family], ARCHITECTURE[family]
    if af.training:
        metadata["sdlora_training"] = json.dumps(public_training(af.training), sort_keys=True)
    if af.training.get("prediction_type") == "v_prediction":  # what kohya's and the model spec's readers look for
        metadata["ss_v_parameterization"] = "True"
        metadata["modelspec.prediction_type"] = "v"
    if af.training.get("zero_terminal_snr"):
        metadata["ss_zero_terminal_snr"] = "True"
    from .a1111_meta import a1111_metadata

    metadata.update(a1111_metadata(tensors, metadata, af.training or {}))  # last: the hashes cover the ss_* keys
    return tensors, metadata


def _lycoris_alpha(m: ModuleWeights) -> float:
    """The alpha LyCORIS's readers turn back into this module's scale: scale * its rank (1 * anything when both
    LoKr factors are whole, where readers ignore alpha; LyCORIS itself stores the rank then)."""
    from ..adapters.factored import lokr_rank

    rank = m.parts["hada_w1_b"].shape[0] if m.method == "loha" else lokr_rank(m.parts)
    return m.scale * rank if rank is not None else float(max(1, min(m.parts["lokr_w2"].shape[:2])))


def _lycoris_network(af: AdapterFile) -> dict:
    """kohya metadata as LyCORIS's kohya network writes it, for a file of LoHa or LoKr modules."""
    methods = {m.method for m in af.modules.values() if m.down is None}
    if not methods:
        return {}
    algo = "lokr" if "lokr" in methods else "loha"
    args = {"algo": algo, **{k: af.config[k] for k in ("factor", "decompose_both", "full_matrix")
                             if algo == "lokr" and k in af.config}}
    rank, alpha = af.config.get("rank"), af.config.get("alpha")
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
            **({"ss_network_dim": str(rank)} if rank else {}),
            **({"ss_network_alpha": f"{float(alpha if alpha is not None else rank):g}"} if rank else {})}


def refuse_dense(af: AdapterFile) -> None:
    dense = af.dense_modules()
    if dense:
        raise SdloraError(f"{len(dense)} module(s) are LoHa/LoKr deltas ({dense[0]}), which only generation reads",
                          "turn the adapter into a LoRA first: sdlora resize FILE --rank R --out LORA.safetensors")


def refuse_unportable(af: AdapterFile, layout: str) -> None:
    """kohya and diffusers files hold a module as its pair (DoRA: plus its magnitude): refuse a method whose
    class says its pair is not its whole update."""
    from ..adapters.registry import method_class

    refuse_dense(af)
    lycoris = [k for k, m in af.modules.items() if getattr(method_class(m.method, k), "lycoris", False)]
    if lycoris and layout != "kohya":
        raise SdloraError(f"{af.modules[lycoris[0]].method} module(s) ({lycoris[0]}) have no {layout} (PEFT LoRA) form",
                          "export with --format kohya (LyCORIS's layout, which A1111 and ComfyUI read) or sdlora")
    bad = [k for k, m in af.modules.items() if not method_class(m.method, k).portable]
    if bad:
        raise SdloraError(f"{af.modules[bad[0]].method} module(s) ({bad[0]}) have no {layout} form",
                          "export in the sdlora format, or resize the adapter to a LoRA first")


# The convolutions of SD1/SD2/SDXL UNets by the last part of their kohya names (diffusers and SGM forms):
# LoHa and LoKr files fold a kernel into their factors' columns, so without a base only the name tells a
# 3x3 convolution's (out, in*9) delta from a linear layer's. Everything else (attention, feed-forward,
# proj_in/out, time embeddings) is kept as a matrix, which A1111 and ComfyUI reshape to the layer's weight.
_CONV_3X3 = ("conv1", "conv2", "conv", "conv_in", "conv_out", "in_layers_2", "out_layers_3", "op",
             "input_blocks_0_0", "out_2")
_CONV_1X1 = ("conv_shortcut", "skip_connection")


def conv_kernel_of(name: str) -> tuple[int, int] | None:
    if not name.startswith("lora_unet_"):
        return None
    if name.endswith(tuple("_" + n for n in _CONV_1X1)):
        return (1, 1)
    return (3, 3) if name.endswith(tuple("_" + n for n in _CONV_3X3)) else None


def from_state_dict(tensors: dict, metadata: dict, inverse_table: dict[str, str], path: str,
                    weight_shapes: dict[str, tuple] | None = None) -> AdapterFile:
    """inverse_table: kohya module name -> canonical "role/path" of the base it is loaded into;
    weight_shapes: canonical key -> the layer's weight shape (LoHa/LoKr deltas take it).
    Modules the base does not have are listed in extra_metadata['unknown_keys']."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        lyco = part.removesuffix(".weight") if part.startswith(_LYCORIS) else None
        if (part not in _PARTS and lyco is None) or name not in inverse_table:
            unknown.append(key)
        else:
            parts.setdefault(name, {})[lyco or _PARTS[part]] = t
    modules = {}
    for name, p in parts.items():
        if any(k.startswith(_LYCORIS) for k in p):
            from .lycoris import lycoris_module

            method, scale, lyco, flat = lycoris_module(p, name, path)
            key = inverse_table[name]
            shape = (weight_shapes or {}).get(key)
            dense = flat.reshape(shape) if shape is not None and flat.numel() == torch.Size(shape).numel() else flat
            if shape is None and flat.dim() == 2:  # read without a base: the name tells a convolution's kernel
                kernel = conv_kernel_of(name)
                if kernel and flat.shape[1] % (kernel[0] * kernel[1]) == 0:
                    dense = flat.reshape(flat.shape[0], -1, *kernel)
            modules[key] = ModuleWeights(method, None, None, scale, lyco, dense=dense)
            continue
        if "down" not in p or "up" not in p:
            raise SdloraError(f"{path}: module '{name}' lacks lora_down or lora_up", "re-export the adapter")
        rank = p["down"].shape[0]
        # kohya's default: no alpha key means alpha = dim
        alpha = scalar(p["alpha"], f"{path}: '{name}.alpha'") if "alpha" in p else float(rank)
        mag = p.get("dora_scale")
        if mag is not None and mag.shape[0] != p["up"].shape[0]:
            raise SdloraError(f"{path}: '{name}.dora_scale' has shape {tuple(mag.shape)}, a norm over the input axis",
                              "only output-axis DoRA scales (PEFT, ComfyUI) are supported")
        modules[inverse_table[name]] = ModuleWeights("dora" if mag is not None else "lora", p["down"], p["up"],
                                                     alpha / rank, {} if mag is None else {"magnitude": mag.reshape(-1)})
    methods = {m.method for m in modules.values()}
    method = next(iter(methods)) if len(methods) == 1 else "+".join(sorted(methods))
    trigger = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    af = AdapterFile(modules, method, family_of(tensors, metadata), "kohya", trigger_words=trigger)
    af.extra_metadata = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
    if unknown:
        af.extra_metadata["unknown_keys"] = unknown
    try:  # our own kohya exports carry the training summary: keep it through resize, merge and export
        training = json.loads(metadata.get("sdlora_training", "{}"))
        af.training = training if isinstance(training, dict) else {}
    except json.JSONDecodeError:
        pass  # metadata is shown, never trusted: a broken summary is simply not read
    return af

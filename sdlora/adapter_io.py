"""Adapter files <-> a loaded base: save an adapter in any layout, load any supported file.

Loading validates everything against the base before the model is touched (format, family,
module names, shapes), then wraps the named modules and fills the adapters; if anything still
fails, what was added is removed again, so the pipeline is exactly as it was.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import method_class
from .adapters.layer import AdapterLayer, geometry_of
from .choices import FILE_FORMATS
from .errors import SdloraError
from .formats import comfyui_dora as comfy, kohya, native, peft
from .formats.adapter import AdapterFile, ModuleWeights, validate
from .formats.io import read_safetensors, write_safetensors
from .inject import adapter_layers, every_layer, wrap


def _modules_of(base) -> dict[str, list[str]]:
    """Every module a file may adapt, by role: every Linear and Conv2d of the UNet and the text encoders,
    as A1111 and ComfyUI apply any of them (not only the layers of our own target presets)."""
    return {role: every_layer(model) for role, model in base.models().items()}


def _unet_weight_keys(unet) -> list[str]:
    """UNet state-dict keys with adapter wrappers seen through, as the plain model names them."""
    return [k.replace(".base_layer.", ".") for k in unet.state_dict() if ".adapters." not in k]


def kohya_table(base, modules: dict[str, list[str]] | None = None) -> dict[str, str]:
    return kohya.name_table(modules or _modules_of(base), base.family, dict(base.pipe.unet.config),
                            _unet_weight_keys(base.pipe.unet))


def adapter_from_base(base, name: str, trigger_words=(), training: dict | None = None) -> AdapterFile:
    """The canonical form of adapter `name` as it is now in the base."""
    modules: dict[str, ModuleWeights] = {}
    method = None
    for role, model in base.models().items():
        for path, layer in adapter_layers(model).items():
            if name not in layer.adapters:
                continue
            a = layer.adapters[name]
            method = a.method
            modules[f"{role}/{path}"] = a.to_weights()
    if not modules:
        raise SdloraError(f"no adapter named '{name}' in the base", f"loaded: {', '.join(base.adapter_info) or 'none'}")
    info = base.adapter_info.get(name, {})
    config = {**info.get("config", {}), "targets": info.get("targets"), "text_encoder": info.get("text_encoder")}
    return AdapterFile(modules, method, base.family, "sdlora", config, list(trigger_words), dict(training or {}))


def save_adapter(base, name: str, path: str | Path, format: str = "sdlora", trigger_words=(),
                 training: dict | None = None) -> Path:
    """Write adapter `name` to `path` in `format`. VeRA goes to kohya and diffusers as the exactly
    equivalent plain LoRA of rank r (scale 1), so it loads anywhere."""
    af = adapter_from_base(base, name, trigger_words, training)
    return write_adapter_file(af, path, format, base)


def _base_weight(base, key: str) -> torch.Tensor:
    """W0 of module "role/path" as a float tensor (dequantized on a quantized base)."""
    from .quant import dequantized_weight

    role, _, mpath = key.partition("/")
    module = base.models()[role].get_submodule(mpath)
    return module.base_weight() if isinstance(module, AdapterLayer) else dequantized_weight(module)


def write_adapter_file(af: AdapterFile, path: str | Path, format: str, base=None, comfyui_dora: bool = False) -> Path:
    """comfyui_dora: kohya only; DoRA magnitudes pre-divided so today's ComfyUI applies the paper's W'
    (formats/comfyui_dora.py), marked in the metadata."""
    validate(af, str(path))  # nothing broken is written: a bad input or an overflowing merge stops here
    if comfyui_dora:
        if format != "kohya" or base is None:
            raise SdloraError("--comfyui-dora writes a kohya file and needs the base", "pass --format kohya --base MODEL")
        af = comfy.for_comfyui(af, lambda key: _base_weight(base, key))
        tensors, metadata = kohya.to_state_dict(af, kohya_table(base), base.family, title=Path(path).stem)
        metadata[comfy.METADATA_KEY] = comfy.METADATA_VALUE
        return write_safetensors(path, tensors, metadata)
    if format == "sdlora":
        tensors, metadata = native.to_state_dict(af)
    elif format == "kohya":
        if base is not None:
            tensors, metadata = kohya.to_state_dict(af, kohya_table(base), base.family, title=Path(path).stem)
        else:  # a file read without a base keeps its kohya names ("unet/lora_unet_..."): they pass through
            named = {k: k.split("/", 1)[1] for k in af.modules if k.split("/", 1)[1].startswith("lora_")}
            if len(named) != len(af.modules):
                raise SdloraError("kohya names depend on the base's layout", "pass --base with the model the adapter is for")
            tensors, metadata = kohya.to_state_dict(af, named, af.base_family, title=Path(path).stem)
    elif format == "diffusers":
        tensors, metadata = peft.to_state_dict(af)
    else:
        raise SdloraError(f"unknown adapter format '{format}'", f"choose one of: {', '.join(FILE_FORMATS)}")
    return write_safetensors(path, tensors, metadata)


def detect_format(tensors: dict, metadata: dict, path: str) -> str:
    if native.is_native(metadata):
        return "sdlora"
    if kohya.is_kohya(tensors):
        return "kohya"
    if peft.is_peft(tensors):
        return "diffusers"
    sample = ", ".join(list(tensors)[:3]) or "no tensors at all"
    raise SdloraError(f"{path} holds no adapter keys sdlora knows (first keys: {sample})",
                      "pass a LoRA/DoRA/VeRA file in sdlora, kohya (lora_unet_...) or diffusers (unet....lora_A) layout")


def read_adapter_file(path: str | Path, base=None) -> AdapterFile:
    """Read and parse any supported file, every module validated (formats.adapter.validate). Kohya names are
    resolved against `base` (without a base, modules keep their kohya names: enough to inspect, resize or merge
    a file in its own layout)."""
    af = _parse_adapter_file(str(path), base)
    validate(af, str(path), allow_empty=True)
    return af


def _parse_adapter_file(path: str, base) -> AdapterFile:
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, metadata, path)
    if fmt == "sdlora":
        return native.from_state_dict(tensors, metadata, path)
    if fmt == "diffusers":
        return peft.from_state_dict(tensors, metadata, path)
    shapes = None
    if base is not None:
        modules = _modules_of(base)  # walked once: the name table and the shapes both need it
        inverse = kohya.inverse_table(kohya_table(base, modules), base.family)
        shapes = _weight_shapes(base, modules)
    else:
        prefixes = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
        inverse = {}
        for key in tensors:
            name = key.split(".")[0]
            role = next((r for p, r in prefixes.items() if name.startswith(p)), None)
            if role and re.fullmatch(r"[A-Za-z0-9_]+", name):  # a module name, never a path ("lora_unet_../x")
                inverse[name] = f"{role}/{name}"
    af = kohya.from_state_dict(tensors, metadata, inverse, path, shapes)
    if comfy.METADATA_KEY in metadata:  # magnitudes written for ComfyUI's formula: back to the paper's
        if base is None:
            af.extra_metadata[comfy.METADATA_KEY] = metadata[comfy.METADATA_KEY]
        else:
            af = comfy.from_comfyui(af, lambda key: _base_weight(base, key))
    return af


def _weight_shapes(base, modules: dict[str, list[str]]) -> dict[str, tuple]:
    shapes = {}
    for role, paths in modules.items():
        model = base.models()[role]
        for p in paths:
            m = model.get_submodule(p)
            shapes[f"{role}/{p}"] = (m.geometry if isinstance(m, AdapterLayer) else geometry_of(m)).weight_shape
    return shapes


@dataclass
class Loaded:
    name: str
    file: AdapterFile
    layers: int
    warnings: list[str] = field(default_factory=list)


def _check_against_base(af: AdapterFile, base, path: str) -> list[tuple[str, str, ModuleWeights]]:
    """(role, module path, weights) for every module, or one clear error; touches nothing."""
    if af.base_family and af.base_family != base.family:
        raise SdloraError(f"{path} is an adapter for {af.base_family}, but the base is {base.family}",
                          f"use it with an {af.base_family} base, or pick an adapter made for {base.family}")
    models = base.models()
    plan = []
    for key, m in af.modules.items():
        role, _, mpath = key.partition("/")
        if role not in models:
            raise SdloraError(f"{path}: module '{key}' is for {role}, which this {base.family} base lacks",
                              "is the adapter for another family of base?")
        try:
            module = models[role].get_submodule(mpath)
            geom = module.geometry if isinstance(module, AdapterLayer) else geometry_of(module)
        except (AttributeError, SdloraError):
            continue  # no such module, or not a layer an adapter can sit on: reported as unknown below
        if m.dense is not None:
            if tuple(m.dense.shape) != geom.weight_shape:
                raise SdloraError(f"{path}: module '{key}' makes a {tuple(m.dense.shape)} delta, but the base's layer "
                                  f"is {geom.weight_shape} (the file's shapes are for: {base_size(af)})",
                                  f"the adapter was made for another base than this {base.family} one")
            plan.append((role, mpath, m))
            continue
        want_down = (m.rank, geom.in_features, *(geom.kernel_size or ()))
        want_up = (geom.out_features, m.rank, *((1, 1) if geom.is_conv else ()))
        if tuple(m.down.shape) != want_down or tuple(m.up.shape) != want_up:
            hint = f" (the file's shapes are for: {base_size(af)})"
            raise SdloraError(
                f"{path}: module '{key}' has down {tuple(m.down.shape)} / up {tuple(m.up.shape)}, but the base's layer "
                f"needs {want_down} / {want_up}{hint}",
                f"the adapter was made for another base than this {base.family} one; load it with that base")
        plan.append((role, mpath, m))
    if not plan:
        names = list(af.modules) + list(af.extra_metadata.get("unknown_keys", []))
        sample = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise SdloraError(f"{path}: none of its keys names a layer of this {base.family} base ({sample})",
                          "is the adapter for another base?")
    return plan


def load_adapter(base, path: str | Path, name: str | None = None, *, replace: bool = False) -> Loaded:
    """Load any supported adapter file into the base under `name` (default: the file's stem). With
    replace=True an adapter already loaded under that name is taken off first (a changed file, a
    retrained adapter), but only once the new file has passed every check: a bad file leaves it loaded."""
    path = str(path)
    name = name or re.sub(r"[^\w-]", "_", Path(path).stem)
    check_name(name)
    if name in base.adapter_info and not replace:
        raise SdloraError(f"an adapter named '{name}' is already loaded", "pass another name")
    af = read_adapter_file(path, base)
    plan = _check_against_base(af, base, path)
    if name in base.adapter_info:
        base.remove_adapter(name)
    unknown = list(af.extra_metadata.get("unknown_keys", []))
    planned = {f"{role}/{mpath}" for role, mpath, _ in plan}
    unknown += [k for k in af.modules if k not in planned]
    notes = []
    if unknown:
        notes.append(f"{path}: {len(unknown)} key(s) match nothing in the base and were ignored: "
                     f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
        warnings.warn(notes[-1], stacklevel=2)
    models = base.models()
    added: list = []  # layers given the adapter, to undo on failure
    newly_wrapped: list = []
    shared: dict = {}
    wrapped_before = {role: set(adapter_layers(model)) for role, model in models.items()}
    try:
        for role, mpath, m in plan:
            model = models[role]
            layer = wrap(model, [mpath], role)[mpath]
            if mpath not in wrapped_before[role]:
                newly_wrapped.append((model, mpath))
            layer.add_adapter(name, _build(layer, m, af, shared))
            added.append(layer)
    except BaseException:
        for layer in added:
            layer.remove_adapter(name)
        for model, mpath in newly_wrapped:
            model.set_submodule(mpath, model.get_submodule(mpath).base_layer)
        raise
    base.adapter_info[name] = {"config": af.config, "file": path, "format": af.format, "method": af.method,
                               "training": af.training}
    return Loaded(name, af, len(plan), notes)


def check_name(name: str) -> None:
    """Adapter names key module dicts and metadata: letters, digits, '_' and '-' only."""
    if not re.fullmatch(r"[\w-]{1,100}", name):
        raise SdloraError(f"adapter name {name!r} is not 1 to 100 letters, digits, '_' or '-'", "pass another name")


def _build(layer, m: ModuleWeights, af: AdapterFile, shared: dict):
    device = next(layer.base_layer.parameters()).device
    with torch.no_grad():
        a = method_class(m.method).from_weights(layer, m, config=af.config, shared=shared)
    return a.to(device)


def _widths(af: AdapterFile) -> dict[str, tuple[int, int]]:
    """role -> (narrowest, widest) output width of its adapted layers, from the file's own shapes."""
    out: dict[str, list[int]] = {}
    for key, m in af.modules.items():
        width = (m.dense if m.dense is not None else m.up).shape[0]
        out.setdefault(key.split("/", 1)[0], []).append(int(width))
    return {role: (min(w), max(w)) for role, w in out.items()}


# (family, widest UNet layer, narrowest text-encoder layer = its hidden width) of the bases people use.
_KNOWN_SIZES = {("sd1", 1280, 768): "SD1.x", ("sd2", 1280, 1024): "SD2.x", ("sdxl", 1280, 768): "SDXL",
                ("sd1", 96, 64): "the embedded base"}


def base_size(af: AdapterFile) -> str:
    """What base the file's shapes say it is for, e.g. "sd1, UNet layers up to 1280 wide, text encoder 768
    wide (SD1.x's size)": a family name alone does not tell SD1.5 from the embedded base."""
    widths = _widths(af)
    unet, te = widths.get("unet"), widths.get("text_encoder")
    parts = [af.base_family or "family not stated"]
    if unet:
        parts.append(f"UNet layers up to {unet[1]} wide")
    if te:
        parts.append(f"text encoder {te[0]} wide")
    if "text_encoder_2" in widths:
        parts.append(f"second text encoder {widths['text_encoder_2'][0]} wide")
    # The widest UNet layer is a block width C, or a feed-forward's 4C (GEGLU's projection: 8C) when those are adapted.
    block = next((u for (f, u, _) in _KNOWN_SIZES if unet and f == af.base_family and unet[1] in (u, 4 * u, 8 * u)), None)
    known = next((v for (f, u, t), v in _KNOWN_SIZES.items()
                  if f == af.base_family and u == block and (te is None or te[0] == t)), None)
    return ", ".join(parts) + (f" ({known}'s size)" if known else "")


def check_fits(af: AdapterFile, base, path: str) -> None:
    """For the file tools: every module of the file names a layer of `base` with its shapes, or one error that
    counts what does not fit and says what base the file is for. (Generation ignores unknown names, as A1111
    does; a tool that writes a file must not silently drop or misname them.)"""
    models = base.models()
    missing = sorted({k.split(".")[0] for k in af.extra_metadata.get("unknown_keys", [])})
    misfit = []
    for key, m in af.modules.items():
        role, _, mpath = key.partition("/")
        try:
            module = models[role].get_submodule(mpath)
            geom = module.geometry if isinstance(module, AdapterLayer) else geometry_of(module)
        except (KeyError, AttributeError, SdloraError):
            missing.append(key)
            continue
        have = tuple(m.dense.shape) if m.dense is not None else (m.up.shape[0], *m.down.shape[1:])
        if torch.Size(have).numel() != torch.Size(geom.weight_shape).numel() or have[0] != geom.weight_shape[0]:
            misfit.append(key)
    if missing or misfit:
        total = len(af.modules) + len(set(missing) - set(af.modules))
        sample = ", ".join((misfit + missing)[:2])
        raise SdloraError(f"{path}: {len(missing) + len(misfit)} of {total} modules do not fit this {base.family} base "
                          f"({len(missing)} name no layer of it, {len(misfit)} have other shapes; e.g. {sample}); "
                          f"the file is for: {base_size(af)}",
                          "pass --base with the model the file was made for, or leave --base out "
                          "(resize, merge and inspect keep a file's own layout without one)")


def describe(af: AdapterFile, path: str) -> dict:
    """What `sdlora inspect` shows: format, method, ranks and alphas, targets, family, metadata, size."""
    by_role: dict[str, int] = {}
    for key in af.modules:
        role = key.split("/", 1)[0]
        by_role[role] = by_role.get(role, 0) + 1
    pairs = [m for m in af.modules.values() if m.dense is None]
    ranks = sorted({m.rank for m in pairs})
    alphas = sorted({round(m.alpha, 6) for m in pairs})
    params = sum(m.down.numel() + m.up.numel() for m in pairs) + sum(m.dense.numel() for m in af.modules.values()
                                                                     if m.dense is not None)
    return {
        "file": path, "format": af.format, "method": af.method, "base_family": af.base_family,
        "modules": len(af.modules), "modules_by_role": by_role, "ranks": ranks, "alphas": alphas,
        "parameters": params, "size_bytes": Path(path).stat().st_size, "trigger_words": af.trigger_words,
        "config": af.config, "training": af.training,
        "metadata": {k: v for k, v in af.extra_metadata.items() if k != "unknown_keys"},
        "base_size": base_size(af),
        "per_module": {k: {"method": m.method, "rank": m.rank, "alpha": round(m.alpha, 6)} for k, m in af.modules.items()},
    }

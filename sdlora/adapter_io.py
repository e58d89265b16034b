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
from .formats import kohya, native, peft
from .formats.adapter import AdapterFile, ModuleWeights
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


def write_adapter_file(af: AdapterFile, path: str | Path, format: str, base=None) -> Path:
    if format == "sdlora":
        tensors, metadata = native.to_state_dict(af)
    elif format == "kohya":
        if base is None:
            raise SdloraError("kohya names depend on the base's layout", "pass the base the adapter is for")
        tensors, metadata = kohya.to_state_dict(af, kohya_table(base), base.family, title=Path(path).stem)
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
    """Read and parse any supported file. Kohya names are resolved against `base` (without a base,
    modules keep their kohya names, enough to inspect a file)."""
    path = str(path)
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
            if role:
                inverse[name] = f"{role}/{name}"
    return kohya.from_state_dict(tensors, metadata, inverse, path, shapes)


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
                                  f"is {geom.weight_shape}", f"the adapter was made for another base than this {base.family} one")
            plan.append((role, mpath, m))
            continue
        want_down = (m.rank, geom.in_features, *(geom.kernel_size or ()))
        want_up = (geom.out_features, m.rank, *((1, 1) if geom.is_conv else ()))
        if tuple(m.down.shape) != want_down or tuple(m.up.shape) != want_up:
            hint = f" (the file says it is for {af.base_family})" if af.base_family else ""
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
        "per_module": {k: {"method": m.method, "rank": m.rank, "alpha": round(m.alpha, 6)} for k, m in af.modules.items()},
    }

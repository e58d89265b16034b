"""sdlora's own layout: every tensor under "role/module.path/part", the full config as JSON
metadata. Each module's parts are its method class's (sdlora.adapters.registry): LoRA its pair, DoRA
the pair and magnitude, VeRA only its trained vectors (the frozen projections come back from the seed)."""

from __future__ import annotations

import json

import torch

from ..adapters.registry import method_class
from ..errors import SdloraError
from .adapter import AdapterFile, scalar

FORMAT_VERSION = "1"


def is_native(metadata: dict) -> bool:
    return metadata.get("format") == "sdlora"


def to_state_dict(af: AdapterFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .kohya import refuse_dense

    refuse_dense(af)
    tensors: dict[str, torch.Tensor] = {}
    for key, m in af.modules.items():
        tensors[f"{key}/scale"] = torch.tensor(float(m.scale))
        for part, t in method_class(m.method, key).file_parts(m).items():
            tensors[f"{key}/{part}"] = t
    metadata = {
        "format": "sdlora", "format_version": FORMAT_VERSION, "method": af.method,
        "base_family": af.base_family or "", "config": json.dumps(af.config, sort_keys=True),
        "trigger_words": json.dumps(af.trigger_words), "training": json.dumps(af.training, sort_keys=True),
    }
    return tensors, metadata


def from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict, path: str) -> AdapterFile:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SdloraError(f"{path}: sdlora format version {metadata.get('format_version')!r} is not "
                          f"{FORMAT_VERSION}", "upgrade sdlora to read it")
    try:
        config = json.loads(metadata.get("config", "{}"))
        trigger_words = json.loads(metadata.get("trigger_words", "[]"))
        training = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError as err:
        raise SdloraError(f"{path}: its metadata is not valid JSON ({err})", "re-export the adapter") from err
    method = metadata.get("method", "lora")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, _, part = name.rpartition("/")
        if not key or "/" not in key:
            raise SdloraError(f"{path}: key '{name}' is not role/module/part", "re-export the adapter")
        parts.setdefault(key, {})[part] = t
    cls = method_class(method, path)
    modules = {}
    for key, p in parts.items():
        if "scale" not in p:
            raise SdloraError(f"{path}: module '{key}' lacks its scale", "re-export the adapter")
        scale = scalar(p.pop("scale"), f"{path}: '{key}/scale'")
        modules[key] = cls.from_file_parts(p, scale, config, f"{path}: module '{key}'")
    return AdapterFile(modules, method, metadata.get("base_family") or None, "sdlora", config, trigger_words, training)

"""Bake a mix into the base and write a diffusers folder with no adapters left in it."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from ..errors import SdloraError
from ..inject import adapter_layers, unwrap
from ..quant import is_quantized


def _put_back(model: nn.Module, layers: dict) -> None:
    """Return wrappers to the places `unwrap` took them from."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)


def bake(base, mix, out_dir: str | Path) -> Path:
    """Fuse `mix` into a float base and save the whole pipeline to `out_dir` (written to a
    temporary sibling, then renamed). The base itself is left exactly as it was."""
    quantized = [n for n, layer in base.mixer.layers().items() if is_quantized(layer.base_layer)]
    if quantized:
        raise SdloraError(f"baking into a quantized base is not supported yet ({quantized[0]} is quantized)",
                          "load the base with --quant none; its weights are then exact")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SdloraError(f"{out} exists and is not empty", "pass a new folder to --out")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    with base.mixer.apply(mix, mode="fused"):
        wrappers = {role: adapter_layers(model) for role, model in base.models().items()}
        try:
            for model in base.models().values():
                unwrap(model)  # the plain modules, now holding W0 + sum w_i D_i
            base.pipe.save_pretrained(tmp, safe_serialization=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for role, model in base.models().items():
                _put_back(model, wrappers[role])
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out

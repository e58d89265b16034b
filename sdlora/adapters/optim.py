"""Optimizer parameter groups for one adapter, with LoRA+ (Hayou et al. 2024): B learns
`ratio` times faster than A, since with B zero-initialised and A random the two play
different roles and one learning rate is too slow for B or unstable for A."""

from __future__ import annotations

import math

from ..errors import SdloraError


def param_groups(layers: dict, name: str, lr: float, loraplus_ratio: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """[A-side group at lr, B-side group at lr * ratio] over every layer holding adapter `name`.
    A side: LoRA's down, DoRA's down and magnitude, VeRA's d. B side: up, VeRA's b."""
    if not (math.isfinite(lr) and lr > 0):
        raise SdloraError(f"learning rate must be a positive number, got {lr}", "pass e.g. --lr 1e-4")
    if not (math.isfinite(loraplus_ratio) and loraplus_ratio >= 1):
        raise SdloraError(f"LoRA+ ratio must be at least 1, got {loraplus_ratio}", "pass e.g. --loraplus-ratio 16")
    a_side, b_side = [], []
    for layer in layers.values():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        b_ids = {id(p) for p in adapter.b_side()}
        for p in adapter.parameters():
            if p.requires_grad:
                (b_side if id(p) in b_ids else a_side).append(p)
    if not a_side and not b_side:
        raise SdloraError(f"adapter '{name}' has no trainable parameters here", "add it to the model first")
    return [
        {"params": a_side, "lr": lr, "weight_decay": weight_decay, "name": f"{name}.A"},
        {"params": b_side, "lr": lr * loraplus_ratio, "weight_decay": weight_decay, "name": f"{name}.B"},
    ]

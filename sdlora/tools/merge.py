"""Merge adapters with weights, or resize one: exactly by concatenating ranks, or by SVD to a
target rank (or energy share) with the relative error reported."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SdloraError
from ..formats.adapter import AdapterFile, ModuleWeights
from ..mixing import check_weight
from .lowrank import dense, randomized, truncate


@dataclass
class MergeReport:
    modules: int
    rank: int  # the largest rank kept
    relative_error: float  # ||D - D_r||_F / ||D||_F over all modules together; 0 when exact
    randomized: int = 0  # modules cut by randomized SVD (large, low target rank); their error is measured too

    def __str__(self):
        text = f"{self.modules} modules, rank up to {self.rank}, relative error {self.relative_error:.3g}"
        if self.randomized:
            text += f" ({self.randomized} large modules cut by randomized SVD; the error is measured, not estimated)"
        return text


def _low_rank_only(af: AdapterFile, what: str) -> None:
    dora = [k for k, m in af.modules.items() if m.magnitude is not None]
    if dora:
        raise SdloraError(f"{what} is a DoRA adapter ({dora[0]}): its update depends on the base weights and is "
                          "not a low-rank pair", "bake it into the base instead, or merge LoRA/LoCon/VeRA adapters")


def merge(adapters: list[tuple[AdapterFile, float]], rank: int | None = None, energy: float | None = None,
          family: str | None = None) -> tuple[AdapterFile, MergeReport]:
    """sum_i w_i D_i per module. Without rank/energy: exact, rank = sum of ranks. With one: SVD."""
    if not adapters:
        raise SdloraError("nothing to merge", "pass at least one adapter")
    for i, (af, w) in enumerate(adapters):
        _low_rank_only(af, f"adapter {i + 1}")
        check_weight(w, f"the weight of adapter {i + 1}")
    families = {af.base_family for af, _ in adapters if af.base_family}
    if len(families) > 1:
        raise SdloraError(f"the adapters are for different bases: {', '.join(sorted(families))}",
                          "merge adapters made for one base family")
    keys = sorted({k for af, _ in adapters for k in af.modules})
    modules: dict[str, ModuleWeights] = {}
    err_sq = norm_sq = 0.0
    kept = fast = 0
    for key in keys:
        parts = [(af.modules[key], w) for af, w in adapters if key in af.modules]
        shapes = {tuple(p.dense.shape) if p.dense is not None else (p.up.shape[0], *p.down.shape[1:])
                  for p, _ in parts}
        if len(shapes) > 1:
            raise SdloraError(f"module '{key}' has different shapes in the adapters: {sorted(shapes)}",
                              "merge adapters made for one base")
        first = parts[0][0]
        kernel = tuple((first.dense if first.dense is not None else first.down).shape[2:])
        if any(p.dense is not None for p, _ in parts) and rank is None and energy is None:
            raise SdloraError(f"module '{key}' is a LoHa/LoKr delta, not a low-rank pair", "pass --rank or --energy")
        if rank is None and energy is None:
            down = torch.cat([p.down.float() for p, _ in parts])
            up = torch.cat([(w * p.scale) * p.up.float() for p, w in parts], dim=1)
            modules[key] = ModuleWeights("lora", down, up, 1.0)
            kept = max(kept, down.shape[0])
            continue
        delta = sum(w * (p.dense.reshape(p.dense.shape[0], -1).double() if p.dense is not None
                         else dense(p.down, p.up, p.scale)) for p, w in parts)
        down, up, r, err, total = truncate(delta, kernel, rank, energy)
        fast += randomized(delta.shape, rank)
        modules[key] = ModuleWeights("lora", down, up, 1.0)
        err_sq, norm_sq, kept = err_sq + err, norm_sq + total, max(kept, r)
    rel = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    fam = family or next(iter(families), None)
    trigger = [t for af, _ in adapters for t in af.trigger_words]
    config = {"method": "lora", "merged_from": [af.config.get("name", af.format) for af, _ in adapters]}
    return AdapterFile(modules, "lora", fam, "sdlora", config, list(dict.fromkeys(trigger))), \
        MergeReport(len(modules), kept, rel, fast)


def resize(af: AdapterFile, rank: int | None = None, energy: float | None = None) -> tuple[AdapterFile, MergeReport]:
    """One adapter to a lower rank (or the rank that keeps an energy share), by SVD per module."""
    if rank is None and energy is None:
        raise SdloraError("resize needs a target", "pass --rank R or --energy 0.9")
    out, report = merge([(af, 1.0)], rank, energy)
    out.trigger_words, out.training = af.trigger_words, af.training
    return out, report

"""Adapter methods (registry.py: name -> class, the only dispatch) and the config that builds them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SdloraError
from .base import Adapter, BaseGeometry
from .dora import DoraAdapter
from .layer import AdapterLayer
from .lora import INITS, LoraAdapter
from .registry import METHODS, method_class, trainable_methods
from .vera import VeraAdapter


@dataclass(frozen=True)
class AdapterConfig:
    """How to build one adapter on every targeted layer. LoCon is LoRA on a Conv2d layer."""

    method: str = "lora"
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, a scale of 1
    rslora: bool = False
    dropout: float = 0.0
    init: str = "gaussian"
    seed: int = 0  # initialisation seed; for VeRA also the seed of the shared projections
    vera_d_initial: float = 0.1
    factor: int = -1  # LoKr: split each side as close to factor x rest as divides it; -1: as square as divides
    decompose_both: bool = False  # LoKr: w1 a low-rank pair too (when the rank is under half its larger side)
    full_matrix: bool = False  # LoKr: w2 whole, no low rank (the scale is then 1, alpha unused)

    def __post_init__(self):
        if self.method not in trainable_methods():
            raise SdloraError(f"unknown adapter method '{self.method}' to build",
                              f"choose one of: {', '.join(trainable_methods())}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SdloraError(f"rank must be an integer of at least 1, got {self.rank!r}", "pass --rank 1 or more")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise SdloraError(f"alpha must be a finite number, got {self.alpha}", "pass e.g. --alpha 4")
        if not 0.0 <= self.dropout < 1.0:
            raise SdloraError(f"dropout must be in [0, 1), got {self.dropout}", "pass e.g. 0.1")
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or (self.factor < 1 and self.factor != -1):
            raise SdloraError(f"factor must be -1 (automatic) or a whole number of at least 1, got {self.factor!r}",
                              "pass e.g. --factor 8, or leave it out")
        lokr_only = [k for k in ("decompose_both", "full_matrix") if getattr(self, k)] + (["factor"] if self.factor != -1 else [])
        if lokr_only and self.method != "lokr":
            raise SdloraError(f"{', '.join(lokr_only)} only shape LoKr adapters, not {self.method}",
                              "pass --method lokr, or leave them out")
        if self.init not in INITS:
            raise SdloraError(f"unknown init '{self.init}'", f"choose one of: {', '.join(INITS)}")

    def build(self, layer: AdapterLayer, generator: torch.Generator, shared: dict) -> Adapter:
        return method_class(self.method).create(layer, self, generator, shared)


__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterLayer", "BaseGeometry", "DoraAdapter", "LoraAdapter",
           "VeraAdapter", "method_class", "trainable_methods"]

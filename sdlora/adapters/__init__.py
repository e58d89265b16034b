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

    def __post_init__(self):
        if self.method not in trainable_methods():
            raise SdloraError(f"unknown adapter method '{self.method}' to build",
                              f"choose one of: {', '.join(trainable_methods())} (LoHa/LoKr files load as deltas)")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SdloraError(f"rank must be an integer of at least 1, got {self.rank!r}", "pass --rank 1 or more")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise SdloraError(f"alpha must be a finite number, got {self.alpha}", "pass e.g. --alpha 4")
        if not 0.0 <= self.dropout < 1.0:
            raise SdloraError(f"dropout must be in [0, 1), got {self.dropout}", "pass e.g. 0.1")
        if self.init not in INITS:
            raise SdloraError(f"unknown init '{self.init}'", f"choose one of: {', '.join(INITS)}")

    def build(self, layer: AdapterLayer, generator: torch.Generator, shared: dict) -> Adapter:
        return method_class(self.method).create(layer, self, generator, shared)


__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterLayer", "BaseGeometry", "DoraAdapter", "LoraAdapter",
           "VeraAdapter", "method_class", "trainable_methods"]

"""LoRA (Hu et al. 2021) on Linear layers, and LoCon on Conv2d: D = (alpha / r) * up @ down."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SdloraError
from .base import Adapter, BaseGeometry, check_rank
from .functional import lora_delta, lora_scale

INITS = ("gaussian", "kaiming")


def init_down(weight: torch.Tensor, rank: int, init: str, generator: torch.Generator | None = None) -> None:
    """Gaussian N(0, 1/r) as in PEFT's init_lora_weights='gaussian', or Kaiming-uniform(a=sqrt(5)),
    nn.Linear's own default and PEFT's default. `up` stays zero either way, so D starts at 0."""
    with torch.no_grad():
        if init == "gaussian":
            weight.normal_(0.0, 1.0 / rank, generator=generator)
        elif init == "kaiming":
            fan_in = weight[0].numel()
            bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_ with a = sqrt(5)
            weight.uniform_(-bound, bound, generator=generator)
        else:
            raise SdloraError(f"unknown init '{init}'", f"choose one of: {', '.join(INITS)}")


class LoraAdapter(Adapter):
    """down: (r, in) for Linear, (r, in, kh, kw) for Conv2d with the base's kernel, stride and
    padding; up: (out, r), or (out, r, 1, 1) for Conv2d (LoCon's 1x1 up convolution)."""

    method = "lora"

    def __init__(self, geometry: BaseGeometry, rank: int, alpha: float | None = None, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "gaussian", generator: torch.Generator | None = None):
        check_rank(rank)
        alpha = float(rank if alpha is None else alpha)
        super().__init__(geometry, rank, lora_scale(alpha, rank, rslora), dropout)
        self.alpha = alpha
        self.rslora = rslora
        if geometry.is_conv:
            self.down = nn.Parameter(torch.empty(rank, geometry.in_features, *geometry.kernel_size))
            self.up = nn.Parameter(torch.zeros(geometry.out_features, rank, 1, 1))
        else:
            self.down = nn.Parameter(torch.empty(rank, geometry.in_features))
            self.up = nn.Parameter(torch.zeros(geometry.out_features, rank))
        init_down(self.down, rank, init, generator)

    def pair(self):
        return self.down, self.up

    def b_side(self):
        return [self.up]

    def delta_weight(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        return lora_delta(self.down, self.up, self.scale)

    @classmethod
    def create(cls, layer, cfg, generator, shared):
        return cls(layer.geometry, cfg.rank, cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout, init=cfg.init,
                   generator=generator)

    @classmethod
    def from_weights(cls, layer, m, *, config, shared):
        a = cls(layer.geometry, m.rank, m.alpha)  # alpha = scale * r: the scale as stored, rsLoRA's included
        with torch.no_grad():
            a.down.copy_(m.down), a.up.copy_(m.up)
        return a

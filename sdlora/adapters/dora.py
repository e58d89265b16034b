"""DoRA (Liu et al. 2024): magnitude and direction trained apart.

W' = m * (W0 + dW) / ||W0 + dW||_c with dW a LoRA update and m (out,) initialised to ||W0||_c,
so a fresh adapter gives W' = W0 exactly. The delta a mix scales is D = W' - W0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SdloraError
from .base import BaseGeometry
from .functional import dora_delta, dora_output_delta, lora_delta, weight_norm_per_output
from .lora import LoraAdapter


class DoraAdapter(LoraAdapter):
    method = "dora"
    low_rank = False  # W' is not W0 plus a low-rank term: the layer asks for output_delta

    def __init__(self, geometry: BaseGeometry, rank: int, alpha: float | None = None, *, w0: torch.Tensor,
                 rslora: bool = False, dropout: float = 0.0, init: str = "gaussian",
                 generator: torch.Generator | None = None):
        super().__init__(geometry, rank, alpha, rslora=rslora, dropout=dropout, init=init, generator=generator)
        self.magnitude = nn.Parameter(weight_norm_per_output(w0.detach().float()).clone())  # (out,)

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        return dora_delta(w0.float(), lora_delta(self.down, self.up, self.scale), self.magnitude)

    def output_delta(self, x: torch.Tensor, base_out_nobias: torch.Tensor, w0_fn) -> torch.Tensor:
        lora_out = LoraAdapter.output_delta(self, x, base_out_nobias, w0_fn)
        merged = w0_fn().float() + lora_delta(self.down, self.up, self.scale)
        factor = self.magnitude / weight_norm_per_output(merged).detach()  # (out,)
        channel_dim = 1 if self.geometry.is_conv else -1
        return dora_output_delta(base_out_nobias, lora_out, factor.to(x.dtype), channel_dim)

    @classmethod
    def create(cls, layer, cfg, generator, shared):
        return cls(layer.geometry, cfg.rank, cfg.alpha, w0=layer.base_weight(), rslora=cfg.rslora,
                   dropout=cfg.dropout, init=cfg.init, generator=generator)

    def stored_parts(self):
        return {"magnitude": self.magnitude}

    @classmethod
    def from_weights(cls, layer, m, *, config, shared):
        if m.magnitude is None:
            raise SdloraError(f"a DoRA module needs its magnitude vector ({m.up.shape[0]},)", "re-export the adapter")
        a = cls(layer.geometry, m.rank, m.alpha, w0=layer.base_weight())
        with torch.no_grad():
            a.down.copy_(m.down), a.up.copy_(m.up), a.magnitude.copy_(m.magnitude)
        return a

"""A dense weight delta: how imported LyCORIS LoHa and LoKr adapters run (their updates are
Hadamard and Kronecker products, not low-rank pairs). D is stored whole, W0's shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_invariance import conv2d
from ..errors import SdloraError
from ..formats.adapter import ModuleWeights
from .base import Adapter, BaseGeometry


class DeltaAdapter(Adapter):
    """Registered as "loha" and "lokr" too: the names a file module of those kinds carries."""

    method = "delta"
    low_rank = False
    trainable = False
    portable = False

    def __init__(self, geometry: BaseGeometry, delta: torch.Tensor):
        if tuple(delta.shape) != geometry.weight_shape:
            raise SdloraError(f"a delta of {tuple(delta.shape)} does not fit a layer of {geometry.weight_shape}",
                              "the adapter was made for another base")
        super().__init__(geometry, rank=min(geometry.out_features, geometry.in_features), scale=1.0)
        self.delta = nn.Parameter(delta.detach().clone().float(), requires_grad=False)

    def pair(self):
        raise SdloraError("a dense delta (LoHa, LoKr, full) has no low-rank pair", "resize it to LoRA first (sdlora resize)")

    def b_side(self):
        return []

    def delta_weight(self, w0=None) -> torch.Tensor:
        return self.delta

    def output_delta(self, x: torch.Tensor, base_out_nobias: torch.Tensor, w0_fn) -> torch.Tensor:
        d = self.delta.to(x.dtype)
        if self.geometry.is_conv:
            return conv2d(x, d, **self.geometry.conv_args)
        return F.linear(x, d)

    def to_weights(self) -> ModuleWeights:
        return ModuleWeights(self.method, None, None, 1.0, dense=self.delta.detach().float().cpu())

    @classmethod
    def from_weights(cls, layer, m, *, config, shared):
        return cls(layer.geometry, m.dense)

    @classmethod
    def file_parts(cls, m):
        raise SdloraError("a LoHa/LoKr delta is only read, never written", "sdlora resize FILE --rank R turns it into a LoRA")

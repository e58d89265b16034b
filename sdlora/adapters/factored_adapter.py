"""What LoHa and LoKr adapters share: their trained tensors are LyCORIS's own parts (hada_w1_a, lokr_w2_b, ...,
kept under those names in an nn.ParameterDict), their delta D is a product of them that is not a low-rank pair,
so the layer asks for output_delta (and per-sample mixes scale D x per row, as for DoRA), and every file keeps
those parts: sdlora files under role/path/<part>, kohya files in the LyCORIS layout that A1111 and ComfyUI read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_invariance import conv2d
from ..errors import SdloraError
from ..formats.adapter import ModuleWeights
from .base import Adapter, BaseGeometry


class FactoredAdapter(Adapter):
    low_rank = False  # D is a Hadamard or Kronecker product: the layer asks for output_delta
    portable = True  # kohya files hold the LyCORIS parts; diffusers (PEFT) files refuse them
    lycoris = True  # sdlora.formats.kohya writes its parts under their LyCORIS names
    required: tuple[str, ...] = ()  # parts every module of the method has
    zero_init: tuple[str, ...] = ()  # the parts that start at zero, so D starts at 0: LoRA+'s "B" side

    def __init__(self, geometry: BaseGeometry, rank: int, scale: float, shapes: dict[str, tuple[int, ...]],
                 dropout: float = 0.0):
        super().__init__(geometry, rank, scale, dropout)
        self.factors = nn.ParameterDict({k: nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})

    @staticmethod
    def product(parts: dict, scale: float, weight_shape: tuple[int, ...] | None) -> torch.Tensor:
        """D from the parts (the method's formula in sdlora.adapters.factored)."""
        raise NotImplementedError

    def pair(self):
        raise SdloraError(f"a {self.method} adapter has no low-rank pair", "resize it to LoRA first (sdlora resize)")

    def b_side(self):
        return [p for k, p in self.factors.items() if k in self.zero_init]

    def delta_weight(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """D (out, in[, kh, kw]), fp32."""
        return self.product({k: p.float() for k, p in self.factors.items()}, self.scale, self.geometry.weight_shape)

    def output_delta(self, x: torch.Tensor, base_out_nobias: torch.Tensor, w0_fn) -> torch.Tensor:
        """D x with the base layer's own op: D is at most W0's size, which the base layer already holds."""
        d = self.delta_weight().to(x.dtype)
        x = self.dropout(x)
        if self.geometry.is_conv:
            return conv2d(x, d, **self.geometry.conv_args)
        return F.linear(x, d)

    def to_weights(self) -> ModuleWeights:
        parts = {k: p.detach().float().cpu() for k, p in self.factors.items()}
        return ModuleWeights(self.method, None, None, self.scale, parts, dense=self.delta_weight().detach().float().cpu())

    @classmethod
    def rank_of(cls, parts: dict) -> int:
        raise NotImplementedError

    @classmethod
    def from_weights(cls, layer, m: ModuleWeights, *, config, shared):
        parts = {k: v for k, v in m.parts.items() if k.startswith(("hada_", "lokr_"))}
        a = cls(layer.geometry, cls.rank_of(parts), m.scale, {k: tuple(v.shape) for k, v in parts.items()})
        want = tuple(a.product({k: v.double() for k, v in parts.items()}, 1.0, None).reshape(-1).shape)
        if want != (torch.Size(layer.geometry.weight_shape).numel(),):
            raise SdloraError(f"a {m.method} module's parts make a delta of {want[0]} numbers for a layer of "
                              f"{layer.geometry.weight_shape}", "the adapter was made for another base")
        with torch.no_grad():
            for k, v in parts.items():
                a.factors[k].copy_(v)
        return a

    @classmethod
    def file_parts(cls, m: ModuleWeights) -> dict[str, torch.Tensor]:
        """The LyCORIS parts, plus a convolution's kernel (kh, kw): LoHa, and LoKr's low-rank w2, fold it into
        their columns, and the delta the file's reader rebuilds must have the layer's 4-D shape."""
        out = dict(m.parts)
        if m.dense is not None and m.dense.dim() == 4:
            out["kernel"] = torch.tensor([float(s) for s in m.dense.shape[2:]])
        return out

    @classmethod
    def from_file_parts(cls, parts: dict[str, torch.Tensor], scale: float, config: dict, where: str) -> ModuleWeights:
        parts = dict(parts)
        kernel = parts.pop("kernel", None)
        missing = [k for k in cls.required if k not in parts]
        if missing:
            raise SdloraError(f"{where} lacks {missing}", "re-export the adapter")
        dense = cls.product({k: v.double() for k, v in parts.items()}, scale, None)
        if kernel is not None:
            kh, kw = (int(v) for v in kernel.tolist())
            dense = dense.reshape(dense.shape[0], -1, kh, kw)
        return ModuleWeights(cls.method, None, None, scale, {k: v.float() for k, v in parts.items()}, dense=dense.float())

"""The wrapper: a base layer as a child module plus named adapters; no patched forward.

forward(x) = base(x) + sum over active adapters of w_i * D_i x, where the weights w_i come from
the active mix (adapters/context.py). Low-rank adapters (LoRA, LoCon, VeRA) run together as one
concatenated-rank pair of matmuls, with each rank column scaled by its adapter's weight; the
weights may be per sample, so one batch carries several mixes. DoRA runs on its own path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batch_invariance import RowwiseMixin, by_rows
from ..errors import SdloraError
from ..quant import dequantized_weight
from .base import Adapter, BaseGeometry
from .context import current_mix
from .functional import apply_down, apply_up, scale_rank_columns


def geometry_of(layer: nn.Module) -> BaseGeometry:
    """Shape facts of a Linear-like or Conv2d-like base layer (float or quantized)."""
    if hasattr(layer, "kernel_size"):
        if getattr(layer, "groups", 1) != 1 or getattr(layer, "padding_mode", "zeros") != "zeros":
            raise SdloraError(f"{type(layer).__name__} with groups or non-zero padding cannot be adapted",
                              "leave this layer out of the targets")
        return BaseGeometry(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
                            layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                            tuple(layer.dilation))
    if hasattr(layer, "in_features"):
        return BaseGeometry(layer.in_features, layer.out_features)
    raise SdloraError(f"cannot adapt a {type(layer).__name__}: neither Linear-like nor Conv2d-like",
                      "target linear and convolution layers only")


def _per_sample(weight, batch: int, ndim: int):
    """A float, or (batch,) -> shape broadcasting over an output of `ndim` dims (batch first)."""
    if not torch.is_tensor(weight):
        return weight
    return weight.reshape(batch, *([1] * (ndim - 1)))


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, region: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.region = region  # e.g. "unet.down.1", "unet.mid", "text_encoder": where per-block weights apply
        self.geometry = geometry_of(base_layer)

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise SdloraError(f"adapter '{name}' is already on this layer", "remove it first or choose another name")
        if adapter.geometry != self.geometry:
            raise SdloraError(f"adapter '{name}' was built for {adapter.geometry}, this layer is {self.geometry}",
                              "the adapter was made for another base")
        self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    def base_weight(self) -> torch.Tensor:
        """W0 as a float tensor (dequantized for NF4/int8 bases): (out, in[, kh, kw])."""
        return dequantized_weight(self.base_layer)

    def _base_bias(self, out: torch.Tensor) -> torch.Tensor | float:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return 0.0
        return bias.to(out.dtype).reshape(-1, 1, 1) if self.geometry.is_conv else bias.to(out.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mix = current_mix()
        if mix is not None and getattr(mix, "grouped", False) and len(self.adapters) and not (args or kwargs):
            return self._grouped_forward(x, mix)
        if (x.dim() == 2 and x.shape[0] > 1 and isinstance(self.base_layer, RowwiseMixin) and mix is not None
                and not mix.fused and len(self.adapters) and not getattr(mix, "per_sample", False)):
            # (batch, channels) inputs (time_emb_proj) row by row, as sdlora/batch_invariance.py explains:
            # a row's bits then do not depend on the batch
            return by_rows(lambda row: self.forward(row, *args, **kwargs), x)
        out = self.base_layer(x, *args, **kwargs)
        if mix is None or mix.fused or len(self.adapters) == 0:
            return out
        weights = {n: w for n, w in mix.layer_weights(self, x.shape[0]).items() if n in self.adapters}
        if not weights:
            return out
        return out + self.delta_output(x, out, weights)

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float base layer's forward with another weight of its shape: what it computes fused."""
        base = self.base_layer
        if self.geometry.is_conv:
            return base._conv_forward(x, weight, base.bias)
        return torch.nn.functional.linear(x, weight, base.bias)

    def _grouped_forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        """A grouped plan (mixing.py): the rows of each distinct mix computed as that mix alone computes
        them. x: (B, ...), B a multiple of the plan's mixes. Rows whose mix alone would fuse into this
        layer: F(x_rows, W0 + sum w_i D_i); the others: base(x_rows) [+ the unfused delta of their mix],
        the base once over all of them (its products give each row the same bits at any batch size).
        Which rows go where is worked out once per layer and batch size (plan.layout): the pass is
        dispatch-bound at small sizes, so each call is the few tensor operations below."""
        layout = plan.layout(self, x.shape[0], x.dim() == 2 and isinstance(self.base_layer, RowwiseMixin), x.device)
        if layout.plain:
            return self.base_layer(x)  # no mix adapts this layer: the base alone, rows in order
        # One gather puts the rows in chunk order (the base's rows, then each fused mix's), contiguous chunks
        # of it are computed, and one gather puts the outputs back in row order.
        xs = (x if layout.order is None else x.index_select(0, layout.order)).split(layout.sizes)
        outs = []
        if layout.base_rows:
            ob = self.base_layer(xs[0])
            for k, pos, rows in layout.unfused:
                weights = {a: w for a, w in plan.lone_weights(self, k).items() if a in self.adapters}
                og = ob[pos]
                ob[pos] = og + self.delta_output(x[rows], og, weights)
            outs.append(ob)
        outs += [self._forward_with_weight(xk, plan.fused_weight(self, k, weights))
                 for xk, (k, weights) in zip(xs[len(outs):], layout.fused)]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out if layout.back is None else out.index_select(0, layout.back)

    def delta_output(self, x: torch.Tensor, out: torch.Tensor, weights: dict) -> torch.Tensor:
        """sum_i w_i * D_i x. weights: name -> float or (B,) tensor."""
        conv = self.geometry.is_conv
        batch = x.shape[0]
        low, other = [], []
        for name, w in weights.items():
            adapter = self.adapters[name]
            # Dropout differs per adapter, so a training adapter with dropout runs alone.
            dropping = self.training and isinstance(adapter.dropout, nn.Dropout)
            (low if adapter.low_rank and not dropping else other).append((adapter, w))
        delta = torch.zeros((), dtype=out.dtype, device=out.device)
        if low:
            pairs = [a.pair() for a, _ in low]
            down = torch.cat([d for d, _ in pairs]).to(x.dtype)  # (R, in[, kh, kw]), R = sum of ranks
            up = torch.cat([u for _, u in pairs], dim=1).to(x.dtype)  # (out, R[, 1, 1])
            per_sample = any(torch.is_tensor(w) for _, w in low)
            if per_sample:
                cols = [(torch.as_tensor(w, dtype=x.dtype, device=x.device).expand(batch) * a.scale)[:, None]
                        .expand(batch, a.rank) for a, w in low]
                scales = torch.cat(cols, dim=1)  # (B, R)
            else:
                scales = torch.cat([torch.full((a.rank,), a.scale * w, dtype=x.dtype, device=x.device) for a, w in low])
            h = apply_down(x, down, self.geometry.conv_args)
            delta = apply_up(scale_rank_columns(h, scales, conv), up, conv)
        if other:
            base_nobias = out - self._base_bias(out)
            for adapter, w in other:
                d = adapter.output_delta(x, base_nobias, self.base_weight)
                delta = delta + _per_sample(w, batch, d.dim()) * d
        return delta

    def add_delta_(self, target: torch.Tensor, weights: dict[str, float]) -> None:
        """target (the base weight, (out, in[, kh, kw]), float) += sum_i w_i D_i in place. The
        low-rank adapters go in as one product of their concatenated factors, (out, R) @ (R, in*kh*kw),
        accumulated straight into target: no full-size temporary per adapter."""
        low = [(self.adapters[n], w) for n, w in weights.items() if self.adapters[n].low_rank]
        rest = {n: w for n, w in weights.items() if not self.adapters[n].low_rank}
        # DoRA's delta depends on W0, which target may be: computed before target changes.
        dense = self.delta_weight(rest) if rest else None
        if low:
            pairs = [a.pair() for a, _ in low]
            down = torch.cat([d.reshape(d.shape[0], -1) for d, _ in pairs]).to(target.dtype)  # (R, in*kh*kw)
            up = torch.cat([u.reshape(u.shape[0], -1) * (a.scale * w) for (_, u), (a, w) in zip(pairs, low)],
                           dim=1).to(target.dtype)  # (out, R)
            target.view(target.shape[0], -1).addmm_(up, down)
        if dense is not None:
            target.add_(dense.to(target.dtype))

    def delta_weight(self, weights: dict[str, float]) -> torch.Tensor | None:
        """sum_i w_i * D_i as a weight tensor (fp32), for fusing into a float base; None if empty."""
        w0 = None
        total = None
        for name, w in weights.items():
            adapter = self.adapters[name]
            if not adapter.low_rank and w0 is None:
                w0 = self.base_weight().float()  # DoRA's delta depends on W0
            d = w * adapter.delta_weight(w0).float()
            total = d if total is None else total + d
        return total

"""Fuse a mix into base weights and restore them bit for bit, without a second full copy of every weight.

Fusing writes W' = fl(W + D) in place (AdapterLayer.add_delta_, D the mix's delta of that layer). Saving W
whole to restore it doubles the memory of every weight touched (gigabytes for SDXL with `linear` targets).
What rounding loses is little: R = fl(W' - D) already equals W in most elements (about 93% for a delta of
a thousandth of the weights). So a layer keeps only the elements where R's bits differ from W's (their
flat indices, int32, and W's values there); restoring recomputes D from the same adapters, forms R and puts
those elements back: W again, bit for bit (bits compared, so -0.0 and 0.0 count as different).

Layers with an adapter whose delta reads W itself (DoRA) keep a full copy: after fusing, W is gone, and D
could not be recomputed from it. A layer where more than half the elements differ keeps a full copy too
(the indices would cost more).
"""

from __future__ import annotations

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


class Saved:
    """What restores one fused weight: either W whole, or (indices, values) of the elements R misses."""

    def __init__(self, weight: torch.Tensor, full: torch.Tensor | None = None, layer=None, weights=None,
                 index: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self.weight, self.full, self.layer, self.weights, self.index, self.values = (
            weight, full, layer, weights, index, values)

    def nbytes(self) -> int:
        held = [t for t in (self.full, self.index, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def restore(self) -> None:
        if self.full is not None:
            self.weight.data.copy_(self.full)
            return
        w = self.weight.data
        w.sub_(_delta(self.layer, self.weights, w))  # R = fl(W' - D), in place: no full-size temporary beyond D
        w.view(-1)[self.index.long()] = self.values


def _delta(layer, weights: dict, like: torch.Tensor) -> torch.Tensor:
    """D of a low-rank-only layer, computed as add_delta_ computes it (into zeros: the same products)."""
    d = torch.zeros_like(like)
    layer.add_delta_(d, weights)
    return d


def fuse_layer(layer, weights: dict[str, float]) -> Saved:
    """Fuse `weights` (adapter name -> weight) into the layer's base weight in place; what restores it."""
    weight = layer.base_layer.weight
    w = weight.data
    if any(not layer.adapters[n].low_rank for n in weights) or w.dtype not in _INT_VIEW:
        full = w.clone()
        layer.add_delta_(w, weights)
        return Saved(weight, full=full)
    original_bits = _bits(w).clone()  # one layer's copy at a time, dropped before the next layer
    layer.add_delta_(w, weights)
    try:
        d = _delta(layer, weights, w)
        index = (_bits(w - d) != original_bits).view(-1).nonzero().squeeze(1)  # where rounding lost W
        del d
    except BaseException:  # e.g. out of memory: this layer goes back before the caller restores the others
        _bits(w).copy_(original_bits)
        raise
    if 2 * index.numel() > w.numel():
        return Saved(weight, full=original_bits.view(w.dtype))
    values = original_bits.view(-1)[index].view(w.dtype).clone()
    return Saved(weight, layer=layer, weights=dict(weights), index=index.to(torch.int32), values=values)

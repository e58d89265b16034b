"""Layers whose rows must not depend on their batch: the small matrix products of the time embedding.

A served picture must get the same pixels whatever other requests share its pass (issue 17). The large
products of a UNet (tokens x channels, convolutions over whole latents) give each row the same bits at any
batch size on these CPU kernels, but a product with one row per picture does not: MKL picks another kernel
for a (2, 192) input than for a (16, 192) one, and the sums round apart (about 4e-7 in the time embedding,
2e-6 in the UNet's output after a step). Those layers are the time embedding (time_embedding, SDXL's
add_embedding, class_embedding), each ResNet block's time_emb_proj, and SDXL's pooled text_projection:
inputs (batch, channels). Their forward runs row by row, (1, channels) each, in every call, so a row's bits
are the same alone and in company. In inference, rows that are all equal (the time embedding of every
picture of a pass at one step) are computed once and repeated, the same bits: row by row, a pass of 16
rows spent about a seventh of the serve bench's time in these tiny products (0.625x -> 0.539x of serial).

Convolutions are not batch-invariant on these kernels either: oneDNN computes a 3x3 convolution of one
picture apart from the same picture in a batch of 16, and a 1x1 one with 144 or more input channels apart at
any batch size on one thread (tests/test_grouped_pass.py measures the UNet's shapes). So in inference (grad
off: generation; training keeps the plain kernels) every convolution of the UNet and of the adapters goes
through conv2d() here: a 1x1 convolution as the matrix product it is, one (O, C) @ (C, H*W) per picture
(the same product alone or in company); any other with at least two pictures, a lone picture doubled
(guidance off: one row), since oneDNN's kernels agree from two pictures up.

The class of each such module is swapped for a subclass with the row-wise forward (its state dict, hooks
and parameters stay as they are; quantizing replaces modules, so Base.quantize swaps again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EMBEDDINGS = ("time_embedding", "add_embedding", "class_embedding")
_PROJECTIONS = ("time_emb_proj", "text_projection")


def by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over x (batch, channels) one row at a time, (1, channels) each. In inference, a batch whose rows
    are all equal (the time embedding of pictures at one step: the timestep is theirs alike) is computed
    once and repeated: the same bits, since each row alone is computed the same way, and a pass of 16
    rows then costs what a pass of 2 does."""
    if not torch.is_grad_enabled() and torch.equal(x, x[:1].expand_as(x)):
        y = fn(x[:1])
        return y.expand(x.shape[0], *y.shape[1:]).contiguous()
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


class RowwiseMixin:
    """forward over a (batch, channels) input one row at a time; any other input as the base class does."""

    def forward(self, x, *args, **kwargs):
        base_forward = super().forward
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[0] <= 1:
            return base_forward(x, *args, **kwargs)
        return by_rows(lambda row: base_forward(row, *args, **kwargs), x)


def _is_pointwise(weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    one = (1, 1)
    return (tuple(weight.shape[2:]) == one and groups == 1 and _pair(stride) == one and _pair(dilation) == one
            and (padding == "valid" or _pair(padding) == (0, 0)))


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution picture by picture: (O, C) @ (C, H*W) for each of x's N pictures (N, C, H, W), written
    straight into the (N, O, H, W) output. Every picture is one product of the same shape at any batch size, so
    its bits are its own; and in channels-first order, with no permute and copy on either side, it takes about
    half the time of the (N*H*W, C) @ (C, O) product through channels-last views (tests/bench/conv_micro.py)."""
    n, c, h, w = x.shape
    cols = x.reshape(n, c, h * w)
    out = x.new_empty(n, weight.shape[0], h * w)
    col_bias = None if bias is None else bias.view(-1, 1)  # (O, 1), added to every column by addmm
    for i in range(n):
        if col_bias is None:
            torch.mm(weight, cols[i], out=out[i])
        else:
            torch.addmm(col_bias, weight, cols[i], out=out[i])
    return out.view(n, -1, h, w)


def _pair(v):
    return v if isinstance(v, (tuple, list)) and len(v) == 2 else (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d whose pictures get the same bits at any batch size, in inference (see the docstring).
    x: (N, C, H, W); weight: (O, C/groups, kh, kw)."""
    if torch.is_grad_enabled() or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if _is_pointwise(weight, stride, padding, dilation, groups):
        return _pointwise(x, weight.reshape(weight.shape[0], -1), bias)
    if x.shape[0] == 1:
        return F.conv2d(torch.cat([x, x]), weight, bias, stride, padding, dilation, groups)[:1]
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class InvariantConvMixin:
    """A Conv2d whose forward (and any caller of _conv_forward with another weight) goes through conv2d()."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type) -> type:
    if (mixin, cls) not in _SUBCLASSES:
        name = f"{'Rowwise' if mixin is RowwiseMixin else 'Invariant'}{cls.__name__}"
        sub = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, sub)  # findable by name, so a module holding one still pickles
        _SUBCLASSES[(mixin, cls)] = sub
    return _SUBCLASSES[(mixin, cls)]


def _wants_rowwise(name: str) -> bool:
    parts = name.split(".")
    if parts[-1] == "base_layer" and len(parts) > 1:  # the layer an adapter wraps
        parts = parts[:-1]
    return parts[-1] in _PROJECTIONS or any(p in _EMBEDDINGS for p in parts)


def make_batch_invariant(model: nn.Module) -> int:
    """Swap every linear-like layer of `model` that takes (batch, channels) inputs for its row-wise subclass,
    and every float Conv2d for one through conv2d(); idempotent. An adapter wrapper (AdapterLayer) is left
    alone: it runs such inputs row by row itself, and its base layer is swapped here. Returns how many
    layers are swapped now."""
    from .adapters.layer import AdapterLayer

    count = 0
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer) or list(module.children()):
            continue
        if isinstance(module, (RowwiseMixin, InvariantConvMixin)):
            count += 1
        elif isinstance(module, nn.Conv2d):
            module.__class__ = _subclass(InvariantConvMixin, type(module))
            count += 1
        elif _wants_rowwise(name) and hasattr(module, "in_features"):
            module.__class__ = _subclass(RowwiseMixin, type(module))
            count += 1
    return count

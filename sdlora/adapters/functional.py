"""Pure tensor math of the adapter methods: no modules, no state; shapes in the comments.

Notation: a Linear base has W0 (out, in); a Conv2d base has W0 (out, in, kh, kw). An adapter's
update to W0 is a delta D with W0's shape. A mix applies W = W0 + sum_i w_i * D_i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..batch_invariance import conv2d


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r (Hu et al.), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """D = scale * up @ down.
    Linear: down (r, in), up (out, r) -> (out, in).
    Conv (LoCon): down (r, in, kh, kw), up (out, r, 1, 1) -> (out, in, kh, kw): the 1x1 up
    convolution composes with the down convolution as a matrix product over the rank."""
    if down.dim() == 2:
        return scale * (up @ down)
    r = down.shape[0]
    return scale * (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])


def vera_factors(shared_a: torch.Tensor, shared_b: torch.Tensor, d: torch.Tensor, b: torch.Tensor):
    """VeRA (Kopiczko et al. 2024): D = diag(b) B diag(d) A as a low-rank pair.
    shared_a (r, in), shared_b (out, r), d (r,), b (out,) -> down (r, in), up (out, r)."""
    return d[:, None] * shared_a, b[:, None] * shared_b


def weight_norm_per_output(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c, the L2 norm of each output channel's row: (out, in[, kh, kw]) -> (out,)."""
    return weight.reshape(weight.shape[0], -1).norm(p=2, dim=1)


def dora_delta(w0: torch.Tensor, lora_d: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024): W' = m * (W0 + dW) / ||W0 + dW||_c, so D = W' - W0.
    w0, lora_d (out, in[, kh, kw]); magnitude (out,). The norm is detached, as in the paper
    (section 4.3) and PEFT: it is treated as a constant in the backward pass."""
    merged = w0 + lora_d
    factor = magnitude / weight_norm_per_output(merged).detach()  # (out,)
    return factor.reshape(-1, *([1] * (w0.dim() - 1))) * merged - w0


def dora_output_delta(base_out_nobias: torch.Tensor, lora_out: torch.Tensor, factor: torch.Tensor,
                      channel_dim: int) -> torch.Tensor:
    """D x without forming D: (factor - 1) * W0 x + factor * dW x, where factor = m / ||W0 + dW||_c.
    base_out_nobias, lora_out (..., out, ...) with out on `channel_dim`; factor (out,)."""
    shape = [1] * base_out_nobias.dim()
    shape[channel_dim] = -1
    f = factor.reshape(shape)
    return (f - 1) * base_out_nobias + f * lora_out


def apply_down(x: torch.Tensor, down: torch.Tensor, conv: dict | None) -> torch.Tensor:
    """First half of a low-rank pair. Linear: x (..., in) -> (..., r). Conv: x (B, in, H, W) ->
    (B, r, H', W') with the base layer's stride, padding and dilation."""
    if conv is None:
        return F.linear(x, down)
    return conv2d(x, down, stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"])


def apply_up(h: torch.Tensor, up: torch.Tensor, conv: bool) -> torch.Tensor:
    """Second half. Linear: (..., r) -> (..., out). Conv: (B, r, H, W) -> (B, out, H, W), 1x1."""
    return conv2d(h, up.reshape(up.shape[0], up.shape[1], 1, 1)) if conv else F.linear(h, up.reshape(up.shape[0], -1))


def scale_rank_columns(h: torch.Tensor, scales: torch.Tensor, conv: bool) -> torch.Tensor:
    """Multiply each rank column of h by its scale. scales (R,) for one mix, or (B, R) for
    per-sample mixes. h: Linear (B, ..., R); Conv (B, R, H, W)."""
    if scales.dim() == 1:
        return h * (scales[:, None, None] if conv else scales)
    if conv:
        return h * scales[:, :, None, None]
    return h * scales.reshape(scales.shape[0], *([1] * (h.dim() - 2)), scales.shape[1])

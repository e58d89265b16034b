"""The tensor math LoHa and LoKr share with LyCORIS (lycoris-lora): how LoKr splits a layer's sides, which
of its factors are whole or low-rank, its scale, and the two products. Pure functions, no modules.

Notation as in LyCORIS: a layer of W0 (out, in[, kh, kw]) with out = a * b and in = c * d. LoKr's delta is
kron(w1 (a, c), w2 (b, d[, kh, kw])); LoHa's is (w1_a @ w1_b) * (w2_a @ w2_b) over (out, in*kh*kw).
"""

from __future__ import annotations

import torch

from ..errors import SdloraError


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """dimension = m * n with m <= n: m = factor itself when it divides the dimension, else the pair of
    divisors closest to each other (smallest m + n) with m at most the factor (-1: no limit), as LyCORIS
    splits it (512 -> (16, 32); 512 with factor 4 -> (4, 128); a prime p -> (1, p))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_shapes(out_dim: int, in_dim: int, kernel: tuple[int, ...], rank: int, factor: int,
                decompose_both: bool, full_matrix: bool) -> dict[str, tuple[int, ...]]:
    """The LyCORIS part names of a fresh LoKr and their shapes. w1 (a, c) is whole unless decompose_both
    and the rank is under half its larger side; w2 (b, d[, kh, kw]) is a rank-r pair w2_a (b, r) @ w2_b
    (r, d*kh*kw) unless the rank reaches half its larger side or full_matrix asks for it whole."""
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, rank), (rank, c)
    else:
        shapes["lokr_w1"] = (a, c)
    if rank >= max(b, d) / 2 or full_matrix:
        shapes["lokr_w2"] = (b, d, *kernel)
    else:
        k = 1
        for side in kernel:
            k *= side
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, rank), (rank, d * k)
    return shapes


def lokr_rank(parts: dict) -> int | None:
    """The rank alpha divides by: w1's pair's if it has one, else w2's (LyCORIS's rule); None when both
    factors are whole, where LyCORIS ignores alpha and the scale is 1."""
    if "lokr_w1_a" in parts:
        return parts["lokr_w1_a"].shape[1]
    if "lokr_w2_a" in parts:
        return parts["lokr_w2_a"].shape[1]
    return None


def _whole_or_pair(parts: dict, name: str, where: str) -> torch.Tensor:
    if name in parts:
        return parts[name]
    if f"{name}_a" in parts and f"{name}_b" in parts:
        return parts[f"{name}_a"] @ parts[f"{name}_b"]  # (x, r) @ (r, y) -> (x, y)
    raise SdloraError(f"{where}: LoKr part {name} is neither whole nor a {name}_a/{name}_b pair", "re-export the adapter")


def lokr_weight(parts: dict, scale: float, weight_shape: tuple[int, ...] | None, where: str = "LoKr") -> torch.Tensor:
    """D = scale * kron(w1, w2), shaped as W0 (out, in[, kh, kw]); weight_shape None: kron's own shape. A convolution's kernel is either w2's
    last two axes (w2 whole, w1 gets 1x1 axes) or folded into w2's columns (a pair: (b, d*kh*kw)); both
    give D's numbers in W0's row-major order."""
    w1 = _whole_or_pair(parts, "lokr_w1", where)  # (a, c)
    w2 = _whole_or_pair(parts, "lokr_w2", where)  # (b, d[, kh, kw]) or (b, d*kh*kw)
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    d = torch.kron(w1, w2) * scale
    return d if weight_shape is None else d.reshape(weight_shape)


def loha_weight(parts: dict, scale: float, weight_shape: tuple[int, ...] | None) -> torch.Tensor:
    """D = scale * (w1_a @ w1_b) * (w2_a @ w2_b): w*_a (out, r), w*_b (r, in*kh*kw); shaped as W0
    (weight_shape None: (out, in*kh*kw))."""
    d = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * scale
    return d if weight_shape is None else d.reshape(weight_shape)

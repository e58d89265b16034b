"""LyCORIS LoHa and LoKr modules in kohya-layout files -> dense weight deltas, for generation.

LoHa (Hadamard product): D = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
LoKr (Kronecker product): D = kron(w1, w2) * scale, each factor either whole or a low-rank pair
(w1_a @ w1_b); the scale is alpha / r when w2 is a pair, else 1 (LyCORIS ignores alpha then).
Tucker-decomposed convolutions (hada_t1, lokr_t2) are not supported.
"""

from __future__ import annotations

import torch

from ..errors import SdloraError
from .adapter import scalar


def _pair_or_whole(parts: dict, whole: str, a: str, b: str, name: str, path: str) -> tuple[torch.Tensor, bool]:
    if whole in parts:
        return parts[whole].double(), False
    if a in parts and b in parts:
        ta, tb = parts[a].double(), parts[b].double()
        return (ta @ tb.reshape(tb.shape[0], -1)).reshape(ta.shape[0], *tb.shape[1:]), True
    raise SdloraError(f"{path}: LoKr module '{name}' lacks {whole} or {a}/{b}", "re-export the adapter")


def loha_delta(parts: dict, name: str, path: str) -> torch.Tensor:
    """(out, in*kh*kw): row-major the same numbers as the layer's (out, in, kh, kw) weight."""
    if "hada_t1" in parts or "hada_t2" in parts:
        raise SdloraError(f"{path}: '{name}' is a Tucker-decomposed LoHa, which sdlora cannot read",
                          "retrain or convert it without use_tucker")
    w1a, w1b, w2a, w2b = (parts[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rank = w1b.shape[0]
    alpha = scalar(parts["alpha"], f"{path}: '{name}.alpha'") if "alpha" in parts else float(rank)
    d = (w1a @ w1b.reshape(rank, -1)) * (w2a @ w2b.reshape(w2b.shape[0], -1)) * (alpha / rank)
    return d.float()


def lokr_delta(parts: dict, name: str, path: str) -> torch.Tensor:
    """(out, in, kh, kw) when w2 is whole and 4-D (a conv's kernel is stored), else (out, in*kh*kw). A conv's
    kernel sits in w2, either as its last two axes or in its columns; kron over (a, c) x (b, d*kh*kw) and over
    (a, c, 1, 1) x (b, d, kh, kw) give the same numbers."""
    if "lokr_t2" in parts:
        raise SdloraError(f"{path}: '{name}' is a Tucker-decomposed LoKr, which sdlora cannot read",
                          "retrain or convert it without use_tucker")
    w1, _ = _pair_or_whole(parts, "lokr_w1", "lokr_w1_a", "lokr_w1_b", name, path)
    w2, w2_pair = _pair_or_whole(parts, "lokr_w2", "lokr_w2_a", "lokr_w2_b", name, path)
    scale = 1.0
    if w2_pair:
        rank = parts["lokr_w2_b"].shape[0]
        scale = (scalar(parts["alpha"], f"{path}: '{name}.alpha'") if "alpha" in parts else float(rank)) / rank
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    d = torch.kron(w1, w2) * scale  # (a*b, c*d[, kh, kw])
    return (d if w2.dim() == 4 and not w2_pair else d.reshape(d.shape[0], -1)).float()

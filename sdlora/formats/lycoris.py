"""LyCORIS LoHa and LoKr modules in kohya-layout files: their parts, scale and dense delta, on reading.

LoHa (Hadamard product): D = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
LoKr (Kronecker product): D = kron(w1, w2) * scale, each factor either whole or a low-rank pair
(w1_a @ w1_b); the scale is alpha / r with a pair on either side (r: w1's pair's rank, else w2's), else 1
(LyCORIS ignores alpha then). The formulas are sdlora.adapters.factored's, which the trainable
adapters use too. Tucker-decomposed convolutions (hada_t1, lokr_t2) are not supported.
"""

from __future__ import annotations

import torch

from ..errors import SdloraError
from .adapter import scalar


def _alpha_over(parts: dict, rank: int, name: str, path: str) -> float:
    return (scalar(parts["alpha"], f"{path}: '{name}.alpha'") if "alpha" in parts else float(rank)) / rank


def lycoris_module(parts: dict, name: str, path: str) -> tuple[str, float, dict[str, torch.Tensor], torch.Tensor]:
    """(method, scale, LyCORIS parts as float32, D) for one module; D is (out, in*kh*kw) row-major, or the
    layer's (out, in, kh, kw) when a LoKr's w2 is whole and 4-D (it carries the kernel)."""
    from ..adapters.factored import lokr_rank, lokr_weight, loha_weight

    kinds = {k.split("_")[0] for k in parts if k.startswith(("hada_", "lokr_"))}
    if len(kinds) > 1:
        raise SdloraError(f"{path}: module '{name}' mixes LoHa and LoKr parts", "re-export the adapter")
    lyco = {k: v.float() for k, v in parts.items() if k.startswith(("hada_", "lokr_"))}
    exact = {k: v.double() for k, v in parts.items() if k.startswith(("hada_", "lokr_"))}
    if "hada" in kinds:
        if "hada_t1" in parts or "hada_t2" in parts:
            raise SdloraError(f"{path}: '{name}' is a Tucker-decomposed LoHa, which sdlora cannot read",
                              "retrain or convert it without use_tucker")
        missing = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in parts]
        if missing:
            raise SdloraError(f"{path}: LoHa module '{name}' lacks {missing}", "re-export the adapter")
        scale = _alpha_over(parts, parts["hada_w1_b"].shape[0], name, path)
        return "loha", scale, lyco, loha_weight(exact, scale, None).float()
    if "lokr_t2" in parts:
        raise SdloraError(f"{path}: '{name}' is a Tucker-decomposed LoKr, which sdlora cannot read",
                          "retrain or convert it without use_tucker")
    rank = lokr_rank(parts)
    scale = 1.0 if rank is None else _alpha_over(parts, rank, name, path)
    d = lokr_weight(exact, scale, None, f"{path}: module '{name}'")  # (a*b, c*d[, kh, kw])
    return "lokr", scale, lyco, (d if d.dim() == 4 else d.reshape(d.shape[0], -1)).float()


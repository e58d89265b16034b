"""LoKr (Edalati et al. 2022, KronA; LyCORIS's "lokr"): D = kron(w1, w2) * scale. The layer's sides split as
out = a * b and in = c * d (factorization(), LyCORIS's rule, by --factor); w1 (a, c) is small and whole (a
low-rank pair with decompose_both), w2 (b, d[, kh, kw]) is a rank-r pair w2_a (b, r) @ w2_b (r, d*kh*kw), or
whole when the rank reaches half its larger side or full_matrix is set. The scale is alpha / r with a pair
anywhere, 1 when both are whole (LyCORIS then ignores alpha).
"""

from __future__ import annotations

from .factored import lokr_rank, lokr_shapes, lokr_weight
from .factored_adapter import FactoredAdapter
from .functional import lora_scale
from .lora import init_down


class LokrAdapter(FactoredAdapter):
    method = "lokr"
    zero_init = ("lokr_w2", "lokr_w2_b")

    product = staticmethod(lokr_weight)

    @classmethod
    def rank_of(cls, parts):
        return lokr_rank(parts) or max(1, min(parts["lokr_w2"].shape[:2]))

    @classmethod
    def create(cls, layer, cfg, generator, shared):
        geom = layer.geometry
        shapes = lokr_shapes(geom.out_features, geom.in_features, tuple(geom.kernel_size or ()), cfg.rank,
                             cfg.factor, cfg.decompose_both, cfg.full_matrix)
        paired = any(k.endswith(("_a", "_b")) for k in shapes)  # a low-rank pair on either side: scale alpha / r
        alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
        scale = lora_scale(alpha, cfg.rank, cfg.rslora) if paired else 1.0
        a = cls(geom, cfg.rank, scale, shapes, cfg.dropout)
        # LyCORIS's init: Kaiming-uniform (a = sqrt(5)) on everything but w2 whole or w2_b, which start at zero.
        for name, p in a.factors.items():
            if name not in cls.zero_init:
                init_down(p, cfg.rank, "kaiming", generator)
        return a

"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS's "loha"): D = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, a
Hadamard product of two rank-r products, whose rank can reach r^2 for the parameters of a rank-2r LoRA.
w1_a, w2_a (out, r); w1_b, w2_b (r, in*kh*kw): a convolution's kernel folded into the columns, as LyCORIS does.
"""

from __future__ import annotations

import torch

from .factored import loha_weight
from .factored_adapter import FactoredAdapter
from .functional import lora_scale

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaAdapter(FactoredAdapter):
    method = "loha"
    required = PARTS
    zero_init = ("hada_w2_a",)

    product = staticmethod(loha_weight)

    @classmethod
    def rank_of(cls, parts):
        return parts["hada_w1_b"].shape[0]

    @classmethod
    def create(cls, layer, cfg, generator, shared):
        geom = layer.geometry
        rank = cfg.rank
        cols = torch.Size(geom.weight_shape[1:]).numel()  # in * kh * kw
        shapes = {"hada_w1_a": (geom.out_features, rank), "hada_w1_b": (rank, cols),
                  "hada_w2_a": (geom.out_features, rank), "hada_w2_b": (rank, cols)}
        alpha = float(rank if cfg.alpha is None else cfg.alpha)
        a = cls(geom, rank, lora_scale(alpha, rank, cfg.rslora), shapes, cfg.dropout)
        # LyCORIS's init: both b sides N(0, 1), w1_a N(0, 0.1^2), w2_a zero, so D starts at 0.
        with torch.no_grad():
            a.factors["hada_w1_b"].normal_(0.0, 1.0, generator=generator)
            a.factors["hada_w1_a"].normal_(0.0, 0.1, generator=generator)
            a.factors["hada_w2_b"].normal_(0.0, 1.0, generator=generator)
        return a

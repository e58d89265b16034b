"""VeRA (Kopiczko et al. 2024): frozen random projections shared by every layer of one shape,
trained scaling vectors only. D = diag(b) B diag(d) A with A (r, in), B (out, r) frozen."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import SdloraError
from .base import Adapter, BaseGeometry
from .functional import lora_delta, vera_factors


def shared_projections(seed: int, rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r), Kaiming-uniform, regenerated from (seed, r, in, out) alone, so a
    file stores only the seed and every layer of one shape gets the same pair."""
    key = hashlib.sha256(f"vera:{seed}:{rank}:{in_features}:{out_features}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    a = torch.empty(rank, in_features).uniform_(-1, 1, generator=gen) * (3.0 / in_features) ** 0.5
    b = torch.empty(out_features, rank).uniform_(-1, 1, generator=gen) * (3.0 / rank) ** 0.5
    return a, b


class VeraAdapter(Adapter):
    method = "vera"

    def __init__(self, geometry: BaseGeometry, rank: int, *, seed: int, d_initial: float = 0.1,
                 shared: dict | None = None, dropout: float = 0.0):
        if geometry.is_conv:
            raise SdloraError("VeRA adapts linear layers only", "use LoRA (LoCon) or DoRA for convolutions")
        super().__init__(geometry, rank, 1.0, dropout)  # VeRA has no alpha: the vectors carry the scale
        self.seed = seed
        key = (seed, rank, geometry.in_features, geometry.out_features)
        if shared is not None and key in shared:
            a, b = shared[key]
        else:
            a, b = shared_projections(*key)
            if shared is not None:
                shared[key] = (a, b)
        # Frozen and not saved: regenerated from the seed. The same tensors for every layer of one shape.
        self.register_buffer("shared_a", a, persistent=False)
        self.register_buffer("shared_b", b, persistent=False)
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.vera_b = nn.Parameter(torch.zeros(geometry.out_features))

    def b_side(self):
        return [self.vera_b]

    def pair(self):
        return vera_factors(self.shared_a, self.shared_b, self.vera_d, self.vera_b)

    def delta_weight(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        down, up = self.pair()
        return lora_delta(down, up, 1.0)

"""VeRA (Kopiczko et al. 2024): frozen random projections shared by every layer of one shape,
trained scaling vectors only. D = diag(b) B diag(d) A with A (r, in), B (out, r) frozen."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import SdloraError
from ..formats.adapter import ModuleWeights
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
    convs = False

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

    @classmethod
    def create(cls, layer, cfg, generator, shared):
        return cls(layer.geometry, cfg.rank, seed=cfg.seed, d_initial=cfg.vera_d_initial, shared=shared,
                   dropout=cfg.dropout)

    def stored_parts(self):
        return {"vera_d": self.vera_d, "vera_b": self.vera_b}

    @classmethod
    def from_weights(cls, layer, m, *, config, shared):
        a = cls(layer.geometry, m.rank, seed=int(config.get("seed", 0)), shared=shared)
        with torch.no_grad():
            a.vera_d.copy_(m.parts["vera_d"]), a.vera_b.copy_(m.parts["vera_b"])
        return a

    @classmethod
    def file_parts(cls, m):
        # Only the trained vectors and the input width: the projections come back from the seed.
        return {"vera_d": m.parts["vera_d"], "vera_b": m.parts["vera_b"], "in_features": torch.tensor(int(m.down.shape[1]))}

    @classmethod
    def from_file_parts(cls, parts, scale, config, where):
        missing = {"vera_d", "vera_b", "in_features"} - set(parts)
        if missing or "seed" not in config:
            raise SdloraError(f"{where} lacks {sorted(missing) or ['the seed in its config']}", "re-export the adapter")
        d, b, n_in = parts["vera_d"], parts["vera_b"], int(parts["in_features"])
        a, bb = shared_projections(int(config["seed"]), d.shape[0], n_in, b.shape[0])
        # (r, in) and (out, r): diag(b) B diag(d) A as a plain pair, for the formats that hold pairs only.
        return ModuleWeights("vera", d[:, None] * a, b[:, None] * bb, scale, {"vera_d": d, "vera_b": b})

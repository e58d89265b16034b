"""Which noise level each training picture gets: uniform over the schedule (the default, as diffusers' scripts),
logit-normal (Esser et al. 2024: u = sigmoid(N(mean, std)), most weight on the middle levels), an optional shift
of u towards noisier levels (SD3's u' = s u / (1 + (s - 1) u); s > 1 noisier, s < 1 cleaner), and a range of
timesteps (kohya's --min_timestep / --max_timestep). A continuous u in [0, 1) maps to the integer timestep
min + floor(u * (max - min + 1)).

Plain uniform over the whole schedule draws with torch.randint, exactly as before these options, so runs and
their resumes are unchanged."""

from __future__ import annotations

import torch


def sample_timesteps(n: int, num_train: int, gen: torch.Generator, sampling: str = "uniform", mean: float = 0.0,
                     std: float = 1.0, shift: float = 1.0, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """(n,) int64 timesteps in [lo, hi] (hi: the last of the schedule by default)."""
    hi = num_train - 1 if hi is None else hi
    if sampling == "uniform" and shift == 1.0:
        return torch.randint(lo, hi + 1, (n,), generator=gen)
    if sampling == "uniform":
        u = torch.rand((n,), generator=gen, dtype=torch.float64)
    else:
        u = torch.sigmoid(mean + std * torch.randn((n,), generator=gen, dtype=torch.float64))
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    t = lo + torch.floor(u * (hi - lo + 1)).to(torch.int64)
    return t.clamp(lo, hi)

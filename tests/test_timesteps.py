"""Timestep sampling: each option's histogram against its distribution computed from its formula (the CDF of u,
through the shift's inverse, on the integer bins), and the default draws exactly as before the options."""

import math

import pytest
import torch

from sdlora.training.config import TrainConfig
from sdlora.training.timesteps import sample_timesteps

N = 1000


def _expected(cdf_u, shift: float, lo: int, hi: int) -> torch.Tensor:
    """P(t = lo + k): t = lo + floor(u' (hi - lo + 1)), u' = s u / (1 + (s - 1) u), so u = u' / (s - (s - 1) u')."""
    width = hi - lo + 1
    edges = [k / width for k in range(width + 1)]
    inverse = [v / (shift - (shift - 1) * v) for v in edges]
    cdf = [cdf_u(u) for u in inverse]
    return torch.tensor([cdf[k + 1] - cdf[k] for k in range(width)], dtype=torch.float64)


def _logit_normal_cdf(mean, std):
    def cdf(u):
        if u <= 0:
            return 0.0
        if u >= 1:
            return 1.0
        return 0.5 * (1 + math.erf((math.log(u / (1 - u)) - mean) / (std * math.sqrt(2))))
    return cdf


@pytest.mark.parametrize("sampling, mean, std, shift, lo, hi", [
    ("uniform", 0.0, 1.0, 1.0, 0, None),
    ("uniform", 0.0, 1.0, 3.0, 0, None),  # shifted towards noisier levels
    ("logit_normal", 0.0, 1.0, 1.0, 0, None),
    ("logit_normal", -0.5, 0.8, 1.0, 100, 799),  # a range
    ("logit_normal", 0.0, 1.0, 0.5, 0, None),  # shifted towards cleaner levels
])
def test_the_sampled_histogram_matches_the_distribution(sampling, mean, std, shift, lo, hi):
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(400_000, N, gen, sampling, mean, std, shift, lo, hi)
    top = N - 1 if hi is None else hi
    assert int(t.min()) >= lo and int(t.max()) <= top
    counts = torch.bincount(t - lo, minlength=top - lo + 1).double() / t.numel()
    cdf_u = (lambda u: min(max(u, 0.0), 1.0)) if sampling == "uniform" else _logit_normal_cdf(mean, std)
    expected = _expected(cdf_u, shift, lo, top)
    # total variation over the bins, with room for sampling noise of 400k draws on up to 1000 bins
    assert 0.5 * (counts - expected).abs().sum() < 0.03, (counts[:5], expected[:5])
    # and coarse shares (tenths of the range) close to the formula's
    tenths = counts.view(10, -1).sum(1) if counts.numel() % 10 == 0 else None
    if tenths is not None:
        assert (tenths - expected.view(10, -1).sum(1)).abs().max() < 0.005


def test_the_default_draws_as_before_the_options():
    a = sample_timesteps(64, N, torch.Generator().manual_seed(3))
    b = torch.randint(0, N, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_settings_are_refused_by_name():
    from sdlora.errors import SdloraError

    for bad in ({"timestep_sampling": "cosmic"}, {"logit_std": 0.0}, {"timestep_shift": -1.0},
                {"min_timestep": 500, "max_timestep": 100}):
        with pytest.raises(SdloraError, match=next(iter(bad))):
            TrainConfig(data_dir="d", out_dir="o", **bad)


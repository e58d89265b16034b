"""Truncated SVD of a weight delta into a LoRA pair: the one piece merge, resize and extract share."""

from __future__ import annotations

import torch

from ..errors import SdloraError


def dense(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """D = scale * up @ down as an (out, in*kh*kw) matrix."""
    r = down.shape[0]
    return scale * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())


# A randomized SVD (Halko et al. 2011, torch.svd_lowrank) finds the top `rank` singular triplets of an
# (out, in*kh*kw) matrix in O(out * in * rank) instead of a full SVD's O(out * in * min(out, in)): a real
# SD1.5 file's (1280, 11520) conv deltas take a second each instead of minutes. Only for large matrices
# and a low target rank; its error is measured exactly, not assumed from the spectrum.
RANDOMIZED_MIN_SIDE = 256  # below this a full SVD is fast and exact
OVERSAMPLE = 8  # extra columns beyond the target rank: the error of the kept part falls fast with them
POWER_ITERATIONS = 4


def randomized(shape, rank: int | None) -> bool:
    """Whether truncate() cuts a matrix of this shape to `rank` by randomized SVD."""
    side = min(shape)
    return rank is not None and side >= RANDOMIZED_MIN_SIDE and rank + OVERSAMPLE <= side // 4


def _randomized(delta: torch.Tensor, rank: int):
    """Top-`rank` factors of delta (out, n) and (squared error, squared norm), error measured."""
    with torch.random.fork_rng(devices=[]):  # seeded: the same file always resizes to the same file
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(delta, q=min(rank + OVERSAMPLE, min(delta.shape)), niter=POWER_ITERATIONS)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    total = float(delta.pow(2).sum())
    err = float((delta - (u * s) @ v.T).pow(2).sum())
    return u, s, v.T, err, total


def truncate(delta: torch.Tensor, kernel: tuple[int, ...], rank: int | None = None, energy: float | None = None):
    """delta (out, in*kh*kw) -> (down (r, in[, kh, kw]), up (out, r[, 1, 1]), kept rank, squared error, squared norm).

    With `rank`, keep that many singular values (at most the matrix rank); with `energy`, the
    fewest whose squared sum reaches that share of the total. up @ down is the best rank-r
    approximation in the Frobenius norm (Eckart-Young); for a large matrix cut to a low rank, a
    randomized SVD's near-best one, whose error is measured."""
    if (rank is None) == (energy is None):
        raise SdloraError("give exactly one of a rank or an energy share", "pass --rank R or --energy 0.9")
    if rank is not None and rank < 1:
        raise SdloraError(f"rank must be at least 1, got {rank}", "pass --rank 1 or more")
    if randomized(delta.shape, rank):
        u, s, vh, err, total = _randomized(delta.float(), rank)
        keep = rank
    else:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        total = float((s**2).sum())
        if rank is not None:
            keep = min(rank, s.numel())
        else:
            if not 0 < energy <= 1:
                raise SdloraError(f"energy share must be in (0, 1], got {energy}", "pass e.g. --energy 0.9")
            cum = torch.cumsum(s**2, 0)
            keep = int((cum < energy * total - 1e-12 * total).sum()) + 1
            keep = min(keep, s.numel())
        err = float((s[keep:] ** 2).sum())
    root = s[:keep].sqrt()  # split the singular values evenly between the two factors
    up = (u[:, :keep] * root).float()
    down = (root[:, None] * vh[:keep]).float()
    out = up.shape[0]
    if kernel:
        return down.reshape(keep, -1, *kernel), up.reshape(out, keep, 1, 1), keep, err, total
    return down, up, keep, err, total

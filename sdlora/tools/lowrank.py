"""Truncated SVD of a weight delta into a LoRA pair: the one piece merge, resize and extract share."""

from __future__ import annotations

import torch

from ..errors import SdloraError


def dense(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """D = scale * up @ down as an (out, in*kh*kw) matrix."""
    r = down.shape[0]
    return scale * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())


def truncate(delta: torch.Tensor, kernel: tuple[int, ...], rank: int | None = None, energy: float | None = None):
    """delta (out, in*kh*kw) -> (down (r, in[, kh, kw]), up (out, r[, 1, 1]), kept rank, squared error, squared norm).

    With `rank`, keep that many singular values (at most the matrix rank); with `energy`, the
    fewest whose squared sum reaches that share of the total. up @ down is the best rank-r
    approximation in the Frobenius norm (Eckart-Young)."""
    if (rank is None) == (energy is None):
        raise SdloraError("give exactly one of a rank or an energy share", "pass --rank R or --energy 0.9")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float((s**2).sum())
    if rank is not None:
        if rank < 1:
            raise SdloraError(f"rank must be at least 1, got {rank}", "pass --rank 1 or more")
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

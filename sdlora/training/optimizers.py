"""The optimizers training offers: torch AdamW, and bitsandbytes' 8-bit and paged 8-bit AdamW."""

from __future__ import annotations

import torch

from ..choices import OPTIMIZERS
from ..errors import SdloraError
from ..quant import bitsandbytes


def make_optimizer(name: str, groups: list[dict], device: torch.device):
    """AdamW, or bitsandbytes' 8-bit AdamW (moments in 8 bits) and its paged variant (moments
    in CUDA unified memory, so they page to the CPU under memory pressure). Where a variant
    cannot run, a warning says so and the nearest one that can is used."""
    import warnings

    if name not in OPTIMIZERS:
        raise SdloraError(f"unknown optimizer '{name}'", f"choose one of: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "paged_adamw8bit" and device.type != "cuda":
        warnings.warn("paged optimizers page through CUDA unified memory; on the CPU, plain 8-bit AdamW is used",
                      stacklevel=2)
        name = "adamw8bit"
    try:
        bnb = bitsandbytes()
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups)
    # What a bitsandbytes build that cannot run this optimizer here raises (missing, too old, no kernels);
    # anything else (bad parameter groups, a bug) is not ours to hide.
    except (ImportError, AttributeError, RuntimeError, NotImplementedError) as err:
        warnings.warn(f"{name} is unavailable here ({type(err).__name__}: {err}); using torch AdamW", stacklevel=2)
        return torch.optim.AdamW(groups)

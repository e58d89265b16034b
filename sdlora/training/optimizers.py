"""The optimizers training offers, each from its maintained package: torch AdamW; bitsandbytes' 8-bit and
paged 8-bit AdamW; Prodigy (prodigyopt), schedule-free AdamW (schedulefree), Adafactor (transformers) and
CAME (came-pytorch). The last three packages are optional: choosing one that is missing is one clear error."""

from __future__ import annotations

import importlib
import warnings

import torch

from ..choices import OPTIMIZERS
from ..errors import SdloraError
from ..quant import bitsandbytes

# optimizer -> (module, class, pip package) for those that live in their own package
PACKAGES = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "came": ("came_pytorch", "CAME", "came-pytorch"),
}


def optimizer_class(name: str):
    """The class of a packaged optimizer, or an SdloraError naming the package and its pip command."""
    module, cls, package = PACKAGES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise SdloraError(f"optimizer '{name}' needs the {package} package, which is not installed ({err})",
                          f"pip install {package}") from None


def make_optimizer(name: str, groups: list[dict], device: torch.device):
    """`name` over the parameter groups, each group at its own learning rate (LoRA+: B's is ratio x A's)."""
    if name not in OPTIMIZERS:
        raise SdloraError(f"unknown optimizer '{name}'", f"choose one of: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        # foreach: one call per group over all its tensors in place of a Python loop over tensors, which torch
        # picks by itself only on CUDA; on the CPU it gives the same bits (checked over 40 steps of the dots set)
        # and spares a few percent of a small adapter's step
        return torch.optim.AdamW(groups, foreach=True)
    if name in PACKAGES:
        cls = optimizer_class(name)
        lr = groups[0]["lr"]  # the constructors' default; every group carries its own
        if name == "prodigy":
            if lr < 0.1:
                warnings.warn(f"Prodigy finds the step size itself and --lr multiplies it: {lr} makes it "
                              f"{1 / lr:.0f} times smaller; pass --lr 1.0", UserWarning, stacklevel=2)
            return with_group_multipliers(cls(groups, lr=lr))
        if name == "adamw_schedulefree":
            # The warm-up is ours (the LambdaLR ramps each group's lr exactly as its own warmup_steps would).
            return cls(groups, lr=lr, warmup_steps=0)
        if name == "adafactor":
            # A fixed step size, as for Adam (kohya's advice for LoRA): our schedule stays in charge of it.
            return cls(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
        return cls(groups, lr=lr)
    return _bitsandbytes_adamw(name, groups, device)


def with_group_multipliers(prodigy):
    """Prodigy with a learning rate per group, as a multiplier on the step it finds.

    prodigyopt estimates one step size for all groups and refuses groups at different rates (kohya's
    sd-scripts cannot combine it with LoRA+ for that reason). Here it steps every group at the first
    group's rate (--lr), and each group's move is then scaled by its rate over that one: LoRA+'s B moves
    ratio times as far as Prodigy would move it, a text encoder at --text-encoder-lr 0.5 half as far.
    Prodigy's estimate then sees the moves as they were made. The hooks keep no state between steps,
    so checkpoints and resume are those of Prodigy itself."""
    pending = {}

    def before(opt, args, kwargs):
        base = opt.param_groups[0]["lr"]
        pending["lrs"] = [g["lr"] for g in opt.param_groups]
        pending["start"] = {id(p): p.detach().clone() for g in opt.param_groups if g["lr"] != base
                            for p in g["params"] if p.grad is not None}
        for g in opt.param_groups:
            g["lr"] = base

    @torch.no_grad()
    def after(opt, args, kwargs):
        base = pending["lrs"][0]
        for g, lr in zip(opt.param_groups, pending["lrs"]):
            g["lr"] = lr
            for p in g["params"]:
                start = pending["start"].get(id(p))
                if start is not None and base:
                    p.copy_(start.add_(p - start, alpha=lr / base))  # start + (its move) x lr / base
        pending.clear()

    prodigy.register_step_pre_hook(before)
    prodigy.register_step_post_hook(after)
    return prodigy


def _bitsandbytes_adamw(name: str, groups: list[dict], device: torch.device):
    """bitsandbytes' 8-bit AdamW (moments in 8 bits) and its paged variant (moments in CUDA unified memory,
    so they page to the CPU under memory pressure). Where a variant cannot run, a warning says so and the
    nearest one that can is used."""
    if name == "paged_adamw8bit" and device.type != "cuda":
        warnings.warn("paged optimizers page through CUDA unified memory; on the CPU, plain 8-bit AdamW is used",
                      stacklevel=3)
        name = "adamw8bit"
    try:
        bnb = bitsandbytes()
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups)
    # What a bitsandbytes build that cannot run this optimizer here raises (missing, too old, no kernels);
    # anything else (bad parameter groups, a bug) is not ours to hide.
    except (ImportError, AttributeError, RuntimeError, NotImplementedError) as err:
        warnings.warn(f"{name} is unavailable here ({type(err).__name__}: {err}); using torch AdamW", stacklevel=3)
        return torch.optim.AdamW(groups, foreach=True)


def train_mode(optimizer) -> None:
    """Schedule-free AdamW keeps two points: training steps at y, evaluation and the saved adapter use the
    average x. Switch to y (before steps); a no-op for the other optimizers."""
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()


def eval_mode(optimizer) -> None:
    """Switch schedule-free AdamW's parameters to x (before validation and the final adapter); a no-op else."""
    if hasattr(optimizer, "eval") and callable(optimizer.eval):
        optimizer.eval()

"""Sampler names users know (A1111's, in short form) mapped to diffusers scheduler classes."""

from __future__ import annotations

from .errors import SdloraError

# name -> (diffusers class name, extra config). Built fresh per call from the base's own config,
# so the training schedule (betas, prediction type) always comes from the model.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = "euler"


def make_scheduler(name: str, base_config):
    """A new scheduler instance (schedulers hold per-call state, so calls never share one)."""
    import diffusers

    if name not in SCHEDULERS:
        raise SdloraError(f"unknown scheduler '{name}'", f"choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)

"""Sampler names users know (A1111's, in short form) mapped to diffusers scheduler class names: a table
only (pipelines.make_scheduler builds them), so the CLI and the page can list them without diffusers."""

from __future__ import annotations

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

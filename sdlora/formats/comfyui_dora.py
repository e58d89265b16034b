"""DoRA magnitudes in the form today's ComfyUI applies exactly.

The paper (and PEFT, and sdlora) compute  W' = m * (W0 + dW) / ||W0 + dW||_c  per output row.
ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py), for a `dora_scale` on the output axis, divides by
the norm of W0 instead:  W'_comfy = (W0 + dW) * dora_scale / (||W0||_c + eps)  (its open PR #15458 changes
that). A file meant for today's ComfyUI therefore stores

    dora_scale = m * ||W0||_c / ||W0 + dW||_c          (out,)

which that formula turns back into the paper's W' (to within its eps, 1.2e-7 in float32). Only the base
knows W0, so the conversion needs it; the file says so in its metadata (METADATA_KEY), and sdlora reading
such a file with its base turns the magnitudes back. At strength s ComfyUI applies W0 + s * (W'_comfy - W0),
which is what sdlora's mixer does with a DoRA adapter at weight s.
"""

from __future__ import annotations

import torch

from ..adapters.functional import lora_delta, weight_norm_per_output
from ..errors import SdloraError
from .adapter import AdapterFile, ModuleWeights

METADATA_KEY = "sdlora_dora_scale"
METADATA_VALUE = "divided by the norm of W0 + dW times the norm of W0, for ComfyUI's weight_decompose"


def _norm_ratio(m: ModuleWeights, w0: torch.Tensor) -> torch.Tensor:
    """||W0||_c / ||W0 + dW||_c, (out,), in float64."""
    w0 = w0.double()
    dw = lora_delta(m.down.double(), m.up.double(), m.scale).reshape(w0.shape)
    return weight_norm_per_output(w0) / weight_norm_per_output(w0 + dw)


def _converted(af: AdapterFile, base_weight, invert: bool) -> AdapterFile:
    modules = {}
    for key, m in af.modules.items():
        if m.magnitude is None:
            modules[key] = m
            continue
        ratio = _norm_ratio(m, base_weight(key))
        mag = m.magnitude.double() / ratio if invert else m.magnitude.double() * ratio
        modules[key] = ModuleWeights(m.method, m.down, m.up, m.scale, {**m.parts, "magnitude": mag.float()}, m.dense)
    return AdapterFile(modules, af.method, af.base_family, af.format, dict(af.config), list(af.trigger_words),
                       dict(af.training), dict(af.extra_metadata))


def for_comfyui(af: AdapterFile, base_weight) -> AdapterFile:
    """The adapter with every DoRA magnitude pre-divided as ComfyUI needs; base_weight(key) -> W0 (float)."""
    if not any(m.magnitude is not None for m in af.modules.values()):
        raise SdloraError("--comfyui-dora is for DoRA adapters, and this one has no DoRA module",
                          "leave --comfyui-dora out")
    return _converted(af, base_weight, invert=False)


def from_comfyui(af: AdapterFile, base_weight) -> AdapterFile:
    """The inverse, for a file written by for_comfyui (METADATA_KEY in its metadata)."""
    return _converted(af, base_weight, invert=True)

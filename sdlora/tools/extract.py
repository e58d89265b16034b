"""Extract a LoRA from a fine-tuned model: truncated SVD of (tuned - base) per target layer."""

from __future__ import annotations

import math

from ..errors import SdloraError
from ..formats.adapter import AdapterFile, ModuleWeights
from ..inject import text_encoder_targets, unet_targets
from ..quant import dequantized_weight
from .lowrank import truncate
from .merge import MergeReport


def extract(base, tuned, targets: str = "all", text_encoder: bool = True, rank: int | None = None,
            energy: float | None = None, min_relative_change: float = 1e-6) -> tuple[AdapterFile, MergeReport]:
    """Both arguments are loaded bases (pipelines.Base) of one architecture. Layers whose weights
    did not change (relative difference below `min_relative_change`) are left out."""
    if base.family != tuned.family:
        raise SdloraError(f"the tuned model is {tuned.family}, the base {base.family}", "extract from a fine-tune of this base")
    modules: dict[str, ModuleWeights] = {}
    err_sq = norm_sq = 0.0
    kept = 0
    tuned_models = tuned.models()
    for role, model in base.models().items():
        if role != "unet" and not text_encoder:
            continue
        names = unet_targets(model, targets) if role == "unet" else text_encoder_targets(model)
        for name in names:
            w0 = dequantized_weight(model.get_submodule(name)).float()
            try:
                w1 = dequantized_weight(tuned_models[role].get_submodule(name)).float()
            except (KeyError, AttributeError):
                raise SdloraError(f"the tuned model has no {role}.{name}", "extract from a fine-tune of this base") from None
            if w0.shape != w1.shape:
                raise SdloraError(f"{role}.{name} is {tuple(w1.shape)} in the tuned model but {tuple(w0.shape)} in the base",
                                  "extract from a fine-tune of this base")
            delta = (w1 - w0).reshape(w0.shape[0], -1)
            if float(delta.norm()) <= min_relative_change * float(w0.norm()):
                continue
            down, up, r, err, total = truncate(delta, tuple(w0.shape[2:]), rank, energy)
            modules[f"{role}/{name}"] = ModuleWeights("lora", down, up, 1.0)
            err_sq, norm_sq, kept = err_sq + err, norm_sq + total, max(kept, r)
    if not modules:
        raise SdloraError("the tuned model's target layers equal the base's", "check that the right models were given")
    config = {"method": "lora", "extracted": True, "targets": targets, "text_encoder": text_encoder}
    return AdapterFile(modules, "lora", base.family, "sdlora", config), \
        MergeReport(len(modules), kept, math.sqrt(err_sq / norm_sq) if norm_sq else 0.0)

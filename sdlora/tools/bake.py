"""Bake a mix into the base and write a diffusers folder with no adapters left in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from ..atomic import atomic_folder
from ..errors import SdloraError
from ..inject import adapter_layers, unwrap
from ..quant import is_quantized


@dataclass
class BakeReport:
    folder: Path
    layers: int  # layers the mix changed
    requantization_error: float  # ||requant(W0 + D) - (W0 + D)|| / ||D||, over those layers; 0 for float bases

    def __str__(self):
        text = f"{self.folder}: {self.layers} layers baked"
        if self.requantization_error:
            text += (f"; requantization error {self.requantization_error:.1%} of the mix's change (Frobenius norms); "
                     "bake into a float base (--quant none) for an exact result")
        return text


def bake(base, mix, out_dir: str | Path) -> BakeReport:
    """Fuse `mix` into the base and save the whole pipeline to `out_dir` (written to a temporary
    sibling, then renamed). Float bases: exact. Quantized bases: each changed layer is dequantized,
    merged and requantized the way it was quantized, and the folder holds those values as float
    weights, so it computes what the quantized model would; the error is reported. The base
    itself is left exactly as it was."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SdloraError(f"{out} exists and is not empty", "pass a new folder to --out")
    quantized = any(is_quantized(layer.base_layer) for layer in base.mixer.layers().values()) or base.quant
    scheduler = _trained_schedule(base, mix)
    with atomic_folder(out) as tmp:
        layers, err = (_bake_quantized if quantized else _bake_float)(base, mix, tmp, scheduler)
    return BakeReport(out, layers, err)


def _trained_schedule(base, mix) -> dict:
    """The scheduler the baked folder needs: the base's own, unless the mix's adapters were trained for another
    prediction type or for zero terminal SNR (their training summaries say), which the folder must then carry.
    Returns `save`'s replacement components: {} or {"scheduler": ...}."""
    wanted = set()
    for name, weights in mix.adapters.items():
        training = base.adapter_info.get(name, {}).get("training") or {}
        if "prediction_type" in training and weights.unet != 0:  # what the UNet predicts is the UNet's part
            wanted.add((training["prediction_type"], bool(training.get("zero_terminal_snr"))))
    if len(wanted) > 1:
        raise SdloraError(f"the mix's adapters were trained for different schedules: {sorted(wanted)}",
                          "bake adapters trained with one --prediction-type and --zero-terminal-snr setting")
    config = base.pipe.scheduler.config
    current = (config.get("prediction_type", "epsilon"), bool(config.get("rescale_betas_zero_snr", False)))
    if not wanted or wanted == {current}:
        return {}
    from ..pipelines import retrained_scheduler

    return {"scheduler": retrained_scheduler(base, *wanted.pop())}


def _bake_quantized(base, mix, tmp: Path, scheduler: dict) -> tuple[int, float]:
    import torch

    from ..quant import float_state_dict, requantized

    base.mixer._validate([mix], "unfused")  # the same checks as any call: names loaded, weights sane
    lost_sq = change_sq = 0.0
    changed = 0
    new_models = {}
    for role, model in base.models().items():
        replace = {}
        for name, layer in adapter_layers(model).items():
            weights = {n: w.weight_for(layer.region, 0) for n, w in mix.adapters.items() if n in layer.adapters}
            weights = {n: w for n, w in weights.items() if w != 0.0}
            if not weights:
                continue
            with torch.no_grad():
                delta = layer.delta_weight(weights).float().cpu()
                merged = layer.base_weight().float().cpu() + delta
                replace[name] = requantized(layer.base_layer, merged).reshape(merged.shape)
            lost_sq += float((replace[name] - merged).pow(2).sum())
            change_sq += float(delta.pow(2).sum())
            changed += 1
        sd = float_state_dict(model, replace)
        fresh = type(model).from_config(model.config) if hasattr(type(model), "from_config") else type(model)(model.config)
        fresh.load_state_dict(sd, strict=True)
        new_models[role] = fresh
    base.save(tmp, **new_models, **scheduler)
    return changed, (lost_sq / change_sq) ** 0.5 if change_sq else 0.0


def _bake_float(base, mix, tmp: Path, scheduler: dict) -> tuple[int, float]:
    changed = 0
    with base.mixer.apply(mix, mode="fused"):
        wrappers = {role: adapter_layers(model) for role, model in base.models().items()}
        changed = sum(1 for layers in wrappers.values() for layer in layers.values()
                      if any(mix.adapters[n].weight_for(layer.region, 0) for n in mix.adapters if n in layer.adapters))
        try:
            for model in base.models().values():
                unwrap(model)  # the plain modules, now holding W0 + sum w_i D_i
            base.save(tmp, **scheduler)
        finally:
            for role, model in base.models().items():
                for name, layer in wrappers[role].items():
                    model.set_submodule(name, layer)  # the wrappers back where unwrap took them from
    return changed, 0.0

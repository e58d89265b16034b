"""diffusers / PEFT layout: "unet.<path>.lora_A.weight", "lora_B.weight", DoRA's
"lora_magnitude_vector", alpha in the `lora_adapter_metadata` JSON ("unet.lora_alpha", with
per-module values in "unet.alpha_pattern")."""

from __future__ import annotations

import json

import torch

from ..errors import SdloraError
from .adapter import ROLES, AdapterFile, ModuleWeights, scalar

METADATA_KEY = "lora_adapter_metadata"
# Real files name CLIP modules from "text_model.", whatever the installed transformers calls them.
_TE_PREFIX = "text_model."


def is_peft(keys) -> bool:
    return any(k.split(".", 1)[0] in ROLES and (".lora_A." in k or ".lora_B." in k) for k in keys)


def _file_path(role: str, path: str) -> str:
    return f"{role}.{_TE_PREFIX}{path}" if role != "unet" and not path.startswith(_TE_PREFIX) else f"{role}.{path}"


def to_state_dict(af: AdapterFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .kohya import refuse_unportable

    refuse_unportable(af, "diffusers")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for role in af.roles():
        mods = {k.split("/", 1)[1]: m for k, m in af.modules.items() if k.startswith(role + "/")}
        ranks = {m.rank for m in mods.values()}
        first = next(iter(mods.values()))
        meta.update({f"{role}.r": first.rank, f"{role}.lora_alpha": first.alpha,
                     f"{role}.target_modules": sorted(mods), f"{role}.use_dora": any(m.magnitude is not None for m in mods.values()),
                     f"{role}.rank_pattern": {p: m.rank for p, m in mods.items()} if len(ranks) > 1 else {},
                     f"{role}.alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != first.alpha}})
        for path, m in mods.items():
            fp = _file_path(role, path)
            tensors[f"{fp}.lora_A.weight"], tensors[f"{fp}.lora_B.weight"] = m.down, m.up
            if m.magnitude is not None:
                # PEFT keeps a Conv2d's magnitude as (1, out, 1, 1), a Linear's as (out,).
                conv = m.down.dim() == 4
                tensors[f"{fp}.lora_magnitude_vector"] = m.magnitude.reshape(1, -1, 1, 1) if conv else m.magnitude
    return tensors, {METADATA_KEY: json.dumps(meta, sort_keys=True), "format": "pt"}


def from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict, path: str) -> AdapterFile:
    meta = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, t in tensors.items():
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_magnitude_vector", "mag"),
                             (".lora_magnitude_vector.weight", "mag"), (".alpha", "alpha")):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                role, _, mpath = module.partition(".")
                if role in ROLES:
                    mpath = mpath.removeprefix(_TE_PREFIX)
                    parts.setdefault(f"{role}/{mpath}", {})[part] = t
                    break
        else:
            unknown.append(name)
    modules = {}
    for key, p in parts.items():
        if "down" not in p or "up" not in p:
            raise SdloraError(f"{path}: module '{key}' lacks lora_A or lora_B", "re-export the adapter")
        role, mpath = key.split("/", 1)
        rank = p["down"].shape[0]
        alpha = meta.get(f"{role}.alpha_pattern", {}).get(mpath, meta.get(f"{role}.lora_alpha"))
        if "alpha" in p:  # older diffusers files carry kohya-style alphas
            alpha = scalar(p["alpha"], f"{path}: '{key}' alpha")
        try:
            scale = (float(alpha) if alpha is not None else rank) / rank
        except (TypeError, ValueError):
            raise SdloraError(f"{path}: the lora_alpha of '{key}' in its metadata is {alpha!r}, not a number",
                              "re-export the adapter") from None
        mag = p.get("mag")
        modules[key] = ModuleWeights("dora" if mag is not None else "lora", p["down"], p["up"], scale,
                                     {} if mag is None else {"magnitude": mag.reshape(-1)})
    method = "dora" if any(m.magnitude is not None for m in modules.values()) else "lora"
    af = AdapterFile(modules, method, None, "diffusers")
    af.extra_metadata = {"unknown_keys": unknown} if unknown else {}
    return af

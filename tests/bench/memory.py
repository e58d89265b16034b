"""Memory: resident bytes and bits per parameter of the base in each precision.

Variants: fp32; fp16; int8 on linear layers (what diffusers' bitsandbytes 8-bit path gives); NF4
with double quantization on linear layers only (diffusers' bitsandbytes 4-bit path); and ours,
NF4 on linear and conv layers and token tables ("nf4 linear+conv"). Bytes are counted from the tensors the model holds, quantization
constants included (sdlora.quant.resident_bytes)."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from sdlora.quant import QuantConv2d, quantize_linear, quantize_model, resident_bytes

from .common import CONFIGS, Row, sd15_text_encoder, sd15_unet, sd_vae, sdxl_text_encoder_2

VARIANTS = ("fp32", "fp16", "int8 linear", "nf4 linear", "nf4 linear+conv")


def _measure(model: nn.Module, variant: str) -> int:
    if variant == "fp16":
        return resident_bytes(model.half())
    if variant == "fp32":
        return resident_bytes(model)
    mode = "int8" if variant.startswith("int8") else "nf4"
    ours = variant.endswith("conv")  # ours: convs and token tables too; the others: diffusers' linear layers only
    return quantize_model(model, mode, convs=ours, embeddings=ours).resident_bytes


def _streamed_sdxl(variant: str) -> tuple[int, int]:
    """(params, resident bytes) of the SDXL UNet, built on the meta device and materialised one
    layer at a time (each quantized as soon as it exists), so 2.6 B parameters never sit in fp32."""
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / "sdxl_unet.json").read_text())
    config.pop("_class_name")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    params = sum(p.numel() for p in unet.parameters())
    if variant in ("fp32", "fp16"):
        return params, params * (4 if variant == "fp32" else 2)
    mode = "int8" if variant.startswith("int8") else "nf4"
    torch.manual_seed(0)
    for name, m in list(unet.named_modules()):
        if not any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        m.to_empty(device="cpu", recurse=False)
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        wide = (m.in_features if isinstance(m, nn.Linear) else getattr(m, "in_channels", 0)) >= 16
        if type(m) is nn.Linear and wide:
            unet.set_submodule(name, quantize_linear(m, mode))
        elif type(m) is nn.Conv2d and wide and variant.endswith("conv"):
            unet.set_submodule(name, QuantConv2d(m, "nf4"))
    return params, resident_bytes(unet)


def run(machine: str, sdxl: bool = True) -> list[Row]:
    rows = []
    for label, build in (("sd15 unet", sd15_unet), ("sd15 text encoder", sd15_text_encoder)):
        pristine = build()
        params = sum(p.numel() for p in pristine.parameters())
        sizes = {v: _measure(copy.deepcopy(pristine), v) for v in VARIANTS}
        del pristine
        rows += _rows(label, params, sizes, machine, goal_bits=4.5 if label == "sd15 unet" else 5.0)
    sdxl_unet_sizes = {}
    if sdxl:
        for v in VARIANTS:
            params, sdxl_unet_sizes[v] = _streamed_sdxl(v)
        rows += _rows("sdxl unet", params, sdxl_unet_sizes, machine, goal_bits=None)
    rows += pipeline_rows(machine, sdxl_unet_sizes)
    return rows


def _sizes(build) -> tuple[int, dict[str, int]]:
    """(float parameters, bytes as fp32 / ours NF4 / diffusers' bitsandbytes NF4) of one model."""
    model = build()
    params = sum(p.numel() for p in model.parameters())
    sizes = {"fp32": resident_bytes(model), "nf4 linear": _measure(copy.deepcopy(model), "nf4 linear"),
             "ours": _measure(model, "nf4 linear+conv")}
    return params, sizes


def pipeline_rows(machine: str, sdxl_unet: dict[str, int]) -> list[Row]:
    """The whole pipeline's resident size: UNet, text encoder(s) and VAE; NF4 as ours (the VAE stays float: it
    runs once per picture and quantizing it blurs every picture) against fp32 and diffusers' bitsandbytes NF4."""
    vae_params, vae = _sizes(sd_vae)
    te_params, te = _sizes(sd15_text_encoder)
    parts = {"sd15": [_sizes(sd15_unet), (te_params, te)]}
    if sdxl_unet:
        unet_params = _streamed_sdxl("fp32")[0]
        parts["sdxl"] = [(unet_params, {"fp32": sdxl_unet["fp32"], "nf4 linear": sdxl_unet["nf4 linear"],
                                        "ours": sdxl_unet["nf4 linear+conv"]}), (te_params, te),
                         _sizes(sdxl_text_encoder_2)]
    rows = []
    for family, models in parts.items():
        params = sum(p for p, _ in models) + vae_params
        total = {k: sum(s[k] for _, s in models) + vae["fp32"] for k in ("fp32", "nf4 linear", "ours")}
        note = (f"UNet, text encoder(s), VAE (float); {params / 1e6:.0f} M parameters; "
                f"{8 * total['ours'] / params:.2f} bits/param ours, {8 * total['nf4 linear'] / params:.2f} diffusers bnb")
        rows.append(Row(f"memory {family} pipeline nf4 ours (MB; ref fp32)", total["ours"] / 2**20,
                        total["fp32"] / 2**20, "MB", None, machine, note=note))
        rows.append(Row(f"memory {family} pipeline nf4 ours vs diffusers bnb nf4 (MB)", total["ours"] / 2**20,
                        total["nf4 linear"] / 2**20, "MB", None, machine, note=note))
    return rows


def _rows(label: str, params: int, sizes: dict[str, int], machine: str, goal_bits: float | None) -> list[Row]:
    fp32 = sizes["fp32"]
    rows = [Row(f"memory {label} {v} (MB; ref fp32)", sizes[v] / 2**20, fp32 / 2**20, "MB", None, machine,
                note=f"{8 * sizes[v] / params:.2f} bits/param over {params / 1e6:.0f} M parameters")
            for v in VARIANTS[1:]]
    ours, diffusers_nf4 = sizes["nf4 linear+conv"], sizes["nf4 linear"]
    rows.append(Row(f"memory {label} nf4 ours vs diffusers bnb nf4 (MB)", ours / 2**20, diffusers_nf4 / 2**20, "MB",
                    None, machine))
    rows.append(Row(f"memory {label} bits/param, ours nf4 (ref fp32)", 8 * ours / params, 32.0, "bits",
                    None if goal_bits is None else goal_bits / 32, machine,
                    note="" if goal_bits is None else f"goal: at most {goal_bits} bits per parameter"))
    return rows

"""Diffusers pipeline -> original (LDM / CompVis) single-file checkpoint layout, SD1 and SD2 UNets.

The inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
`convert_ldm_clip_checkpoint`, written from the UNet and VAE configs so it fits any depth and
width, including the embedded base. Pure functions over state dicts: no module is touched.
"""

from __future__ import annotations

import torch

from ..errors import SdloraError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _move(sd: dict, out: dict, src: str, dst: str, renames=()) -> None:
    """Copy every `src.<rest>` tensor to `dst.<rest>`, renaming parts of <rest>."""
    for key, value in sd.items():
        if key.startswith(src + "."):
            rest = key[len(src) + 1 :]
            for a, b in renames:
                rest = rest.replace(a, b)
            out[f"{dst}.{rest}"] = value


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """UNet2DConditionModel state dict -> `input_blocks / middle_block / output_blocks` keys."""
    per = config["layers_per_block"]
    n = len(config["block_out_channels"])
    out: dict = {}
    for src, dst in _UNET_FIXED.items():
        _move(sd, out, src, dst)
    for b in range(n):
        for j in range(per):
            i = 1 + b * (per + 1) + j  # LDM counts the downsampler as the (per+1)-th input block
            _move(sd, out, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET)
            _move(sd, out, f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1")
        _move(sd, out, f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (per + 1) + per}.0.op")
    _move(sd, out, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    _move(sd, out, "mid_block.attentions.0", "middle_block.1")
    _move(sd, out, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for b in range(n):
        has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
        for j in range(per + 1):
            i = b * (per + 1) + j
            _move(sd, out, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET)
            _move(sd, out, f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1")
        last = b * (per + 1) + per
        _move(sd, out, f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{last}.{2 if has_attn else 1}.conv")
    if len(out) != len(sd):
        missing = sorted(set(sd) - {k for k in sd if any(k.startswith(s + ".") for s in _UNET_FIXED)})[:3]
        raise SdloraError(f"UNet layout not understood: mapped {len(out)} of {len(sd)} tensors (e.g. {missing})",
                          "only SD1, SD2 and SDXL UNets convert to the single-file layout; save a diffusers folder")
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """AutoencoderKL state dict -> `encoder.down.N.block.M` / `decoder.up.N...` keys.
    LDM numbers decoder levels from the bottom, diffusers from the top; its attention
    projections are 1x1 convolutions, (C, C) -> (C, C, 1, 1)."""
    n = len(config["block_out_channels"])
    out: dict = {}
    for part in ("encoder", "decoder"):
        _move(sd, out, f"{part}.conv_in", f"{part}.conv_in")
        _move(sd, out, f"{part}.conv_out", f"{part}.conv_out")
        _move(sd, out, f"{part}.conv_norm_out", f"{part}.norm_out")
        for k in range(2):
            _move(sd, out, f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", [("conv_shortcut", "nin_shortcut")])
        attn: dict = {}
        _move(sd, attn, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)
        out.update({k: v[:, :, None, None] if v.ndim == 2 else v for k, v in attn.items()})
    for i in range(n):
        _move(sd, out, f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", [("conv_shortcut", "nin_shortcut")])
        _move(sd, out, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        _move(sd, out, f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block", [("conv_shortcut", "nin_shortcut")])
        _move(sd, out, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
    for name in ("quant_conv", "post_quant_conv"):
        _move(sd, out, name, name)
    if len(out) != len(sd):
        raise SdloraError(f"VAE layout not understood: mapped {len(out)} of {len(sd)} tensors",
                          "only SD-style AutoencoderKL VAEs convert to the single-file layout; save a diffusers folder")
    return out


def clip_to_ldm(sd: dict) -> dict:
    """CLIPTextModel state dict -> `cond_stage_model.transformer.text_model.*`, the name real
    SD1 checkpoints use whatever the installed transformers calls the modules (transformers 5
    dropped the `text_model.` level)."""
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def pipeline_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """An SD1-family pipeline's three models as one original-layout state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    out.update(clip_to_ldm(text_encoder.state_dict()))
    return {k: v.detach().contiguous() for k, v in out.items()}

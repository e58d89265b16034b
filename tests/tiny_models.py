"""Tiny SD1- and SDXL-family pipelines built from configs (random weights, no download).

The tokenizer is the embedded base's (a real CLIP BPE tokenizer); everything else is built here.
Shapes follow diffusers' own tiny test pipelines: 32x32 latents, 32-wide blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.pipelines import embedded_path


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1,
    )


def _clip_config(vocab_size: int, tokenizer, hidden: int = 32, projection: int = 32, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        hidden_act=act,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_tiny_sd2_v(folder: Path, seed: int = 0, zero_terminal_snr: bool = False) -> Path:
    """SD2 layout (OpenCLIP's gelu text encoder) with a v-prediction scheduler, as SD2-768 ships; with
    zero_terminal_snr, its betas rescaled as NoobAI v-pred's config says."""
    from diffusers import EulerDiscreteScheduler

    build_tiny_sd1(folder, seed, act="gelu")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type="v_prediction",
                                       rescale_betas_zero_snr=zero_terminal_snr)
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def build_tiny_sd1(folder: Path, seed: int = 0, act: str = "quick_gelu") -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_path() / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(len(tokenizer), tokenizer, act=act)), tokenizer=tokenizer,
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """SDXL layout: two text encoders (the second with a projection for pooled embeddings),
    a UNet conditioned on their concatenated hidden states (32 + 32) and on 'text_time'
    micro-conditioning (6 size numbers x 8 + pooled 32 = 80 inputs)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_path() / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(len(tokenizer), tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tokenizer), tokenizer)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder

"""The SDXL-family parts of the embedded base (issue 15, point 4): two text encoders and a UNet with SDXL's
added conditioning, small enough to train on two cores next to the SD1 base's VAE.

    python train_scripts/build_embedded_base.py --family sdxl --vae-from samples/embedded/vae \
        --out samples/embedded-sdxl

What makes it SDXL, as StableDiffusionXLPipeline and our trainer read it:
  - the cross-attention context is the penultimate hidden states of both encoders, concatenated:
    (B, 77, 64) + (B, 77, 64) -> (B, 77, 128);
  - the second encoder is a CLIPTextModelWithProjection whose projected end-of-text embedding (B, 64) is the
    pooled `text_embeds`;
  - the UNet's `text_time` added embedding takes those pooled embeddings plus six size ids
    (original h, w, crop top, left, target h, w), each through an 8-wide sinusoid: 64 + 6 * 8 = 112 inputs.
Both encoders share one tokenizer (SDXL's two tokenizers differ only in padding, which this base does not
need). `force_zeros_for_empty_prompt` is off: the unconditional model is learned from empty captions, as
for the SD1 base, so guidance needs the encoded empty prompt, not zeros.
"""

from __future__ import annotations

import torch

TIME_EMBED = 8  # addition_time_embed_dim: width of each size id's sinusoid


def make_models(vocab_size: int, bos: int, eos: int, latent_channels: int, latent_px: int, max_tokens: int):
    """(text_encoder, text_encoder_2, unet), initialised in that order from the current torch seed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config():
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_tokens, projection_dim=64,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )

    text_encoder = CLIPTextModel(config())
    text_encoder_2 = CLIPTextModelWithProjection(config())
    unet = UNet2DConditionModel(
        sample_size=latent_px, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(48, 96, 96), norm_num_groups=16, cross_attention_dim=128, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=64 + 6 * TIME_EMBED,
    )
    return text_encoder, text_encoder_2, unet


def conditioner(text_encoder, text_encoder_2, px: int):
    """A function ids (B, 77) -> (context (B, 77, 128), added_cond_kwargs), computed as
    StableDiffusionXLPipeline.encode_prompt does (clip_skip None: hidden_states[-2] of each encoder). Every
    training picture is a whole px x px picture, so its time ids are (px, px, 0, 0, px, px), the pipeline's
    default for a px x px request."""
    def condition(ids: torch.Tensor):
        first = text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (B, 77, 64)
        second = text_encoder_2(ids, output_hidden_states=True)
        context = torch.cat([first, second.hidden_states[-2]], dim=-1)  # (B, 77, 128)
        time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=context.dtype).repeat(len(ids), 1)  # (B, 6)
        return context, {"text_embeds": second.text_embeds, "time_ids": time_ids}  # text_embeds: (B, 64)

    return condition


def pipeline(vae, text_encoder, text_encoder_2, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
    )

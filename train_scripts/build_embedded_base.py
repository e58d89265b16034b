"""Train the embedded base: a tiny Stable Diffusion (SD1 layout) from scratch on drawn shapes.

    python train_scripts/build_embedded_base.py --out samples/embedded

Seeded and deterministic on the CPU; under 60 minutes on two cores with the default steps.
Stages: train the VAE (64x64x3 <-> 16x16x4) on a broad procedural texture corpus
(train_scripts/texture_corpus.py; never the sample style sets), on 32x32 crops first, then whole pictures,
with L1 + MSE plus an L1 on neighbour differences, so edges, fine periods and flat colours survive ->
standardise its 8 latent channels (a shift and scale folded into its 1x1 convs) ->
draw captioned shape pictures -> build a CLIP BPE tokenizer over their words -> encode all pictures
once -> train UNet and text encoder jointly on the diffusion loss (epsilon prediction, min-SNR
weighting, offset noise, 10% empty captions for guidance) -> save a diffusers folder. The folder is written to a
temporary sibling and renamed, so a crash leaves the previous base intact. `--vae-from DIR` reuses a
trained VAE (for instance a previous build's `vae/`) and skips its stage.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_scripts.shapes import (  # noqa: E402
    VOCAB_WORDS, background_name, draw_scene, dominant_foreground_color, random_scene)
from train_scripts.base_tokenizer import MAX_TOKENS, build_tokenizer, write_classic_tokenizer_files  # noqa: E402
from train_scripts.texture_corpus import corpus  # noqa: E402
from train_scripts import embedded_sdxl  # noqa: E402
from sdlora.atomic import atomic_folder  # noqa: E402

PX = 64  # picture side
LATENT_PX = 16  # VAE factor 4: three encoder blocks; 8 latent channels (see --latent-channels)


def make_dataset(n: int, seed: int, p_background: float):
    rng = random.Random(seed)
    scenes = [random_scene(rng, p_background=p_background) for _ in range(n)]
    pixels = np.stack([np.asarray(draw_scene(s, PX), dtype=np.float32) for s in scenes])  # (N, 64, 64, 3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, 64, 64) in [-1, 1]
    return images, [s.caption() for s in scenes]


def make_vae(channels: tuple[int, ...], layers: int, latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=PX,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(channels), layers_per_block=layers, norm_num_groups=16,
    )


def make_models(vocab_size: int, bos: int, eos: int, latent_channels: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))
    unet = UNet2DConditionModel(
        sample_size=LATENT_PX, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(48, 96, 96), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return text_encoder, unet


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def vae_loss(rec: torch.Tensor, x: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """L1 + MSE on pixels plus L1 on neighbour differences (both axes). rec, x: (B, 3, H, W) in [-1, 1].
    L1 alone settles on the median where the decoder is unsure, and a thin line covers fewer pixels than
    its ground, so it vanishes (a mosaic's grout lines: 13 dB); the MSE term makes big errors cost more,
    and the difference term pays for every edge and period kept. The KL term only keeps latents bounded,
    as in SD's VAE."""
    edges = F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2))
    return F.l1_loss(rec, x) + 2.0 * F.mse_loss(rec, x) + edges + 1e-6 * kl.mean()


def train_vae(vae, pictures, steps: int, batch: int, crop_share: float, gen: torch.Generator, log):
    """pictures: (N, 3, 64, 64) uint8. The first `crop_share` of the steps train on random 32x32 crops,
    four of them for the price of one whole picture (the networks are convolutional; textures are local),
    the rest on whole pictures so the mid-block attention sees the whole latent."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 100))
    vae.train()
    crop_steps = int(crop_share * steps)
    for step in range(steps):
        if step < crop_steps:
            x = pictures[torch.randint(len(pictures), (4 * batch,), generator=gen)]
            i, j = (int(v) for v in torch.randint(0, PX // 2 + 1, (2,), generator=gen))
            x = x[:, :, i : i + PX // 2, j : j + PX // 2]  # (4B, 3, 32, 32)
        else:
            x = pictures[torch.randint(len(pictures), (batch,), generator=gen)]
        x = x.float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = vae_loss(rec, x, post.kl())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()


@torch.no_grad()
def psnr(vae, pictures: torch.Tensor) -> float:
    """Mean reconstruction PSNR in dB on the 0-255 scale; pictures (N, 3, H, W) uint8."""
    x = pictures.float() / 127.5 - 1.0
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round()
    mse = (rec - pictures.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-3)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


@torch.no_grad()
def standardise_latents(vae, means: torch.Tensor) -> None:
    """Fold a per-channel shift and scale into the VAE's 1x1 quant convs, so that its latents have mean 0
    and std 1 in every channel while every decoded picture stays the same. means: (N, C, h, w) encoder means.

    SD pipelines know one scalar scaling_factor and no shift; a VAE trained with a tiny KL weight has
    channel means up to +-1.9 and stds from 0.6 to 2.0, so one scalar leaves some channels drowned in
    the diffusion noise and others far off the origin it starts from.
      encoder: mean' = (mean - mu) / sigma, logvar' = logvar - 2 log sigma      (quant_conv, 2C -> 2C)
      decoder: post_quant_conv(sigma * z' + mu) == post_quant_conv'(z')          (C -> C)
    """
    mu, sigma = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))  # (C,) each
    c = len(mu)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= sigma.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / sigma
    q.bias[c:] -= 2 * torch.log(sigma)
    p.bias += (p.weight[:, :, 0, 0] @ mu)
    p.weight *= sigma.view(1, c, 1, 1)


@torch.no_grad()
def encode_all(vae, images, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)  # (N, C, 16, 16) each


def save_pipeline(out: Path, vae, text_encoders, tokenizer, unet, summary: dict):
    """Write the diffusers folder atomically: a temporary sibling, then rename over `out`.
    text_encoders: (text_encoder,) for SD1, (text_encoder, text_encoder_2) for SDXL."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )
    if len(text_encoders) == 2:
        pipe = embedded_sdxl.pipeline(vae, *text_encoders, tokenizer, unet, scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    with atomic_folder(out, replace=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2")[: len(text_encoders)]:
            write_classic_tokenizer_files(tokenizer, tmp / name)
        (tmp / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
    return pipe


@torch.no_grad()
def colour_check(pipe, seeds=range(4), steps: int = 20) -> float:
    """Fraction of pictures whose dominant foreground colour is the one named (3 prompts)."""
    prompts = {"red": "a red circle", "blue": "a blue square", "green": "a green triangle"}
    hits = total = 0
    for colour, prompt in prompts.items():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        imgs = pipe([prompt] * len(gens), generator=gens, num_inference_steps=steps, guidance_scale=5.0,
                    height=PX, width=PX).images
        hits += sum(dominant_foreground_color(im) == colour for im in imgs)
        total += len(imgs)
    return hits / total


@torch.no_grad()
def binding_check(pipe, seeds=range(4), steps: int = 20) -> float:
    """Fraction of pictures with both the named shape colour and the named background (3 prompts)."""
    prompts = [("yellow", "black"), ("red", "blue"), ("blue", "yellow")]
    hits = total = 0
    for colour, ground in prompts:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        imgs = pipe([f"a {colour} circle on a {ground} background"] * len(gens), generator=gens,
                    num_inference_steps=steps, guidance_scale=5.0, height=PX, width=PX).images
        hits += sum(dominant_foreground_color(im) == colour and background_name(im) == ground for im in imgs)
        total += len(imgs)
    return hits / total


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("samples/embedded"))
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                    help="sdxl: two text encoders and SDXL's added conditioning (train_scripts/embedded_sdxl.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8192, help="captioned shape pictures for the UNet")
    # Named backgrounds are where attribute binding is learned ("a yellow circle on a black background"):
    # at 0.35 the base drew dark green for black; more of them, more binding.
    ap.add_argument("--p-background", type=float, default=0.6, help="share of captions that name the background")
    ap.add_argument("--vae-images", type=int, default=16384, help="texture corpus pictures for the VAE")
    # Small batches, many steps: at equal compute (48,000 crops), 3,000 steps of 16 crops reached 26.4 dB on
    # held-out corpus pictures where 750 steps of 64 reached 23.3 (mosaic set 15.9 vs 12.7 dB).
    ap.add_argument("--vae-steps", type=int, default=12000)
    ap.add_argument("--vae-batch", type=int, default=4, help="whole pictures per VAE step (or 4x as many crops)")
    ap.add_argument("--vae-crop-share", type=float, default=0.8, help="share of VAE steps on 32x32 crops")
    ap.add_argument("--vae-channels", default="32,64,64")
    ap.add_argument("--vae-layers", type=int, default=1)
    # 8, not SD1's 4: at factor 4 a 4-channel latent has no room for two colours plus a stripe's phase and
    # angle, so a VAE trained on broad textures learns to blur fine periods away. After 2,400 steps of 64
    # crops: 4 channels kept stripes 19.0 / mosaic 11.9 dB, 8 channels 24.0 / 21.1. 16 (as SD3's VAE) keeps
    # more (12,000 steps of 16 crops: stripes 29.1, mosaic 26.8 dB), but this small UNet then learns the
    # prompt far later: colour check 0.17 after 2,000 steps, where with 8 channels it was 1.0 after 1,500.
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse this trained VAE folder; skip its stage")
    ap.add_argument("--vae-only", action="store_true", help="train the VAE, save it to --out, stop")
    ap.add_argument("--unet-steps", type=int, default=2500)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--noise-offset", type=float, default=0.1, help="per-channel constant noise share (0: plain noise)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def vae_stage(args, summary: dict, log, t0: float):
    """Train the VAE on the texture corpus (or reuse --vae-from, with its record); add its figures to `summary`."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
        # A VAE saved by --vae-only carries its stage's record: keep it, so BUILD.json describes the whole build.
        record = args.vae_from / "BUILD.json"
        if record.is_file():
            summary.update({k: v for k, v in json.loads(record.read_text()).items() if k.startswith(("vae_", "latent_"))})
        summary["vae_from"] = str(args.vae_from)
        log(f"VAE reused from {args.vae_from}")
    else:
        pictures = torch.from_numpy(corpus(args.vae_images, args.seed, PX)).permute(0, 3, 1, 2).contiguous()
        log(f"texture corpus: {len(pictures)} pictures")
        vae = make_vae(tuple(int(c) for c in args.vae_channels.split(",")), args.vae_layers, args.latent_channels)
        train_vae(vae, pictures, args.vae_steps, args.vae_batch, args.vae_crop_share, gen, log)
        summary.update(vae_images=args.vae_images, vae_steps=args.vae_steps, vae_batch=args.vae_batch,
                       vae_crop_share=args.vae_crop_share, vae_channels=args.vae_channels, vae_layers=args.vae_layers,
                       latent_channels=args.latent_channels, vae_seconds=round(time.time() - t0, 1))
    held_out = torch.from_numpy(corpus(256, args.seed + 1, PX)).permute(0, 3, 1, 2).contiguous()
    summary["vae_psnr_corpus_held_out"] = round(psnr(vae, held_out), 2)
    log(f"VAE PSNR on held-out corpus pictures: {summary['vae_psnr_corpus_held_out']} dB")
    return vae


def unet_data(args, vae, log) -> dict:
    """Captioned shape pictures encoded once (latents standardised, then one SD scaling factor), the
    tokenizer, every caption tokenized once (index 0: the empty caption), and the fresh models (made
    right after the tokenizer: their initialisation draws from the stage's seed in this order)."""
    images, captions = make_dataset(args.images, args.seed, args.p_background)
    tokenizer = build_tokenizer(VOCAB_WORDS)
    log(f"{len(images)} pictures, tokenizer of {len(tokenizer)} tokens")
    if args.family == "sdxl":
        *text_encoders, unet = embedded_sdxl.make_models(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, vae.config.latent_channels,
            LATENT_PX, MAX_TOKENS)
    else:
        text_encoder, unet = make_models(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                         vae.config.latent_channels)
        text_encoders = [text_encoder]
    means, stds = encode_all(vae, images)
    standardise_latents(vae, means)
    means, stds = encode_all(vae, images)  # (N, C, 16, 16): now 0 +- 1 per channel
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents encoded, scaling factor {scaling:.4f}")
    # Padded to 77 as the pipeline does.
    texts = [""] + sorted(set(captions))
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    return {"means": means, "stds": stds, "scaling": scaling, "tokenizer": tokenizer, "ids": ids,
            "caption_index": torch.tensor([texts.index(c) for c in captions]), "text_encoders": text_encoders,
            "unet": unet}


def unet_stage(args, vae, summary: dict, log) -> None:
    """Train the UNet and text encoder jointly on the diffusion loss; save (and check) every --save-every steps.
    It starts from its own seeds, so a build that reuses a VAE (--vae-from) trains the same UNet and text
    encoder as the full build that made that VAE."""
    from diffusers import DDPMScheduler

    t_unet = time.time()
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = unet_data(args, vae, log)
    means, stds, scaling, ids, caption_index = (data[k] for k in ("means", "stds", "scaling", "ids", "caption_index"))
    tokenizer, text_encoders, unet = data["tokenizer"], data["text_encoders"], data["unet"]
    if args.family == "sdxl":
        condition = embedded_sdxl.conditioner(*text_encoders, PX)
    else:
        condition = lambda ids: (text_encoders[0](ids)[0], None)  # noqa: E731  (B, 77, 64), no added kwargs
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alphas = noise_sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + [p for te in text_encoders for p in te.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.unet_steps, 100))
    summary.update(unet_steps=args.unet_steps, unet_batch=args.unet_batch, lr=args.lr, noise_offset=args.noise_offset,
                   scaling_factor=scaling)
    for step in range(args.unet_steps):
        for model in (unet, *text_encoders):
            model.train()
        idx = torch.randint(len(means), (args.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling  # (B, C, 16, 16)
        cap = caption_index[idx].clone()
        cap[torch.rand(len(cap), generator=gen) < 0.1] = 0  # empty caption: learns the unconditional model
        # Offset noise (a per-picture, per-channel constant added to the noise; Guttenberg 2023): without it
        # the model never sees a noisy latent whose mean disagrees with its caption, so the mean of the
        # starting noise survives sampling and tints flat grounds (blue drawn gray-blue, gray drawn pink).
        noise = torch.randn(latents.shape, generator=gen)
        noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden, added = condition(ids[cap])  # (B, 77, 64), SDXL (B, 77, 128) and its pooled / time ids
        pred = unet(noisy, t, hidden, added_cond_kwargs=added).sample
        # min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction: min(snr, 5) / snr.
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
        if step == args.unet_steps - 1 or (step + 1) % args.save_every == 0:
            for model in (unet, *text_encoders):
                model.eval()
            unet_seconds = time.time() - t_unet
            summary.update(steps_done=step + 1, unet_stage_seconds=round(unet_seconds, 1),
                           seconds=round(summary.get("vae_seconds", 0.0) + unet_seconds, 1))
            pipe = save_pipeline(args.out, vae, text_encoders, tokenizer, unet, summary)
            pipe.set_progress_bar_config(disable=True)
            acc, bound = colour_check(pipe), binding_check(pipe)
            summary.update(colour_check=acc, binding_check=round(bound, 3))
            (args.out / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
            log(f"saved {args.out} after {step + 1} steps; colour check {acc:.2f}, binding check {bound:.2f}")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    summary = {"base_version": 2, "family": args.family, "seed": args.seed, "images": args.images,
               "p_background": args.p_background}
    vae = vae_stage(args, summary, log, t0)
    if args.vae_only:
        vae.save_pretrained(args.out, safe_serialization=True)
        (args.out / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"VAE saved to {args.out}")
        return
    unet_stage(args, vae, summary, log)
    log("done")


if __name__ == "__main__":
    main()

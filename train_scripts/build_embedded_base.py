"""Train the embedded base: a tiny Stable Diffusion (SD1 layout) from scratch on drawn shapes.

    python train_scripts/build_embedded_base.py --out samples/embedded

Seeded and deterministic on the CPU; about 35 minutes on two cores with the default steps.
Stages: draw captioned pictures -> build a CLIP BPE tokenizer over their words -> train the VAE
(64x64x3 <-> 16x16x4) -> encode all pictures once -> train UNet and text encoder jointly on the
diffusion loss (epsilon prediction, min-SNR weighting, 10% empty captions for guidance) -> save a
diffusers folder. The folder is written to a temporary sibling and renamed, so a crash leaves the
previous base intact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_scripts.shapes import VOCAB_WORDS, draw_scene, dominant_foreground_color, random_scene  # noqa: E402

PX = 64  # picture side
LATENT_PX = 16  # VAE factor 4: three encoder blocks
MAX_TOKENS = 77  # as in every SD text encoder, so prompts pad the way users expect


def build_tokenizer(words: list[str]):
    """A CLIP byte-level BPE tokenizer in which each word of `words` is one token.

    The vocabulary starts with the 256 byte symbols and their end-of-word forms (so any text
    still tokenizes, as in CLIP), then one merge chain per word, then the two special tokens.
    Merges are added until the real tokenizer returns each word whole.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []

    def make():
        v = dict(vocab)
        v["<|startoftext|>"] = len(v)
        v["<|endoftext|>"] = len(v)
        return CLIPTokenizer(vocab=v, merges=list(merges), model_max_length=MAX_TOKENS)

    for word in words:
        for _ in range(4 * len(word)):
            pieces = make().tokenize(word)
            if len(pieces) == 1:
                break
            left, right = pieces[0], pieces[1]
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
        else:
            raise RuntimeError(f"could not make {word!r} a single token")
    return make()


def write_classic_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for tools that read only the classic pair."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_dataset(n: int, seed: int):
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(draw_scene(s, PX), dtype=np.float32) for s in scenes])  # (N, 64, 64, 3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, 64, 64) in [-1, 1]
    return images, [s.caption() for s in scenes]


def make_models(vocab_size: int, bos: int, eos: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=PX,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))
    unet = UNet2DConditionModel(
        sample_size=LATENT_PX, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return vae, text_encoder, unet


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, images, steps: int, batch: int, gen: torch.Generator, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 50))
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        # Reconstruction dominates; the KL term only keeps latents bounded, as in SD's VAE.
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)  # (N, 4, 16, 16) each


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, summary: dict):
    """Write the diffusers folder atomically: a temporary sibling, then rename over `out`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_classic_tokenizer_files(tokenizer, tmp / "tokenizer")
    (tmp / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; the folder is meant to be shared
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("samples/embedded"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, captions = make_dataset(args.images, args.seed)
    tokenizer = build_tokenizer(VOCAB_WORDS)
    log(f"{len(images)} pictures, tokenizer of {len(tokenizer)} tokens")
    vae, text_encoder, unet = make_models(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)

    train_vae(vae, images, args.vae_steps, args.vae_batch, gen, log)
    means, stds = encode_all(vae, images)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents encoded, scaling factor {scaling:.4f}")

    # Captions tokenized once, padded to 77 as the pipeline does; index 0 is the empty caption.
    texts = [""] + sorted(set(captions))
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([texts.index(c) for c in captions])

    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alphas = noise_sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.unet_steps, 100))
    summary = {"seed": args.seed, "images": args.images, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
               "unet_batch": args.unet_batch, "lr": args.lr, "scaling_factor": scaling}
    for step in range(args.unet_steps):
        unet.train()
        text_encoder.train()
        idx = torch.randint(len(images), (args.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling  # (B, 4, 16, 16)
        cap = caption_index[idx].clone()
        cap[torch.rand(len(cap), generator=gen) < 0.1] = 0  # empty caption: learns the unconditional model
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text_encoder(ids[cap])[0]  # (B, 77, 64)
        pred = unet(noisy, t, hidden).sample
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
        last = step == args.unet_steps - 1
        if last or (step + 1) % args.save_every == 0:
            unet.eval()
            text_encoder.eval()
            summary.update(steps_done=step + 1, seconds=round(time.time() - t0, 1))
            pipe = save_pipeline(args.out, vae, text_encoder, tokenizer, unet, summary)
            pipe.set_progress_bar_config(disable=True)
            acc = colour_check(pipe)
            summary["colour_check"] = acc
            (args.out / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
            log(f"saved {args.out} after {step + 1} steps; colour check {acc:.2f}")
    log("done")


if __name__ == "__main__":
    main()

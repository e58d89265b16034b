"""What a run shows of its progress: pictures for fixed prompts and seeds, and a held-out loss."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..mixing import Mix
from .loss import target_for
from .text_cache import unet_conditioning


def holdout_indices(count: int, split: float, seed: int) -> list[int]:
    """The pictures kept out of training to measure a validation loss: floor(count x split) of them,
    chosen by the seed (none when that is 0)."""
    k = int(count * split)
    return sorted(random.Random(f"{seed}:holdout").sample(range(count), k)) if k else []


@torch.no_grad()
def validation_loss(base, name: str, latents: list[torch.Tensor], cond: tuple, noise_scheduler,
                    scaling: float, seed: int, time_ids: list[torch.Tensor] | None = None) -> float:
    """Mean plain MSE of the UNet's prediction on held-out latents, under the adapter.

    latents: per picture (C, h, w), the VAE posterior mean; cond: their captions' hidden states
    (N, 77, dim) and pooled embeddings (N, proj) or None; time_ids: SDXL's (6,) per picture.
    Each picture is scored at four timesteps spread over the schedule with noise from `seed`, the
    same every time, so the curve moves only because the adapter does."""
    unet = base.pipe.unet
    device = unet.device
    total_t = noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([total_t // 8, 3 * total_t // 8, 5 * total_t // 8, 7 * total_t // 8])
    gen = torch.Generator().manual_seed(seed)
    losses = []
    hidden, pooled = cond
    n = len(timesteps)
    with base.mixer.apply(Mix({name: 1.0}), mode="unfused"):
        for i, (lat, h) in enumerate(zip(latents, hidden)):
            x0 = (lat[None] * scaling).expand(len(timesteps), -1, -1, -1).to(device)  # (4, 4, h, w)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, timesteps.to(device))
            kwargs = unet_conditioning(h[None].expand(n, -1, -1).to(device),
                                       None if pooled is None else pooled[i][None].expand(n, -1).to(device),
                                       None if time_ids is None else time_ids[i][None].expand(n, -1))
            pred = unet(noisy, timesteps.to(device), **kwargs).sample
            target = target_for(noise_scheduler, x0, noise, timesteps.to(device))
            losses.append((pred.float() - target.float()).pow(2).mean().item())
    return sum(losses) / len(losses)


def validation_grid(base, name: str, prompts, seeds: int, step: int, out_dir: Path) -> Path:
    """OUT_DIR/samples/step-N.png: each validation prompt for fixed seeds, without (first row) and
    with the adapter (second row), so progress is seen against the same noise every time."""
    from ..generate import GenerateSettings, generate, labelled_grid, save_png

    training = base.pipe.unet.training
    base.pipe.unet.eval()
    rows, labels = [], []
    for prompt in prompts:
        settings = GenerateSettings(prompts=(prompt,), num=seeds, seed=0, steps=20)
        rows.append([r.image for r in generate(base, settings, progress=False)])
        rows.append([r.image for r in generate(base, settings, progress=False, mix=Mix({name: 1.0}))])
        labels += [f"{prompt} (base)", f"{prompt} (step {step})"]
    base.pipe.unet.train(training)
    return save_png(labelled_grid(rows, labels), out_dir / "samples" / f"step-{step:06d}.png")

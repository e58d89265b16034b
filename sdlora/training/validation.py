"""What a run shows of its progress: pictures for fixed prompts and seeds, and a held-out loss."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import SdloraError
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


# kohya's sample-prompt options: "PROMPT --n NEGATIVE --w W --h H --d SEED --s STEPS --l GUIDANCE --ss SAMPLER"
_OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance", "ss": "scheduler"}


def parse_sample_prompt(line: str, where: str = "a validation prompt") -> dict:
    """One prompt line in kohya's sample-prompt form -> GenerateSettings fields (prompt and what it sets)."""
    import re

    parts = re.split(r"\s--(\w+)\s*", " " + line.strip())
    fields = {"prompts": (parts[0].strip(),)}
    for key, value in zip(parts[1::2], parts[2::2]):
        if key not in _OPTIONS:
            raise SdloraError(f"{where}: unknown option --{key} in {line.strip()!r}",
                              "use --n negative, --w/--h size, --d seed, --s steps, --l guidance, --ss sampler")
        field, value = _OPTIONS[key], value.strip()
        try:
            fields[field] = (int(value) if field in ("width", "height", "seed", "steps") else
                             float(value) if field == "guidance" else value)
        except ValueError:
            raise SdloraError(f"{where}: --{key} {value!r} is not a number", "fix the prompt line") from None
    if not fields["prompts"][0]:
        raise SdloraError(f"{where}: no prompt before the options in {line.strip()!r}", "put the prompt first")
    return fields


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """A kohya prompt file: one prompt per line (blank lines and # comments skipped), each checked now."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SdloraError(f"cannot read the prompt file {path} ({err})", "pass a UTF-8 text file") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    for k, line in enumerate(prompts):
        parse_sample_prompt(line, f"{path}, prompt {k + 1}")
    return prompts


def with_prompt_file(cfg):
    """cfg with the prompt file's lines joined to --validation-prompt's, every one of them checked."""
    from dataclasses import replace

    for k, line in enumerate(cfg.validation_prompts):
        parse_sample_prompt(line, f"--validation-prompt {k + 1}")
    if not cfg.validation_prompt_file:
        return cfg
    return replace(cfg, validation_prompts=cfg.validation_prompts + read_prompt_file(cfg.validation_prompt_file))


def validation_grid(base, name: str, prompts, seeds: int, step: int, out_dir: Path) -> Path:
    """OUT_DIR/samples/step-N.png: each validation prompt for fixed seeds, without (first row) and
    with the adapter (second row), so progress is seen against the same noise every time. A prompt may set its
    own negative prompt, size, seed, steps, guidance and sampler in kohya's form (parse_sample_prompt)."""
    from ..generate import GenerateSettings, generate, labelled_grid, save_png

    training = base.pipe.unet.training
    base.pipe.unet.eval()
    rows, labels = [], []
    for line in prompts:
        fields = parse_sample_prompt(line)
        prompt = fields["prompts"][0]
        settings = GenerateSettings(**{"num": seeds, "seed": 0, "steps": 20, **fields})
        rows.append([r.image for r in generate(base, settings, progress=False)])
        rows.append([r.image for r in generate(base, settings, progress=False, mix=Mix({name: 1.0}))])
        labels += [f"{prompt} (base)", f"{prompt} (step {step})"]
    base.pipe.unet.train(training)
    return save_png(labelled_grid(rows, labels), out_dir / "samples" / f"step-{step:06d}.png")

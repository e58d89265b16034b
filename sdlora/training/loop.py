"""The training loop: one readable pass from a folder of captioned pictures to an adapter file.

Data, loss and checkpoints live in their own modules; this file only wires them:
pre-flight scan -> base (quantized) + adapter -> latents cached once per picture -> steps of
noise, UNet prediction under the adapter's mix, weighted MSE, optimizer -> the adapter file.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapter_io import save_adapter
from ..adapters import AdapterConfig
from ..adapters.optim import param_groups
from ..errors import SdloraError
from ..inject import adapter_layers
from ..mixing import Mix
from ..pipelines import load_base
from ..quant import make_optimizer
from .checkpoint import latest_checkpoint, load_checkpoint, restore_optimizer, restore_rngs, save_checkpoint
from .config import TrainConfig
from .data import BucketSampler, fit_to_bucket, make_buckets, nearest_bucket, preflight, process_caption
from .images import load_rgb
from .loss import diffusion_loss, loss_weights, noise_like, target_for


@dataclass
class TrainResult:
    adapter: Path
    losses: list[float]
    seconds: float


def _bucket_step(pipe) -> int:
    """Picture sides must divide down to whole latents at the UNet's deepest level."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


@torch.no_grad()
def _cache_latents(pipe, items, buckets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per picture: the VAE posterior's mean and std, (4, h, w) each, encoded once."""
    vae = pipe.vae
    cache = []
    for item, bucket in zip(items, buckets):
        rgb = np.asarray(fit_to_bucket(load_rgb(item.image), bucket), dtype=np.float32)  # (H, W, 3)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
        dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
        cache.append((dist.mean[0].float().cpu(), dist.std[0].float().cpu()))
    return cache


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or a cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def validation_grid(base, cfg: TrainConfig, step: int, out_dir: Path) -> Path:
    """OUT_DIR/samples/step-N.png: each validation prompt for fixed seeds, without (first row) and
    with the adapter (second row), so progress is seen against the same noise every time."""
    from ..generate import GenerateSettings, generate, labelled_grid, save_png

    training = base.pipe.unet.training
    base.pipe.unet.eval()
    rows, labels = [], []
    for prompt in cfg.validation_prompts:
        settings = GenerateSettings(prompts=(prompt,), num=cfg.validation_seeds, seed=0, steps=20)
        rows.append([r.image for r in generate(base, settings, progress=False)])
        rows.append([r.image for r in generate(base, settings, progress=False, mix=Mix({cfg.name: 1.0}))])
        labels += [f"{prompt} (base)", f"{prompt} (step {step})"]
    base.pipe.unet.train(training)
    return save_png(labelled_grid(rows, labels), out_dir / "samples" / f"step-{step:06d}.png")


def _check_out_dir(cfg: TrainConfig, out_dir: Path, ckpt_dir: Path) -> None:
    """Before any work: a resume needs a checkpoint; a new run must not mix with an earlier one's
    checkpoints (pruning would keep those, and --resume would pick them) nor overwrite its adapter."""
    if cfg.resume:
        if latest_checkpoint(ckpt_dir) is None:
            raise SdloraError(f"--resume: no complete checkpoint in {ckpt_dir}", "train without --resume")
        return
    earlier = sorted(p.name for p in ckpt_dir.glob("step-*")) if ckpt_dir.is_dir() else []
    adapter = out_dir / f"{cfg.name}.safetensors"
    if earlier or adapter.exists():
        found = f"checkpoints ({earlier[-1]})" if earlier else adapter.name
        raise SdloraError(f"{out_dir} already holds an earlier run's {found}",
                          "pass --resume to continue it, or choose a new --out folder")


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    t0 = time.time()
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _check_out_dir(cfg, out_dir, ckpt_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    items = preflight(cfg.data_dir, skip_bad=cfg.skip_bad_images)
    base = load_base(cfg.base, device=accelerator.device)
    if base.family == "sdxl":
        raise SdloraError("training on SDXL bases is not supported yet", "train on an SD1 or SD2 base")
    if cfg.quant != "none":
        base.quantize(cfg.quant)
    adapter_cfg = AdapterConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    base.add_adapter(cfg.name, adapter_cfg, targets=cfg.targets, text_encoder=cfg.text_encoder)
    pipe = base.pipe

    resolution = cfg.resolution or base.native_size
    buckets = make_buckets(resolution, _bucket_step(pipe))
    item_buckets = [nearest_bucket(item.size, buckets) for item in items]
    latents_cache = _cache_latents(pipe, items, item_buckets)
    sampler = BucketSampler(item_buckets, cfg.batch_size, cfg.seed, cfg.repeats)

    layers = {f"{role}/{path}": layer for role, model in base.models().items()
              for path, layer in adapter_layers(model).items()}
    optimizer = make_optimizer(cfg.optimizer, param_groups(layers, cfg.name, cfg.lr, cfg.loraplus_ratio),
                               accelerator.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    optimizer, schedule = accelerator.prepare(optimizer, schedule)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaling = float(pipe.vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    mix = Mix({cfg.name: 1.0})

    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    trained = {f"{key}.{pname}": p for key, layer in layers.items() if cfg.name in layer.adapters
               for pname, p in layer.adapters[cfg.name].named_parameters()}
    # The exponential moving average of the adapter, saved in checkpoints too so resume stays exact.
    ema = {k: p.detach().clone() for k, p in trained.items()} if cfg.ema_decay else {}
    losses: list[float] = []
    step = epoch = batch_index = 0
    if cfg.resume:
        tensors, state = load_checkpoint(latest_checkpoint(ckpt_dir))
        with torch.no_grad():
            for key, p in trained.items():
                p.copy_(tensors[f"adapter/{key}"])
            for key, e in ema.items():
                e.copy_(tensors[f"adapter/ema.{key}"])
        restore_optimizer(optimizer, tensors, state)
        schedule.load_state_dict(state["scheduler"])
        restore_rngs(tensors, state, gen, rng)
        step, losses = state["step"], list(state["losses"])
        epoch, batch_index = state["position"]["epoch"], state["position"]["batch"]
    pipe.unet.train()
    pipe.text_encoder.train(cfg.text_encoder)
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=not progress)
    with open(out_dir / "logs" / "loss.csv", "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "epoch", "loss"])
        log.writerows([[i + 1, "", f"{v:.6f}"] for i, v in enumerate(losses)])  # a resumed run keeps its history
        while step < cfg.steps:
            batches = sampler.batches(epoch)
            while batch_index < len(batches) and step < cfg.steps:
                batch = batches[batch_index]
                captions = [process_caption(items[i].caption, rng, cfg.trigger, cfg.shuffle_tags, cfg.keep_tokens,
                                            cfg.caption_dropout) for i in batch]
                mean = torch.stack([latents_cache[i][0] for i in batch])  # (B, 4, h, w)
                std = torch.stack([latents_cache[i][1] for i in batch])
                latents = ((mean + std * torch.randn(mean.shape, generator=gen)) * scaling).to(accelerator.device)
                noise = noise_like(latents, gen, cfg.noise_offset)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
                noisy = noise_scheduler.add_noise(latents, noise, t.to(latents.device))
                ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
                with accelerator.accumulate(pipe.unet), accelerator.autocast(), base.mixer.apply(mix, mode="unfused"):
                    with torch.set_grad_enabled(cfg.text_encoder):
                        hidden = pipe.text_encoder(ids)[0]  # (B, 77, dim)
                    pred = pipe.unet(noisy, t.to(latents.device), hidden).sample
                    loss = diffusion_loss(pred, target_for(noise_scheduler, latents, noise, t),
                                          loss_weights(noise_scheduler, t, cfg.min_snr_gamma))
                    if not math.isfinite(loss.item()):
                        names = ", ".join(items[i].image.name for i in batch)
                        raise SdloraError(f"the loss became {loss.item()} at step {step} on {names}",
                                          "lower --lr, check those pictures, or resume from the last checkpoint")
                    accelerator.backward(loss)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                if ema and accelerator.sync_gradients:
                    with torch.no_grad():
                        for key, e in ema.items():
                            e.mul_(cfg.ema_decay).add_(trained[key].detach(), alpha=1 - cfg.ema_decay)
                losses.append(loss.item())
                log.writerow([step + 1, epoch, f"{losses[-1]:.6f}"])
                step += 1
                batch_index += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    log_file.flush()
                    save_checkpoint(ckpt_dir, step, {**trained, **{f"ema.{k}": e for k, e in ema.items()}},
                                    optimizer, schedule, gen, rng, {"epoch": epoch, "batch": batch_index}, losses,
                                    cfg.keep_checkpoints)
                if cfg.validation_prompts and cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
                    validation_grid(base, cfg, step, out_dir)
            if batch_index >= len(batches):
                epoch, batch_index = epoch + 1, 0
    bar.close()
    if ema:
        with torch.no_grad():
            for key, e in ema.items():
                trained[key].copy_(e)  # the written adapter is the average
    pipe.unet.eval()
    pipe.text_encoder.eval()
    if cfg.validation_prompts:
        validation_grid(base, cfg, step, out_dir)
    summary = {**asdict(cfg), "steps_done": step, "epochs": epoch, "pictures": len(items),
               "final_loss": losses[-1], "seconds": round(time.time() - t0, 1)}
    path = save_adapter(base, cfg.name, out_dir / f"{cfg.name}.safetensors", "sdlora",
                        trigger_words=[cfg.trigger] if cfg.trigger else [], training=summary)
    return TrainResult(path, losses, time.time() - t0)

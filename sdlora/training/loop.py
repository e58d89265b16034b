"""The training loop: one readable pass from a folder of captioned pictures to an adapter file.

Data, loss and checkpoints live in their own modules; this file only wires them:
pre-flight scan -> base (quantized) + adapter -> latents cached once per picture -> steps of
noise, UNet prediction under the adapter's mix, weighted MSE, optimizer -> the adapter file.
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..adapter_io import save_adapter
from ..adapters import AdapterConfig
from ..adapters.optim import param_groups
from ..errors import SdloraError
from ..inject import adapter_layers
from ..mixing import Mix
from ..pipelines import load_base, training_scheduler
from .quant_auto import training_quant
from .optimizers import make_optimizer
from .checkpoint import latest_checkpoint, restore_optimizer, restore_rngs, save_checkpoint
from .resume import check_resumable, clear_temporaries, history, usable_checkpoint
from .config import TrainConfig
from .data import BucketSampler, nearest_bucket, preflight, process_caption, sdxl_time_ids
from .distributed import local_rows, sum_gradients, sum_over_processes
from .latents import cache_latents, cache_masks, training_buckets
from .logs import TrainLog
from .loss import noise_like, training_loss
from .text_cache import TextEmbeddings, unet_conditioning
from .timesteps import sample_timesteps
from .card import card
from .validation import holdout_indices, validation_grid, validation_loss, with_prompt_file


@dataclass
class TrainResult:
    adapter: Path
    losses: list[float]
    seconds: float


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or a cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _check_out_dir(cfg: TrainConfig, out_dir: Path, ckpt_dir: Path) -> None:
    """Before any work: a resume needs a checkpoint; a new run must not mix with an earlier one's
    checkpoints (pruning would keep those, and --resume would pick them) nor overwrite its adapter."""
    for parent in (out_dir, *out_dir.parents):  # before any work: a file where the run's folder must be
        if parent.exists():
            if not parent.is_dir():
                raise SdloraError(f"--out {out_dir}: {parent} is a file where a folder is needed", "pass another --out")
            break
    clear_temporaries(ckpt_dir)  # what killed checkpoint writes left behind
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


def enable_unet_checkpointing(unet) -> None:
    """Gradient checkpointing that recomputes each block under the mix its forward ran with.

    The mix reaches the layers through a ContextVar; autograd may run the recomputation in another
    thread (CUDA's backward threads) where that variable is unset, so each checkpointed call runs
    in a copy of the context taken at forward time."""
    import contextvars

    from torch.utils.checkpoint import checkpoint

    def checkpoint_in_context(module, *args):
        return checkpoint(contextvars.copy_context().run, module.__call__, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(checkpoint_in_context)


@dataclass
class _Run:
    """Everything one training run holds between its steps (set up once, then advanced step by step)."""

    cfg: TrainConfig
    out_dir: Path
    ckpt_dir: Path
    accelerator: object
    precision: str
    base: object
    items: list
    held_out: list[int]
    train_items: list[int]
    latents_cache: list
    sampler: BucketSampler
    texts: TextEmbeddings
    optimizer: object
    schedule: object
    noise_scheduler: object
    scaling: float
    gen: torch.Generator
    rng: random.Random
    mix: Mix
    trained: dict  # "role/module.param" -> the adapter's trainable parameters
    ema: dict  # the same keys -> their exponential moving average (empty without ema_decay)
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    time_ids: list | None = None  # SDXL: per picture (6,), from its size and bucket; None for SD1/SD2
    held_out_cond: object = None  # the held-out captions' (hidden, pooled)
    loss_rows: list = field(default_factory=list)  # [step, epoch, loss, lr] per step, as loss.csv shows them
    resume_from: tuple | None = None  # (path, tensors, state) of the checkpoint --resume continues
    log: object = None
    masks: list | None = None  # per picture None or its loss mask (1, h, w) [, mirrored]; None: no picture has one

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings in a process-wide singleton: a second run in one process (the web UI,
    # tests) with another precision would be refused, so that part is cleared; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Gradient accumulation and the schedule are handled here, step by optimizer step, not by accelerate.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    precision = cfg.mixed_precision if accelerator.native_amp else "no"
    if precision != cfg.mixed_precision:  # accelerate has no fp16 autocast on the CPU
        warnings.warn(f"mixed precision {cfg.mixed_precision} is not supported on {accelerator.device.type}; "
                      "training runs in fp32 (bf16 is)", UserWarning, stacklevel=4)
    return accelerator, precision


def _setup(cfg: TrainConfig, say=lambda msg: None) -> _Run:
    """Check the output folder, scan the data, load and quantize the base, add the adapter, cache the
    latents and build the optimizer: everything before the first step."""
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _check_out_dir(cfg, out_dir, ckpt_dir)
    accelerator, precision = _accelerator(cfg)
    torch.manual_seed(cfg.seed)
    items = preflight(cfg.data_dir, skip_bad=cfg.skip_bad_images)
    held_out = holdout_indices(len(items), cfg.validation_split, cfg.seed)
    say(f"{len(items)} pictures in {cfg.data_dir} (sub-folders included), {len(held_out)} held out for the "
        f"validation loss; loading the base {cfg.base}")
    base = load_base(cfg.base, device=accelerator.device)
    cfg = replace(cfg, quant=training_quant(cfg.quant, base.pipe.unet))  # "auto" -> what ran, for the summary
    resume_from = usable_checkpoint(ckpt_dir) if cfg.resume else None
    if resume_from:  # before the long part: refuse a resume that cannot continue this run
        check_resumable(cfg, resume_from[2], items, resume_from[0])
    if cfg.quant != "none":
        base.quantize(cfg.quant)
    adapter_cfg = AdapterConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    encoder_lrs = _encoder_lrs(cfg, base)
    base.add_adapter(cfg.name, adapter_cfg, targets=cfg.targets, text_encoder=tuple(encoder_lrs))
    pipe = base.pipe
    if cfg.gradient_checkpointing:
        enable_unet_checkpointing(pipe.unet)

    buckets = training_buckets(cfg, base)
    item_buckets = [nearest_bucket(item.size, buckets) for item in items]
    say(f"encoding {len(items)} pictures into latents once ({len(set(item_buckets))} bucket sizes)")
    latents_cache = cache_latents(pipe, items, item_buckets, cfg.flip)
    masks = cache_masks(items, item_buckets, pipe.vae_scale_factor, cfg.flip) if cfg.masked_loss else []
    if any(m is not None for m in masks):
        say(f"{sum(m is not None for m in masks)} pictures have a loss mask (alpha or NAME.mask.png): white is learned")
    train_items = sorted(set(range(len(items))) - set(held_out))
    sampler = BucketSampler([item_buckets[i] for i in train_items], cfg.batch_size, cfg.seed, cfg.repeats)
    texts = TextEmbeddings(pipe, trainable=bool(encoder_lrs), device=accelerator.device)
    # (6,) per picture, and with flip its mirror's: [..., (plain, mirrored)]
    time_ids = ([(torch.tensor(sdxl_time_ids(item.size, b)), torch.tensor(sdxl_time_ids(item.size, b, flipped=True)))
                 for item, b in zip(items, item_buckets)] if base.family == "sdxl" else None)

    layers = {f"{role}/{path}": layer for role, model in base.models().items()
              for path, layer in adapter_layers(model).items()}
    groups = []
    for role, lr in {"unet": cfg.lr, **encoder_lrs}.items():  # each model's adapter at its own learning rate
        groups += param_groups({k: v for k, v in layers.items() if k.startswith(role + "/")}, cfg.name, lr,
                               cfg.loraplus_ratio)
    optimizer = make_optimizer(cfg.optimizer, groups, accelerator.device)
    optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the schedule steps once per step here
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    trained = {f"{key}.{pname}": p for key, layer in layers.items() if cfg.name in layer.adapters
               for pname, p in layer.adapters[cfg.name].named_parameters()}
    # The exponential moving average of the adapter, saved in checkpoints too so resume stays exact.
    ema = {k: p.detach().clone() for k, p in trained.items()} if cfg.ema_decay else {}
    noise_scheduler = training_scheduler(base, cfg.prediction_type, cfg.zero_terminal_snr)
    return _Run(cfg, out_dir, ckpt_dir, accelerator, precision, base, items, held_out, train_items, latents_cache,
                sampler, texts, optimizer, schedule, noise_scheduler, float(pipe.vae.config.scaling_factor),
                torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed), Mix({cfg.name: 1.0}), trained, ema,
                time_ids=time_ids, resume_from=resume_from,
                masks=masks if any(m is not None for m in masks) else None)


def _encoder_lrs(cfg: TrainConfig, base) -> dict[str, float]:
    """The text encoders that get the adapter, each with its learning rate: --text-encoder-lr (default
    --lr), SDXL's second --text-encoder-2-lr (default the first's); a rate of 0 leaves that encoder
    without an adapter, as in kohya's sd-scripts. Empty without --text-encoder."""
    if not cfg.text_encoder:
        return {}
    first = cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    lrs = {"text_encoder": first}
    if "text_encoder_2" in base.models():
        lrs["text_encoder_2"] = first if cfg.text_encoder_2_lr is None else cfg.text_encoder_2_lr
    return {role: lr for role, lr in lrs.items() if lr > 0}


def _resume(run: _Run) -> None:
    """Adapter, EMA, optimizer moments, schedule, RNG states and data position from the newest checkpoint."""
    _, tensors, state = run.resume_from
    with torch.no_grad():
        for key, p in run.trained.items():
            p.copy_(tensors[f"adapter/{key}"])
        for key, e in run.ema.items():
            e.copy_(tensors[f"adapter/ema.{key}"])
    restore_optimizer(run.optimizer, tensors, state)
    run.schedule.load_state_dict(state["scheduler"])
    restore_rngs(tensors, state, run.gen, run.rng)
    run.step, run.losses = state["step"], list(state["losses"])
    run.val_losses = [tuple(v) for v in state.get("val_losses", [])]
    # checkpoints from before loss_rows: the losses alone (epoch and lr unknown)
    run.loss_rows = state.get("loss_rows") or [[i + 1, "", v, ""] for i, v in enumerate(run.losses)]
    run.epoch, run.batch_index = state["position"]["epoch"], state["position"]["batch"]


def _validate(run: _Run, at_step: int) -> None:
    """Held-out loss and validation pictures (main process; the others wait)."""
    cfg, base = run.cfg, run.base
    if run.main and run.held_out:
        if run.held_out_cond is None or run.texts.trainable:  # a trained encoder's outputs change: redo them
            with torch.no_grad(), base.mixer.apply(run.mix, mode="unfused"):  # captions as trained, unshuffled
                run.held_out_cond = run.texts([process_caption(run.items[i].caption, random.Random(0), cfg.trigger)
                                               for i in run.held_out])
        time_ids = [run.time_ids[i][0] for i in run.held_out] if run.time_ids else None
        value = validation_loss(base, cfg.name, [run.latents_cache[i][0] for i in run.held_out], run.held_out_cond,
                                run.noise_scheduler, run.scaling, cfg.seed, time_ids)
        run.val_losses.append((at_step, value))
        run.log.validation(at_step, value)
    if run.main and cfg.validation_prompts:
        run.log.picture(at_step, validation_grid(base, cfg.name, cfg.validation_prompts, cfg.validation_seeds,
                                                 at_step, run.out_dir))
    run.accelerator.wait_for_everyone()


def _batch_loss(run: _Run, batch: list[int]) -> float:
    """Forward and backward of one batch (this process's rows); returns the whole batch's mean loss."""
    cfg, accelerator = run.cfg, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    # The whole global batch's randomness is drawn on every process; each keeps its rows.
    captions = [process_caption(run.items[i].caption, run.rng, cfg.trigger, cfg.shuffle_tags, cfg.keep_tokens,
                                cfg.caption_dropout) for i in batch]
    flips = [cfg.flip and run.rng.random() < 0.5 for _ in batch]  # drawn only with --flip: runs without are as before
    mean = torch.stack([run.latents_cache[i][2 * f] for i, f in zip(batch, flips)])  # (B, C, h, w)
    std = torch.stack([run.latents_cache[i][2 * f + 1] for i, f in zip(batch, flips)])
    latents = (mean + std * torch.randn(mean.shape, generator=run.gen)) * run.scaling
    noise = noise_like(latents, run.gen, cfg.noise_offset)
    t = sample_timesteps(len(batch), run.noise_scheduler.config.num_train_timesteps, run.gen, cfg.timestep_sampling,
                         cfg.logit_mean, cfg.logit_std, cfg.timestep_shift, cfg.min_timestep, cfg.max_timestep)
    mine = local_rows(len(batch), rank, world)
    time_ids = torch.stack([run.time_ids[i][f] for i, f in zip(batch, flips)])[mine] if run.time_ids else None  # (B, 6)
    latents, noise, t = latents[mine].to(accelerator.device), noise[mine].to(accelerator.device), t[mine]
    mask = None
    if run.masks:  # (B, 1, h, w): a picture without a mask learns everywhere
        mask = torch.stack([run.masks[i][f] if run.masks[i] is not None else torch.ones_like(latents[0, :1]).cpu()
                            for i, f in zip(batch, flips)])[mine].to(accelerator.device)
    share = torch.zeros((), device=accelerator.device)  # stays 0 on a process with no rows
    if len(t):
        with accelerator.autocast(), run.base.mixer.apply(run.mix, mode="unfused"):
            cond = unet_conditioning(*run.texts(captions[mine]), time_ids)
            # This process's share of the batch mean: summed over processes it is the mean.
            share = training_loss(run.base.pipe.unet, run.noise_scheduler, latents, noise, t.to(latents.device), cond,
                                  cfg.min_snr_gamma, mask) * len(t) / len(batch)
            accelerator.backward(share / cfg.grad_accum)
    return sum_over_processes(share.detach(), accelerator).item()


def _optimizer_step(run: _Run, batches: list) -> tuple[float, list]:
    """One optimizer step over grad_accum batches (gradients summed), then the schedule and the EMA.
    `batches` is the current epoch's order; returns the step's loss and the (maybe next epoch's) order."""
    cfg = run.cfg
    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        if run.batch_index >= len(batches):
            run.epoch, run.batch_index = run.epoch + 1, 0
            batches = run.sampler.batches(run.epoch)
        batch = [run.train_items[i] for i in batches[run.batch_index]]
        run.batch_index += 1
        batch_loss = _batch_loss(run, batch)
        if not math.isfinite(batch_loss):
            names = ", ".join(run.items[i].image.name for i in batch)
            raise SdloraError(f"the loss became {batch_loss} at step {run.step} on {names}",
                              "lower --lr, check those pictures, or resume from the last checkpoint")
        step_loss += batch_loss / cfg.grad_accum
    sum_gradients(list(run.trained.values()), run.accelerator)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema:
        with torch.no_grad():
            for key, e in run.ema.items():
                e.mul_(cfg.ema_decay).add_(run.trained[key].detach(), alpha=1 - cfg.ema_decay)
    run.losses.append(step_loss)
    run.step += 1
    return step_loss, batches


def _checkpoint(run: _Run) -> None:
    if run.main:
        run.log.flush()
        save_checkpoint(run.ckpt_dir, run.step, {**run.trained, **{f"ema.{k}": e for k, e in run.ema.items()}},
                        run.optimizer, run.schedule, run.gen, run.rng, {"epoch": run.epoch, "batch": run.batch_index},
                        history(run.cfg, run.items, run.losses, run.val_losses, run.loss_rows),
                        run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _finish(run: _Run, t0: float) -> TrainResult:
    """The EMA into the adapter (if any), the last validation, and the adapter file with its summary."""
    cfg, pipe = run.cfg, run.base.pipe
    if run.ema:
        with torch.no_grad():
            for key, e in run.ema.items():
                run.trained[key].copy_(e)  # the written adapter is the average
    for model in run.base.models().values():
        model.eval()
    _validate(run, run.step)
    run.log.close()
    summary = {**asdict(cfg), "steps_done": run.step, "epochs": run.epoch, "pictures": len(run.train_items),
               "held_out": len(run.held_out), "final_loss": run.losses[-1],
               "processes": run.accelerator.num_processes, "precision": run.precision,
               "final_val_loss": run.val_losses[-1][1] if run.val_losses else None,
               "seconds": round(time.time() - t0, 1),
               # what the adapter was trained to predict, on which schedule: generation and bake read them
               "prediction_type": run.noise_scheduler.config.prediction_type,
               "zero_terminal_snr": bool(run.noise_scheduler.config.get("rescale_betas_zero_snr", False)),
               **card(run.cfg, run.items, run.train_items, run.base.native_size, run.out_dir)}
    path = run.out_dir / f"{cfg.name}.safetensors"
    if run.main:
        save_adapter(run.base, cfg.name, path, "sdlora", trigger_words=[cfg.trigger] if cfg.trigger else [],
                     training=summary)
    run.accelerator.wait_for_everyone()
    return TrainResult(path, run.losses, time.time() - t0)


def train(cfg: TrainConfig, progress: bool = True, on_step=None, should_stop=None) -> TrainResult:
    """Run the training `cfg` describes. `on_step(step, total, loss)` is called after every optimizer
    step (the web UI's progress and loss chart); when `should_stop()` turns true the run ends after
    the current step and writes the adapter as it is then (the summary records the steps done)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    cfg = with_prompt_file(cfg)  # every validation prompt checked before the long part
    run = _setup(cfg, say=(lambda msg: print(f"train: {msg}", file=sys.stderr, flush=True)) if progress else
                 (lambda msg: None))
    if cfg.resume:
        _resume(run)
    pipe = run.base.pipe
    pipe.unet.train()
    pipe.text_encoder.train(cfg.text_encoder)
    run.log = TrainLog(run.out_dir / "logs", run.loss_rows, run.val_losses, enabled=run.main)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="training", unit="step", disable=not (progress and run.main))
    batches = run.sampler.batches(run.epoch)
    while run.step < cfg.steps:
        step_loss, batches = _optimizer_step(run, batches)
        lr = run.schedule.get_last_lr()[0]
        run.loss_rows.append([run.step, run.epoch, step_loss, lr])
        run.log.step(run.step, run.epoch, step_loss, lr)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if on_step:
            on_step(run.step, cfg.steps, step_loss)
        if should_stop and should_stop():
            break
        if cfg.validate_every and run.step % cfg.validate_every == 0 and run.step < cfg.steps:
            _validate(run, run.step)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            _checkpoint(run)
    bar.close()
    return _finish(run, t0)

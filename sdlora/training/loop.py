"""The training loop: one readable pass from a folder of captioned pictures to an adapter file.

Data, loss and checkpoints live in their own modules; this file only wires them:
pre-flight scan -> base (quantized) + adapter -> latents cached once per picture and resolution -> steps of
noise, UNet prediction under the adapter's mix, weighted MSE, optimizer -> the adapter file.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapter_io import save_adapter
from ..errors import SdloraError
from .card import card
from .checkpoint import restore_optimizer, restore_rngs, save_checkpoint
from .config import TrainConfig
from .data import process_caption
from .distributed import local_rows, sum_gradients, sum_over_processes
from .latents import shift_latents
from .logs import TrainLog
from .optimizers import eval_mode, train_mode
from .loss import blank_prompt_targets, noise_like, training_loss
from .resume import history
from .setup import Run, enable_unet_checkpointing, lr_factor, setup_run  # noqa: F401 (re-exported: tests, bench)
from .text_cache import unet_conditioning
from .timesteps import sample_timesteps
from .validation import validation_grid, validation_loss, with_prompt_file


@dataclass
class TrainResult:
    adapter: Path
    losses: list[float]
    seconds: float


def _resume(run: Run) -> None:
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


def _validate(run: Run, at_step: int) -> None:
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


def _batch_loss(run: Run, batch: list[int]) -> float:
    """Forward and backward of one batch of samples (this process's rows); returns the whole batch's mean loss."""
    cfg, accelerator = run.cfg, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = [run.samples[i] for i in batch]
    # The whole global batch's randomness is drawn on every process; each keeps its rows. Regularization pictures
    # never get the trigger word; tag shuffling and caption dropout apply to them as to the training pictures,
    # as kohya's sd-scripts apply a run's caption settings to its reg subsets too.
    captions = [process_caption(s.item.caption, run.rng, None if s.reg else cfg.trigger, cfg.shuffle_tags,
                                cfg.keep_tokens, cfg.caption_dropout) for s in rows]
    flips = [cfg.flip and run.rng.random() < 0.5 for _ in batch]  # drawn only with --flip: runs without are as before
    k = cfg.latent_shift  # drawn only with --latent-shift: runs without are as before
    shifts = [(run.rng.randint(-k, k), run.rng.randint(-k, k)) for _ in batch] if k else None  # (dx, dy) per row
    mean = torch.stack([run.latents_cache[i][2 * f] for i, f in zip(batch, flips)])  # (B, C, h, w)
    std = torch.stack([run.latents_cache[i][2 * f + 1] for i, f in zip(batch, flips)])
    if shifts:
        mean, std = shift_latents(mean, shifts), shift_latents(std, shifts)
    latents = (mean + std * torch.randn(mean.shape, generator=run.gen)) * run.scaling
    noise = noise_like(latents, run.gen, cfg.noise_offset)
    t = sample_timesteps(len(batch), run.noise_scheduler.config.num_train_timesteps, run.gen, cfg.timestep_sampling,
                         cfg.logit_mean, cfg.logit_std, cfg.timestep_shift, cfg.min_timestep, cfg.max_timestep)
    mine = local_rows(len(batch), rank, world)
    time_ids = torch.stack([run.time_ids[i][f] for i, f in zip(batch, flips)])[mine] if run.time_ids else None  # (B, 6)
    latents, noise, t = latents[mine].to(accelerator.device), noise[mine].to(accelerator.device), t[mine]
    # (B,) each row's loss weight: --reg-weight for regularization rows (prior preservation's weight), else 1
    row_weights = torch.tensor([cfg.reg_weight if s.reg else 1.0 for s in rows])[mine]
    mask = None
    if run.masks:  # (B, 1, h, w): a picture without a mask learns everywhere
        mask = torch.stack([run.masks[i][f] if run.masks[i] is not None else torch.ones_like(latents[0, :1]).cpu()
                            for i, f in zip(batch, flips)])  # (B, 1, h, w)
        mask = (shift_latents(mask, shifts) if shifts else mask)[mine].to(accelerator.device)  # moved with its picture
    share = torch.zeros((), device=accelerator.device)  # stays 0 on a process with no rows
    given = None
    blank = [i for i, c in enumerate(captions[mine]) if c == ""] if cfg.blank_prompt_preservation else []
    if blank:  # outside the mix: the base's own unconditional prediction (blank rows are this process's)
        rows = torch.tensor(blank)
        base_cond = unet_conditioning(*run.texts.base([""] * len(blank)),
                                      time_ids[rows] if time_ids is not None else None)
        with accelerator.autocast():
            given = (rows, blank_prompt_targets(run.base.pipe.unet, run.noise_scheduler, latents[rows], noise[rows],
                                                t[rows].to(latents.device), base_cond, cfg.blank_prompt_preservation))
    if len(t):
        with accelerator.autocast(), run.base.mixer.apply(run.mix, mode="unfused"):
            cond = unet_conditioning(*run.texts(captions[mine]), time_ids)
            # This process's share of the batch mean: summed over processes it is the mean.
            share = training_loss(run.base.pipe.unet, run.noise_scheduler, latents, noise, t.to(latents.device), cond,
                                  cfg.min_snr_gamma, mask, row_weights, given=given) * len(t) / len(batch)
            accelerator.backward(share / cfg.grad_accum)
    return sum_over_processes(share.detach(), accelerator).item()


def _optimizer_step(run: Run, batches: list) -> tuple[float, list]:
    """One optimizer step over grad_accum batches (gradients summed), then the schedule and the EMA.
    `batches` is the current epoch's order; returns the step's loss and the (maybe next epoch's) order."""
    cfg = run.cfg
    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        if run.batch_index >= len(batches):
            run.epoch, run.batch_index = run.epoch + 1, 0
            batches = run.sampler.batches(run.epoch)
        batch = [run.order[i] for i in batches[run.batch_index]]  # sample indices
        run.batch_index += 1
        batch_loss = _batch_loss(run, batch)
        if not math.isfinite(batch_loss):
            names = ", ".join(run.samples[i].item.image.name for i in batch)
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


def _checkpoint(run: Run) -> None:
    if run.main:
        run.log.flush()
        save_checkpoint(run.ckpt_dir, run.step, {**run.trained, **{f"ema.{k}": e for k, e in run.ema.items()}},
                        run.optimizer, run.schedule, run.gen, run.rng, {"epoch": run.epoch, "batch": run.batch_index},
                        history(run.cfg, run.items, run.losses, run.val_losses, run.loss_rows, run.reg_items),
                        run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _finish(run: Run, t0: float) -> TrainResult:
    """The EMA into the adapter (if any), the last validation, and the adapter file with its summary."""
    cfg = run.cfg
    eval_mode(run.optimizer)  # schedule-free AdamW: the adapter written and validated is its average x
    if run.ema:
        with torch.no_grad():
            for key, e in run.ema.items():
                run.trained[key].copy_(e)  # the written adapter is the average
    for model in run.base.models().values():
        model.eval()
    _validate(run, run.step)
    run.log.close()
    summary = {**asdict(cfg), "steps_done": run.step, "epochs": run.epoch, "pictures": len(run.train_items),
               "reg_pictures": len(run.reg_items),
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
    run = setup_run(cfg, say=(lambda msg: print(f"train: {msg}", file=sys.stderr, flush=True)) if progress else
                 (lambda msg: None))
    if cfg.resume:
        _resume(run)
    # Schedule-free AdamW steps at y. Checkpoints hold y and its z as they are: a switch to x and back rounds,
    # so writing them would move the run; a resume continues the same path.
    train_mode(run.optimizer)
    pipe = run.base.pipe
    pipe.unet.train()
    pipe.text_encoder.train(cfg.text_encoder)
    run.log = TrainLog(run.out_dir / "logs", run.loss_rows, run.val_losses, enabled=run.main)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="training", unit="step", disable=not (progress and run.main))
    batches = run.sampler.batches(run.epoch)
    while run.step < cfg.steps:
        step_loss, batches = _optimizer_step(run, batches)
        # --lr as scheduled: the first group's rate over its block multiplier (block_lr; 1 without)
        lr = run.schedule.get_last_lr()[0] / run.optimizer.param_groups[0].get("lr_weight", 1.0)
        run.loss_rows.append([run.step, run.epoch, step_loss, lr])
        run.log.step(run.step, run.epoch, step_loss, lr)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if on_step:
            on_step(run.step, cfg.steps, step_loss)
        if should_stop and should_stop():
            break
        if cfg.validate_every and run.step % cfg.validate_every == 0 and run.step < cfg.steps:
            eval_mode(run.optimizer)  # schedule-free AdamW: validate its average x, then step on from y
            _validate(run, run.step)
            train_mode(run.optimizer)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            _checkpoint(run)
    bar.close()
    return _finish(run, t0)

"""Everything one training run does before its first step: the output folder checked, the data scanned,
the base loaded and quantized, the adapter added, latents cached and the optimizer built; and the Run that
holds it all between steps (sdlora.training.loop advances it)."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..adapters import AdapterConfig
from ..adapters.optim import param_groups
from ..errors import SdloraError
from ..inject import adapter_layers, every_layer, region_of
from ..mixing import Mix
from ..pipelines import load_base, training_scheduler
from .blocks import BlockPlan
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .data import BucketSampler, preflight, sdxl_time_ids, training_samples
from .latents import cache_latents, cache_masks, training_buckets
from .optimizers import PACKAGES, make_optimizer, optimizer_class
from .quant_auto import training_quant
from .resume import check_resumable, clear_temporaries, usable_checkpoint
from .text_cache import TextEmbeddings
from .validation import holdout_indices


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
class Run:
    """Everything one training run holds between its steps (set up once, then advanced step by step)."""

    cfg: TrainConfig
    out_dir: Path
    ckpt_dir: Path
    accelerator: object
    precision: str
    base: object
    items: list  # the training pictures (Item), in the scan's order
    held_out: list[int]
    train_items: list[int]
    latents_cache: list  # per sample (run.samples), indexed as they are
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
    time_ids: list | None = None  # SDXL: per sample (6,), from its size and bucket; None for SD1/SD2
    held_out_cond: object = None  # the held-out captions' (hidden, pooled)
    loss_rows: list = field(default_factory=list)  # [step, epoch, loss, lr] per step, as loss.csv shows them
    resume_from: tuple | None = None  # (path, tensors, state) of the checkpoint --resume continues
    log: object = None
    masks: list | None = None  # per sample None or its loss mask (1, h, w) [, mirrored]; None: no picture has one
    # Every picture at every resolution (data.training_samples): sample i < len(items) is picture i at the first
    # resolution, which is what validation uses. order: the sampler's positions -> sample indices.
    samples: list = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    reg_items: list = field(default_factory=list)  # the regularization pictures (--reg-dir)

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


def setup_run(cfg: TrainConfig, say=lambda msg: None) -> Run:
    """Check the output folder, scan the data, load and quantize the base, add the adapter, cache the
    latents and build the optimizer: everything before the first step."""
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _check_out_dir(cfg, out_dir, ckpt_dir)
    if cfg.optimizer in PACKAGES:  # a missing optional package is said before the long part
        optimizer_class(cfg.optimizer)
    accelerator, precision = _accelerator(cfg)
    torch.manual_seed(cfg.seed)
    items = preflight(cfg.data_dir, skip_bad=cfg.skip_bad_images)
    held_out = holdout_indices(len(items), cfg.validation_split, cfg.seed)
    reg_items = preflight(cfg.reg_dir, skip_bad=cfg.skip_bad_images) if cfg.reg_dir else []
    say(f"{len(items)} pictures in {cfg.data_dir} (sub-folders included), {len(held_out)} held out for the "
        f"validation loss; " + (f"{len(reg_items)} regularization pictures in {cfg.reg_dir}; " if cfg.reg_dir else "")
        + f"loading the base {cfg.base}")
    base = load_base(cfg.base, device=accelerator.device)
    cfg = replace(cfg, quant=training_quant(cfg.quant, base.pipe.unet))  # "auto" -> what ran, for the summary
    resume_from = usable_checkpoint(ckpt_dir) if cfg.resume else None
    if resume_from:  # before the long part: refuse a resume that cannot continue this run
        check_resumable(cfg, resume_from[2], items, resume_from[0], reg_items)
    if cfg.quant != "none":
        base.quantize(cfg.quant)
    encoder_lrs = _encoder_lrs(cfg, base)
    plan = add_training_adapter(cfg, base, encoder_lrs)
    pipe = base.pipe
    if cfg.gradient_checkpointing:
        enable_unet_checkpointing(pipe.unet)

    bucket_sets = training_buckets(cfg, base)  # one per resolution
    samples = training_samples(items, reg_items, bucket_sets)
    pictures, buckets = [s.item for s in samples], [s.bucket for s in samples]
    sides = f" at {', '.join(str(r) for r in cfg.resolution)} px" if cfg.resolution and len(cfg.resolution) > 1 else ""
    say(f"encoding {len(items)} pictures" + (f" and {len(reg_items)} regularization pictures" if reg_items else "")
        + f" into latents once{sides} ({len(set(buckets))} bucket sizes)")
    latents_cache = cache_latents(pipe, pictures, buckets, cfg.flip)
    masks = cache_masks(pictures, buckets, pipe.vae_scale_factor, cfg.flip) if cfg.masked_loss else []
    if any(m is not None for m in masks):
        say(f"{len({id(s.item) for s, m in zip(samples, masks) if m is not None})} pictures have a loss mask (alpha or "
            "NAME.mask.png): white is learned")
    train_items = sorted(set(range(len(items))) - set(held_out))
    # the sampler's positions: the training samples (held-out pictures at no resolution), then the regularization ones
    train_samples = [r * len(items) + i for r in range(len(bucket_sets)) for i in train_items]
    reg_samples = list(range(len(bucket_sets) * len(items), len(samples)))
    sampler = BucketSampler([buckets[i] for i in train_samples], cfg.batch_size, cfg.seed, cfg.repeats,
                            [buckets[i] for i in reg_samples])
    texts = TextEmbeddings(pipe, trainable=bool(encoder_lrs), device=accelerator.device)
    # (6,) per sample, and with flip its mirror's: [..., (plain, mirrored)]
    time_ids = ([(torch.tensor(sdxl_time_ids(s.item.size, s.bucket)),
                  torch.tensor(sdxl_time_ids(s.item.size, s.bucket, flipped=True))) for s in samples]
                if base.family == "sdxl" else None)

    layers = {f"{role}/{path}": layer for role, model in base.models().items()
              for path, layer in adapter_layers(model).items()}
    optimizer = make_optimizer(cfg.optimizer, optimizer_groups(cfg, base, encoder_lrs, plan), accelerator.device)
    optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the schedule steps once per step here
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    trained = {f"{key}.{pname}": p for key, layer in layers.items() if cfg.name in layer.adapters
               for pname, p in layer.adapters[cfg.name].named_parameters()}
    # The exponential moving average of the adapter, saved in checkpoints too so resume stays exact.
    ema = {k: p.detach().clone() for k, p in trained.items()} if cfg.ema_decay else {}
    noise_scheduler = training_scheduler(base, cfg.prediction_type, cfg.zero_terminal_snr)
    return Run(cfg, out_dir, ckpt_dir, accelerator, precision, base, items, held_out, train_items, latents_cache,
                sampler, texts, optimizer, schedule, noise_scheduler, float(pipe.vae.config.scaling_factor),
                torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed), Mix({cfg.name: 1.0}), trained, ema,
                time_ids=time_ids, resume_from=resume_from,
                masks=masks if any(m is not None for m in masks) else None, samples=samples,
                order=train_samples + reg_samples, reg_items=reg_items)


def add_training_adapter(cfg: TrainConfig, base, encoder_lrs: dict[str, float]) -> BlockPlan:
    """The adapter to train on the UNet and the encoders of `encoder_lrs`, at each layer's block-wise rank
    (block_rank; none where a block's lr multiplier is 0); returns the plan the optimizer's groups follow."""
    plan = BlockPlan.of(cfg, sdxl=base.family == "sdxl")
    if plan.active:
        plan.check_names({region_of("unet", n) for n in every_layer(base.pipe.unet)})
    adapter_cfg = AdapterConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, factor=cfg.factor,
                                decompose_both=cfg.decompose_both, full_matrix=cfg.full_matrix)
    base.add_adapter(cfg.name, adapter_cfg, targets=cfg.targets, text_encoder=tuple(encoder_lrs),
                     rank_of=plan.rank_of if plan.active else None)
    return plan


def optimizer_groups(cfg: TrainConfig, base, encoder_lrs: dict[str, float], plan: BlockPlan) -> list[dict]:
    """Each text encoder's adapter at its rate, the UNet's at --lr times its block's multiplier: one A/B pair
    (LoRA+) per model and multiplier, multipliers in layer order, so without block_lr the groups are as before."""
    groups = []
    for role, lr in {"unet": cfg.lr, **encoder_lrs}.items():
        by_weight: dict[float, dict] = {}
        for path, layer in adapter_layers(base.models()[role]).items():
            if cfg.name in layer.adapters:
                weight = plan.lr_weight(region_of(role, path)) if role == "unet" else 1.0
                by_weight.setdefault(weight, {})[path] = layer
        for weight, layers in by_weight.items():
            for group in param_groups(layers, cfg.name, lr * weight, cfg.loraplus_ratio):
                groups.append({**group, "name": f"{role}.{group['name']}", "lr_weight": weight})
    return groups


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

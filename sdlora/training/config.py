"""The training settings: one frozen dataclass, from TOML and/or CLI flags, checked on creation."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ..choices import (LR_SCHEDULES, MIXED_PRECISION, OPTIMIZERS, PREDICTION_TYPES, TIMESTEP_SAMPLINGS, TRAIN_METHODS,
                       TRAIN_QUANT, UNET_PRESETS)
from ..errors import SdloraError


def _opt(default, help: str, **meta):
    """A setting: its default, and what its CLI flag shows (help; choices, metavar, flag name, positional)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def parse_sides(text: str) -> tuple[int, ...]:
    """--resolution's value: '64' -> (64,), '48,64' -> (48, 64)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a side or comma-separated sides in pixels, e.g. 64 or "
                                         "48,64") from None


@dataclass(frozen=True)
class TrainConfig:
    """Every field is a TOML key and a `sdlora train` flag of the same name (sdlora.cli builds the flags
    from these fields), so a new setting is one line here."""

    data_dir: str = _opt(dataclasses.MISSING, "pictures with same-name .txt captions (or data_dir in --config)", positional=True,
                         metavar="DATA_DIR", show_default=False)
    out_dir: str = _opt(dataclasses.MISSING, "where the run writes (or out_dir in --config)", flag="--out", metavar="OUT_DIR",
                        show_default=False)
    base: str = _opt("embedded", "the base model: 'embedded', a diffusers folder, a .safetensors checkpoint, "
                                 "or a hub id (online only)")
    name: str = _opt("adapter", "adapter name")
    method: str = _opt("lora", "adapter method", choices=TRAIN_METHODS)
    # The defaults learn each sample style in 600 steps (tests/test_training_style_v2.py): every UNet layer
    # (a texture lives in the ResNet convolutions as much as in attention) and the text encoder (the trigger
    # is a word the base never saw) at rank 16, lr 1e-3, with offset noise, without which no adapter moves a
    # picture's mean colour (neon's black ground came out gray). Measured in the README's Training section.
    rank: int = _opt(16, "adapter rank")
    alpha: float | None = _opt(None, "updates are scaled by alpha / rank (default: alpha = rank)",
                                show_default=False)
    factor: int = _opt(-1, "LoKr: split each layer side as factor x rest where it divides (-1: as square as it "
                           "divides); smaller factors put more of the update in the low-rank w2")
    decompose_both: bool = _opt(False, "LoKr: make the small Kronecker factor w1 low-rank too (fewer parameters)")
    full_matrix: bool = _opt(False, "LoKr: keep w2 whole, no low rank (the most parameters; alpha is unused)")
    targets: str = _opt("all", "UNet layers: attention projections, every transformer linear, or those plus the "
                                "ResNet and sampler convolutions", choices=UNET_PRESETS)
    block_rank: str | None = _opt(None, "rank per UNet block, e.g. 'down=4, up=8, IN05=16' (blocks as a mix names "
                                        "them; BASE: the text encoders; 0: no adapter there); the rest --rank",
                                  show_default=False)
    block_lr: str | None = _opt(None, "--lr multiplier per UNet block, e.g. 'down=0.5, mid=1, up.1=2' (0: no adapter "
                                      "there); the rest 1; text encoders unaffected", show_default=False)
    down_lr_weight: str | None = _opt(None, "kohya's: 12 (SDXL 9) --lr multipliers for the input blocks IN00-IN11, "
                                            "or a preset (sine, cosine, linear, reverse_linear, zeros; +offset)",
                                      show_default=False)
    mid_lr_weight: float | None = _opt(None, "kohya's: the middle block's --lr multiplier", show_default=False)
    up_lr_weight: str | None = _opt(None, "kohya's: 12 (SDXL 9) --lr multipliers for the output blocks OUT00-OUT11, "
                                          "or a preset", show_default=False)
    block_lr_zero_threshold: float = _opt(0.0, "kohya's: a block whose given lr multiplier is at or below this gets "
                                               "no adapter")
    text_encoder: bool = _opt(True, "train adapters on the text encoder(s) too")
    text_encoder_lr: float | None = _opt(None, "the text encoder's adapter learning rate (default: --lr); 0: no "
                                               "adapter on it", show_default=False)
    text_encoder_2_lr: float | None = _opt(None, "SDXL's second text encoder's (default: --text-encoder-lr); 0: no "
                                                 "adapter on it", show_default=False)
    quant: str = _opt("auto", "the frozen base's quantization during training; auto: nf4 for a base whose UNet "
                              "has 100M parameters or more, none (float) for smaller ones", choices=TRAIN_QUANT)
    steps: int = _opt(600, "optimizer steps; each consumes --grad-accum batches")
    lr: float = _opt(1e-3, "learning rate")
    loraplus_ratio: float = _opt(1.0, "B's learning rate over A's (LoRA+)")
    warmup_steps: int = _opt(0, "linear learning-rate warm-up steps")
    resolution: tuple[int, ...] | None = _opt(None, "bucket area side in pixels, or several comma-separated "
                                                    "(48,64; a list in TOML): each picture trains at each, bucketed "
                                                    "at each (default: the base's native size)",
                                              parse=parse_sides, metavar="PX[,PX...]", show_default=False)
    bucket_step: int | None = _opt(None, "bucket sides' step in pixels (default 64, or the UNet's finest for bases "
                                         "under 512 px); a multiple of the UNet's (SD1/SD2: 64, SDXL: 32)",
                                   show_default=False)
    min_bucket: int | None = _opt(None, "smallest bucket side in pixels (default: none)", show_default=False)
    max_bucket: int | None = _opt(None, "largest bucket side in pixels (default: twice the resolution)",
                                  show_default=False)
    flip: bool = _opt(False, "mirror each picture left-right half the time (SDXL's crop time id follows, as in "
                             "kohya's sd-scripts); not for styles or subjects that are not symmetric")
    latent_shift: int = _opt(0, "move each picture by up to N whole latents (N x the VAE's factor in pixels) left or right "
                                "and up or down, drawn anew each time it is used, its edges repeated: a texture inside "
                                "objects (stripes, dots) is then learned at every phase, not at the one the pictures "
                                "happen to share; not for a pattern fixed to the frame's edges, such as a grid (0: never)",
                             metavar="N")
    batch_size: int = _opt(4, "global batch, split across processes")
    grad_accum: int = _opt(1, "batches per optimizer step", metavar="N")
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass: less memory, "
                                               "about 30% slower")
    seed: int = _opt(0, "seeds the adapter's initialisation, the data order and the noise")
    trigger: str | None = _opt(None, "trigger word: captions that lack it get it as their first tag (kohya's "
                                     "convention, which --keep-tokens keeps in place); where a caption already has it, "
                                     "it stays where it is (the sample sets put theirs last)")
    caption_dropout: float = _opt(0.1, "share of empty captions")
    blank_prompt_preservation: float = _opt(0.1, "empty-caption rows learn this share of the base's own unconditional "
                                           "prediction, the rest their picture (ai-toolkit's blank prompt "
                                           "preservation): the unconditional stays nearer the base's, so guidance "
                                           "pulls toward the style; 0: off")
    shuffle_tags: bool = _opt(False, "shuffle comma-separated tags")
    keep_tokens: int = _opt(0, "leading tags kept in place", metavar="N")
    repeats: int = _opt(1, "times each picture appears per epoch")
    reg_dir: str | None = _opt(None, "regularization pictures with their own .txt captions (prior preservation, as "
                                     "in DreamBooth and kohya's sd-scripts): each epoch adds one per training "
                                     "picture, cycled; they never get the trigger word", metavar="DIR",
                               show_default=False)
    reg_weight: float = _opt(1.0, "the loss of regularization rows is multiplied by this (kohya's prior_loss_weight)")
    min_snr_gamma: float | None = _opt(2.0, "min-SNR weighting gamma (Hang et al.): a level's loss weighs min(SNR, G) / "
                                            "SNR (epsilon); a lower G leans on the noisier levels, where a style's "
                                            "layout is drawn (the paper's 5 left the sample mosaic faint)")
    noise_offset: float = _opt(0.1, "noise offset (a per-channel constant added to the noise)")
    timestep_sampling: str = _opt("uniform", "how noise levels are drawn: uniform, or logit_normal (most weight on "
                                             "the middle levels)", choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = _opt(0.0, "logit_normal's mean (negative: cleaner levels, positive: noisier)")
    logit_std: float = _opt(1.0, "logit_normal's spread")
    timestep_shift: float = _opt(1.0, "shift drawn levels as SD3 does, u -> s u / (1 + (s - 1) u): above 1 noisier, "
                                      "below 1 cleaner")
    min_timestep: int = _opt(0, "lowest timestep drawn")
    max_timestep: int | None = _opt(None, "highest timestep drawn (default: the schedule's last)", show_default=False)
    prediction_type: str | None = _opt(None, "what the UNet learns to predict (default: what the base's scheduler "
                                             "says)", choices=PREDICTION_TYPES, show_default=False)
    zero_terminal_snr: bool = _opt(False, "rescale the betas to zero terminal SNR (Lin et al. 2024; use with "
                                          "v_prediction, as NoobAI v-pred and SD2-768 fine-tunes do)")
    mixed_precision: str = _opt("no", "autocast the forward pass; trained weights stay fp32", choices=MIXED_PRECISION)
    masked_loss: bool = _opt(True, "learn only where a picture's mask is white: NAME.mask.png beside it, or its alpha "
                                   "channel (pictures without one learn everywhere)")
    skip_bad_images: bool = _opt(False, "skip unreadable pictures and missing captions")
    optimizer: str = _opt("adamw", "8-bit and paged AdamW come from bitsandbytes (paged needs CUDA; a warning "
                                   "says what runs); prodigy (lr 1.0: it finds the step size), adamw_schedulefree "
                                   "(constant schedule), adafactor and came from their packages",
                          choices=OPTIMIZERS)
    lr_schedule: str = _opt("constant", "learning-rate schedule after the warm-up", choices=LR_SCHEDULES)
    ema_decay: float | None = _opt(None, "write the adapter's exponential moving average, e.g. 0.999")
    validation_prompts: tuple[str, ...] = _opt((), "repeatable; OUT_DIR/samples/step-N.png shows each without and "
                                                   "with the adapter; kohya's options may follow it (--n negative, "
                                                   "--w/--h size, --d seed, --s steps, --l guidance, --ss sampler)",
                                               flag="--validation-prompt", metavar="PROMPT", show_default=False)
    validation_prompt_file: str | None = _opt(None, "a kohya prompt file: one validation prompt per line, with the "
                                                    "same options", metavar="FILE", show_default=False)
    validation_split: float = _opt(0.1, "share of pictures held out for logs/val_loss.csv (floor; 0: none)")
    validate_every: int = _opt(0, "validation loss and pictures every N steps (0: only at the end)", metavar="N")
    validation_seeds: int = _opt(2, "pictures per validation prompt")
    checkpoint_every: int = _opt(0, "write OUT_DIR/checkpoints/step-N every N steps, atomically (0: none)",
                                 metavar="N")
    keep_checkpoints: int = _opt(2, "complete checkpoints kept")
    resume: bool = _opt(False, "continue from the newest complete checkpoint: adapter, optimizer, schedule, RNGs "
                               "and data position restored, so the result equals an uninterrupted run")

    def __post_init__(self):
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        if self.resolution is not None:  # Python callers may give 64, [48, 64] or "48,64"
            sides = self.resolution
            try:
                sides = parse_sides(sides) if isinstance(sides, str) else (sides,) if _whole(sides) else tuple(sides)
            except (argparse.ArgumentTypeError, TypeError) as err:
                raise SdloraError(f"training setting resolution = {self.resolution!r}: {err}",
                                  "give a side in pixels or several, e.g. 64 or [48, 64]") from None
            object.__setattr__(self, "resolution", sides)
        checks = [
            (self.steps >= 1, "steps", "at least 1"), (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.grad_accum >= 1, "grad_accum", "at least 1"), (self.repeats >= 1, "repeats", "at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (self.loraplus_ratio >= 1, "loraplus_ratio", "at least 1"),
            (self.text_encoder_lr is None or (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr >= 0),
             "text_encoder_lr", "0 or more"),
            (self.text_encoder_2_lr is None or (math.isfinite(self.text_encoder_2_lr) and self.text_encoder_2_lr >= 0),
             "text_encoder_2_lr", "0 or more"),
            (0 <= self.caption_dropout < 1, "caption_dropout", "in [0, 1)"),
            (0 <= self.blank_prompt_preservation <= 1, "blank_prompt_preservation", "in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps", "0 or more"),
            (self.latent_shift >= 0, "latent_shift", "0 (never) or more"),
            (self.checkpoint_every >= 0, "checkpoint_every", "0 (none) or more"),
            (self.optimizer in OPTIMIZERS, "optimizer", " or ".join(OPTIMIZERS)),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", " or ".join(LR_SCHEDULES)),
            # Schedule-free AdamW averages its iterates in place of a decay; a warm-up still applies.
            (self.optimizer != "adamw_schedulefree" or self.lr_schedule == "constant", "lr_schedule",
             "constant with adamw_schedulefree (its average replaces the decay; --warmup-steps still applies)"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "in (0, 1), or unset"),
            (self.validate_every >= 0 and self.validation_seeds >= 1, "validate_every", "0 or more"),
            (0 <= self.validation_split < 1, "validation_split", "in [0, 1)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "at least 1"),
            (self.noise_offset >= 0, "noise_offset", "0 or more"),
            (self.timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling", " or ".join(TIMESTEP_SAMPLINGS)),
            (math.isfinite(self.logit_mean), "logit_mean", "a finite number"),
            (math.isfinite(self.logit_std) and self.logit_std > 0, "logit_std", "a positive number"),
            (math.isfinite(self.timestep_shift) and self.timestep_shift > 0, "timestep_shift", "a positive number"),
            (self.min_timestep >= 0, "min_timestep", "0 or more"),
            (self.max_timestep is None or self.max_timestep >= self.min_timestep, "max_timestep",
             "at least min_timestep"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", "positive (or unset)"),
            (self.mixed_precision in MIXED_PRECISION, "mixed_precision", " or ".join(MIXED_PRECISION)),
            (self.prediction_type in (None, *PREDICTION_TYPES), "prediction_type", " or ".join(PREDICTION_TYPES)),
            (self.quant in TRAIN_QUANT, "quant", " or ".join(TRAIN_QUANT)),
            (self.method in TRAIN_METHODS, "method", " or ".join(TRAIN_METHODS)),
            (self.targets in UNET_PRESETS, "targets", " or ".join(UNET_PRESETS)),
            (self.factor == -1 or self.factor >= 1, "factor", "-1 (automatic) or a whole number of at least 1"),
            (self.method == "lokr" or (self.factor == -1 and not self.decompose_both and not self.full_matrix),
             "method", "lokr when factor, decompose_both or full_matrix is set (they shape LoKr adapters only)"),
            (self.resolution is None or (len(self.resolution) >= 1 and len(set(self.resolution)) == len(self.resolution)
                                         and all(isinstance(r, int) and r >= 8 and r % 8 == 0 for r in self.resolution)),
             "resolution", "multiples of 8, each once"),
            (math.isfinite(self.reg_weight) and self.reg_weight >= 0, "reg_weight", "0 or more"),
            (self.bucket_step is None or self.bucket_step >= 8, "bucket_step", "at least 8"),
            (self.min_bucket is None or self.max_bucket is None or self.min_bucket <= self.max_bucket, "min_bucket",
             "at most max_bucket"),
            (self.mid_lr_weight is None or (math.isfinite(self.mid_lr_weight) and self.mid_lr_weight >= 0),
             "mid_lr_weight", "0 or more"),
            (math.isfinite(self.block_lr_zero_threshold) and self.block_lr_zero_threshold >= 0,
             "block_lr_zero_threshold", "0 or more"),
        ]
        for ok, field, want in checks:
            if not ok:
                raise SdloraError(f"training setting {field} = {getattr(self, field)!r} must be {want}",
                                  f"fix {field} in the config file or its --{field.replace('_', '-')} flag")
        self._check_blocks()

    def _check_blocks(self) -> None:
        """block_lr / block_rank / kohya's lr weights read now, before anything loads (sdlora.training.blocks)."""
        from .blocks import kohya_blocks, parse_blocks

        kohya = [k for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if getattr(self, k) is not None]
        if self.block_lr and kohya:
            raise SdloraError(f"training settings block_lr and {', '.join(kohya)} both set the blocks' learning rates",
                              "give one: block_lr, or kohya's down/mid/up_lr_weight")
        for field in ("block_lr", "block_rank"):
            if getattr(self, field):
                parse_blocks(getattr(self, field), field)
        kohya_blocks(self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight, sdxl=False)

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides) -> "TrainConfig":
        """Settings from a TOML file (top-level keys = field names), then `overrides` (None = unset)."""
        values: dict = {}
        if toml_path:
            try:
                values = tomllib.loads(Path(toml_path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise SdloraError(f"cannot read the config {toml_path}: {err}", "check the file") from err
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SdloraError(f"unknown training setting(s): {', '.join(unknown)}",
                              f"known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for key in set(values) - {k for k, v in overrides.items() if v is not None}:  # flags are typed by argparse
            values[key] = _typed(key, values[key], hints[key], toml_path)
        missing = [k for k in ("data_dir", "out_dir") if k not in values]
        if missing:
            raise SdloraError(f"missing training setting(s): {', '.join(missing)}", "give the data folder and --out")
        return cls(**values)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(key: str, value, hint, source) -> object:
    """A TOML value checked against its field's type (str, int, float, bool, tuple of str, tuple of int; "| None"
    adds nothing, as TOML has no null): 'lr = "1e-4"' or 'steps = 1.5' or 'steps = true' is one clear error, a
    string is never taken for a list of one-character prompts, and a tuple of int also takes one whole number
    (resolution = 64 or [48, 64])."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    kind = kinds[0]
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is int:
        if _whole(value) or (isinstance(value, list) and value and all(_whole(v) for v in value)):
            return (value,) if _whole(value) else tuple(value)
        want = "a whole number or a list of them, e.g. 64 or [48, 64]"
    elif typing.get_origin(kind) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        want = "a list of strings, e.g. [\"a red circle\"]"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        want = "true or false"
    elif kind is int:
        if _whole(value):
            return value
        want = "a whole number"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        want = "a number (unquoted, e.g. 1e-4)"
    else:
        if isinstance(value, str):
            return value
        want = "a string"
    raise SdloraError(f"{source}: training setting {key} = {value!r} must be {want}",
                      f"fix {key} in {source}")

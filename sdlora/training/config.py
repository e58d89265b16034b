"""The training settings: one frozen dataclass, from TOML and/or CLI flags, checked on creation."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdloraError


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    out_dir: str
    base: str = "embedded"
    name: str = "adapter"
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    targets: str = "attn"
    text_encoder: bool = False
    quant: str = "nf4"  # nf4 | fp4 | int8 | none
    steps: int = 200  # optimizer steps; each consumes grad_accum batches
    lr: float = 1e-4
    loraplus_ratio: float = 1.0
    warmup_steps: int = 0
    resolution: int | None = None  # None: the base's native size
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass: less memory, ~30% slower
    seed: int = 0
    trigger: str | None = None
    caption_dropout: float = 0.05
    shuffle_tags: bool = False
    keep_tokens: int = 0
    repeats: int = 1
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    skip_bad_images: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    lr_schedule: str = "constant"  # constant | cosine, both after the warm-up
    ema_decay: float | None = None  # e.g. 0.999: write the exponential moving average of the adapter
    validation_prompts: tuple[str, ...] = ()
    validation_split: float = 0.1  # share of the pictures held out for the validation loss (floor; 0: none)
    validate_every: int = 0  # validation loss and pictures every N steps; 0: only at the end
    validation_seeds: int = 2
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: bool = False

    def __post_init__(self):
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        checks = [
            (self.steps >= 1, "steps", "at least 1"), (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.grad_accum >= 1, "grad_accum", "at least 1"), (self.repeats >= 1, "repeats", "at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (self.loraplus_ratio >= 1, "loraplus_ratio", "at least 1"),
            (0 <= self.caption_dropout < 1, "caption_dropout", "in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps", "0 or more"),
            (self.checkpoint_every >= 0, "checkpoint_every", "0 (none) or more"),
            (self.optimizer in ("adamw", "adamw8bit", "paged_adamw8bit"), "optimizer",
             "adamw, adamw8bit or paged_adamw8bit"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule", "constant or cosine"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "in (0, 1), or unset"),
            (self.validate_every >= 0 and self.validation_seeds >= 1, "validate_every", "0 or more"),
            (0 <= self.validation_split < 1, "validation_split", "in [0, 1)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "at least 1"),
            (self.noise_offset >= 0, "noise_offset", "0 or more"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", "positive (or unset)"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "no, fp16 or bf16"),
            (self.quant in ("nf4", "fp4", "int8", "none"), "quant", "nf4, fp4, int8 or none"),
            (self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0), "resolution",
             "a multiple of 8"),
        ]
        for ok, field, want in checks:
            if not ok:
                raise SdloraError(f"training setting {field} = {getattr(self, field)!r} must be {want}",
                                  f"fix {field} in the config file or its --{field.replace('_', '-')} flag")

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
        missing = [k for k in ("data_dir", "out_dir") if k not in values]
        if missing:
            raise SdloraError(f"missing training setting(s): {', '.join(missing)}", "give the data folder and --out")
        return cls(**values)

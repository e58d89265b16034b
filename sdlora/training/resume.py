"""Resume that trusts nothing (issue 16): the checkpoint to continue from, and whether this run may continue it.

- The newest checkpoint that reads whole is used: one whose tensors are truncated, whose state.json is not
  JSON, or whose adapter holds NaN is skipped, named, for the one before it (kill -9 inside a write leaves a
  folder without its COMPLETE marker, which was never a candidate).
- Settings that decide what the adapter is and how it was trained so far (method, rank, targets, learning
  rates, data, seed, ...) must equal the checkpoint's: a change is refused with every changed field named,
  since it could not apply (a new rank) or would be recorded without having happened (a new --lr under the
  restored optimizer). What only says how long to go on and what to report may change (MAY_CHANGE).
- The pictures must be the ones the checkpoint was trained on (names and sizes): another folder is refused.
- Temporaries of killed checkpoint writes (.step-*.tmp) are removed.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from pathlib import Path

import torch

from ..errors import SdloraError
from .checkpoint import MARKER, load_checkpoint

# Settings a resumed run may give anew: the run's length and what it logs, checks and keeps; the data folder's
# path and the regularization folder's (a moved folder is fine: its pictures are compared by name and size).
MAY_CHANGE = {"out_dir", "data_dir", "reg_dir", "steps", "resume", "gradient_checkpointing", "validation_prompts", "validation_prompt_file", "validate_every",
              "validation_seeds", "checkpoint_every", "keep_checkpoints", "skip_bad_images", "name"}


def clear_temporaries(ckpt_dir: Path) -> list[str]:
    """Remove what killed checkpoint writes left (.step-NNNNNNNN.<uuid>.tmp folders); their names."""
    gone = []
    for tmp in Path(ckpt_dir).glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        gone.append(tmp.name)
    return gone


def usable_checkpoint(ckpt_dir: Path, say=lambda msg: print(msg, file=sys.stderr)):
    """(path, tensors, state) of the newest complete checkpoint that reads whole; each skipped one is said."""
    complete = sorted((p for p in Path(ckpt_dir).glob("step-*") if (p / MARKER).is_file()), reverse=True)
    reasons = []
    for path in complete:
        try:
            tensors, state = load_checkpoint(path)
            for key in ("step", "position", "optimizer", "scheduler", "losses"):
                if key not in state:
                    raise ValueError(f"state.json lacks '{key}'")
            bad = next((k for k, t in tensors.items() if k.startswith("adapter/") and t.is_floating_point()
                        and not torch.isfinite(t).all()), None)
            if bad:
                raise ValueError(f"its adapter tensor '{bad}' holds NaN or infinite values (saved from a diverged run)")
        except Exception as err:  # noqa: BLE001  truncated safetensors, bad JSON, missing keys: all the same here
            reasons.append(f"{path.name} ({str(err).splitlines()[0][:160]})")
            say(f"resume: skipping checkpoint {path.name}: it cannot be read whole ({reasons[-1]})")
            continue
        return path, tensors, state
    raise SdloraError(f"--resume: no checkpoint in {ckpt_dir} reads whole: {'; '.join(reasons) or 'none complete'}",
                      "train without --resume in a new --out folder")


def fingerprint(items) -> list[list]:
    """The pictures a run trains on: [name, bytes] each, in the scan's order."""
    return [[item.image.name, item.image.stat().st_size] for item in items]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_resumable(cfg, state: dict, items, checkpoint: Path, reg_items=()) -> None:
    """Refuse a resume whose settings, pictures or regularization pictures are not the checkpoint's (checkpoints
    written before sdlora recorded them are taken as they are)."""
    saved = state.get("config")
    if saved is not None:
        now = dataclasses.asdict(cfg)
        if isinstance(saved.get("resolution"), int):  # written before a run could have several
            saved = {**saved, "resolution": [saved["resolution"]]}
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
                   if k not in MAY_CHANGE and k in saved and not _same(saved[k], now[k])]
        if changed:
            raise SdloraError(f"--resume: {checkpoint.name} was trained with other settings: {', '.join(changed)}",
                              "resume with the settings of the run, or start a new run in a new --out folder")
    for key, folder, what in (("pictures", cfg.data_dir, "pictures"), ("reg_pictures", cfg.reg_dir, "regularization pictures")):
        pictures, have = state.get(key), fingerprint(items if key == "pictures" else reg_items)
        if pictures is not None and [list(p) for p in pictures] != have:
            old, new = {tuple(p) for p in pictures}, {tuple(p) for p in have}
            raise SdloraError(f"--resume: the {what} in {folder} are not those {checkpoint.name} was trained on "
                              f"({len(new - old)} new or changed, {len(old - new)} gone)",
                              f"resume with the run's {what}, or start a new run in a new --out folder")


def history(cfg, items, losses, val_losses, rows, reg_items=()) -> dict:
    """What state.json keeps beside the training state: the settings, the pictures and regularization pictures,
    the loss history with each step's epoch and learning rate (so loss.csv comes back whole)."""
    return {"losses": losses, "val_losses": val_losses, "loss_rows": rows, "config": dataclasses.asdict(cfg),
            "pictures": fingerprint(items), "reg_pictures": fingerprint(reg_items)}



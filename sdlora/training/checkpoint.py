"""Training checkpoints: everything needed to continue bit for bit, and nothing pickled.

A checkpoint is a folder checkpoints/step-NNNNNNNN holding tensors.safetensors (adapter
parameters, optimizer moments, RNG states) and state.json (step, data position, optimizer
param groups, scheduler, Python RNG, loss history). It is written to a temporary folder, closed
with a COMPLETE marker and only then renamed into place; older checkpoints are pruned only after
that, so a crash at any moment leaves the last complete one intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..atomic import atomic_folder
from ..errors import SdloraError

MARKER = "COMPLETE"


def _split(obj, path: str, tensors: dict, seen: dict | None = None):
    """A state dict as JSON-able data, every tensor (at any depth) moved to `tensors` under its
    path and replaced by {"__tensor__": path}. Optimizers nest them (bitsandbytes: a dict per
    parameter of quantized moments). A tensor met again (bitsandbytes' 8-bit AdamW shares its two
    quantization maps among all parameters of 4,096 elements or more) is stored once and referred to
    by its first path, as safetensors refuses shared memory; loading then shares it again."""
    seen = {} if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in seen:
            return {"__tensor__": seen[id(obj)]}
        seen[id(obj)] = path
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__keys__": [[type(k).__name__, str(k)] for k in obj],
                "__values__": [_split(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__keys__" in obj:
        keys = [int(k) if t == "int" else k for t, k in obj["__keys__"]]  # optimizer state is keyed by int
        return {k: _join(v, tensors) for k, v in zip(keys, obj["__values__"])}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(folder: Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
                    generator: torch.Generator, py_rng, position: dict, history: dict, keep: int = 2) -> Path:
    """`history`: JSON-able run history (losses so far...) stored in state.json as it is."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    with atomic_folder(final, replace=True) as tmp:
        opt_tensors: dict = {}
        opt_meta = _split(optimizer.state_dict(), "optimizer", opt_tensors)
        tensors = {f"adapter/{k}": v.detach().cpu().contiguous() for k, v in adapter.items()}
        tensors.update({k: v.cpu().contiguous() for k, v in opt_tensors.items()})
        tensors["rng/generator"] = generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "tensors.safetensors"))
        state = {"step": step, "position": position, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                 "python_rng": list(py_rng.getstate()[1]), "python_rng_version": py_rng.getstate()[0],
                 **history}
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / MARKER).write_text("ok\n")
    complete = sorted(p for p in folder.glob("step-*") if (p / MARKER).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    complete = sorted(p for p in Path(folder).glob("step-*") if (p / MARKER).is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a complete checkpoint."""
    from safetensors.torch import load_file

    if not (path / MARKER).is_file():
        raise SdloraError(f"{path} is not a complete checkpoint (no {MARKER} marker)", "resume from a complete one")
    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def restore_rngs(tensors: dict, state: dict, generator: torch.Generator, py_rng) -> None:
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    py_rng.setstate((state["python_rng_version"], tuple(state["python_rng"]), None))


def restore_optimizer(optimizer, tensors: dict, state: dict) -> None:
    optimizer.load_state_dict(_join(state["optimizer"], tensors))

"""Reading and writing .safetensors files: validated on the way in, atomic on the way out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import SdloraError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def read_metadata(path: str | Path) -> dict[str, str]:
    """A .safetensors file's metadata from its header alone (no tensor read); {} for a file that has none
    or cannot be read (listings show what they can)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001  a broken file lists with empty metadata; loading it says what is wrong
        return {}


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (copied into memory, so the file may be replaced while they live) and the
    metadata. Refuses pickles unread, and names the file and key of anything broken."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(f"{path} is a pickle file ({path.suffix}); sdlora never unpickles files, since loading "
                          "a pickle can run arbitrary code", "convert it to .safetensors with a tool you trust")
    if not path.is_file():
        raise SdloraError(f"no such adapter file: {path}", "check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError for truncated or foreign files
        raise SdloraError(f"{path} is truncated or not a .safetensors file ({err})",
                          "re-download or re-export it") from err
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SdloraError(f"{path}: tensor '{key}' holds NaN or infinite values",
                              "the file is damaged or came from a diverged training run; use an earlier checkpoint")
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write to a fresh temporary name beside `path`, then rename over it: a crash leaves the old
    file whole, and an input that is memory-mapped may be the output."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path

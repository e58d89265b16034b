"""What several `sdlora` commands share: the base flags, sizes, devices and adapter specs (FILE[:W[:TE_W]])."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .choices import BASE_QUANT
from .errors import SdloraError

BASE_HELP = ("'embedded' (default), 'embedded-sdxl', a diffusers folder, a .safetensors checkpoint, or a hub id "
             "(online only)")


def parse_size(text: str) -> tuple[int, int]:
    """'64x48' -> (64, 48); '64' -> (64, 64)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise SdloraError(f"--size '{text}' is not WIDTHxHEIGHT", "pass e.g. --size 64x64")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdloraError(f"--device {name} asked for, but torch sees no CUDA device", "pass --device cpu")
    return name


FILE_TOOL_BASE_HELP = ("the base whose layer names translate kohya names to and from the canonical ones: "
                       f"{BASE_HELP.replace(' (default)', '')}. Default: none when the file's own layout is kept "
                       "(kohya in and out, or canonical in and out), else the embedded base; a file that does "
                       "not fit the base is refused")


def add_base_flags(p: argparse.ArgumentParser, runs_model: bool = True, file_tool: bool = False) -> None:
    """--base and --base-config; with runs_model (commands that compute with the base) also
    --device and --quant. file_tool: --base is optional (see FILE_TOOL_BASE_HELP)."""
    if file_tool:
        p.add_argument("--base", default=None, help=FILE_TOOL_BASE_HELP)
    else:
        p.add_argument("--base", default="embedded", help=f"the base model: {BASE_HELP}")
    p.add_argument("--base-config", metavar="DIR", default=None,
                   help="for a single-file --base: a diffusers folder of the same architecture whose configs "
                        "and tokenizer are used, so nothing is fetched from the hub")
    if not runs_model:
        return
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--quant", default="none", choices=BASE_QUANT,
                   help="hold the UNet and text encoder(s) in 4 or 8 bits: NF4/FP4 with double quantization on "
                        "linear and conv layers, or int8 on linear layers with NF4 convs (default none)")


def parse_adapter_spec(spec: str) -> tuple[str, float, float | None]:
    """'style.safetensors:0.8:0.5' -> (path, UNet weight 0.8, text-encoder weight 0.5). Weights
    are taken off the end only when they parse as numbers, so paths may hold colons."""
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if len(parts) > 1 and not Path(path).exists():  # 'F:abc' where F exists: a weight that is not a number
        head, _, tail = path.rpartition(":")
        while head and not Path(head).exists() and ":" in head:
            head, _, more = head.rpartition(":")
            tail = f"{more}:{tail}"
        if Path(head).is_file():
            raise SdloraError(f"'{spec}': weight '{tail}' of {head} is not a number", f"pass e.g. {head}:0.8 or {head}:0.8:0.5")
    unet_w = weights[0] if weights else 1.0
    te_w = weights[1] if len(weights) > 1 else None
    return path, unet_w, te_w


def load_mix(base, specs: list[str]):
    """Load each FILE[:W[:TE_W]] into the base and return the Mix of them all."""
    from .adapter_io import load_adapter
    from .mixing import AdapterWeights, Mix

    entries = {}
    for i, spec in enumerate(specs):
        path, unet_w, te_w = parse_adapter_spec(spec)
        weights = AdapterWeights(unet=unet_w, text_encoder=unet_w if te_w is None else te_w)  # validates first
        loaded = load_adapter(base, path, f"a{i}")  # the same file may be given twice, with other weights
        tell(path, loaded.file)
        entries[loaded.name] = weights
    return Mix(entries)


def tell(path: str, af) -> None:
    """Every command that reads an adapter says what it found (on stderr, so stdout stays the result)."""
    print(f"{path}: {af.format} {af.method}, {len(af.modules)} modules", file=sys.stderr)


def check_out_folder(out: str | Path, what: str = "--out") -> None:
    """Before any work: the folder a result goes to exists or can be made (no file stands in its way), so a
    long generation is never lost to a bad path at the end."""
    import os

    folder = Path(out).parent
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SdloraError(f"{what} {out}: {parent} is a file where a folder is needed", "pass another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SdloraError(f"{what} {out}: {parent} is not writable", "pass a folder you can write to")
            return

"""What A1111 (and its additional-networks extension, Civitai, kohya's tools) read from a LoRA file's metadata
beyond the weights: the caption tags' frequencies (the trigger-word list of A1111's card), the two model hashes
kohya's sd-scripts precompute (`sshs_model_hash`, `sshs_legacy_hash`), the model spec's hash, resolution and
thumbnail. The hashes follow kohya's train_util / sai_model_spec formulas (sd-scripts' library):

- sshs_model_hash: sha256 over the bytes after the header of the file safetensors writes for the tensors with the
  `ss_*` metadata only (other metadata may change without changing the hash);
- sshs_legacy_hash: the first 8 hex digits of sha256 over 64 KiB from offset 1 MiB of those same bytes;
- modelspec.hash_sha256: "0x" + sha256 over each tensor's data bytes in turn (each saved alone), in key order
  (kohya takes its state dict's order, which a file read back does not keep; sorted keys make it checkable)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import torch


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder, each comma-separated caption tag and how many captions hold it."""
    return {folder: dict(Counter(t.strip() for c in captions for t in c.split(",") if t.strip()))
            for folder, captions in captions_by_folder.items()}


def _after_header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[8 + n:]


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's precalculate_safetensors_hashes computes them."""
    from safetensors.torch import save

    # as formats/io.write_safetensors hands them to safetensors, so the hash is of the bytes the file holds
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return hashlib.sha256(_after_header(data)).hexdigest(), legacy


def modelspec_hash(tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(_after_header(save({"tensor": tensors[key].detach().contiguous().cpu()})))
    return f"0x{h.hexdigest()}"


def thumbnail(path: str | Path, side: int = 256) -> str:
    """A picture as the model spec's thumbnail: a data URI of a PNG no larger than side x side."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def a1111_metadata(tensors: dict[str, torch.Tensor], metadata: dict[str, str], training: dict) -> dict[str, str]:
    """The keys to add to a kohya export's metadata (already holding its ss_* and modelspec.* keys)."""
    out = {}
    if training.get("tag_frequency"):
        out["ss_tag_frequency"] = json.dumps(training["tag_frequency"], sort_keys=True)
    if training.get("resolution"):
        w, h = training["resolution"]
        out["ss_resolution"] = f"({w}, {h})"
        out["modelspec.resolution"] = f"{w}x{h}"
    if training.get("thumbnail"):
        out["modelspec.thumbnail"] = training["thumbnail"]
    model_hash, legacy = kohya_hashes(tensors, {**metadata, **out})
    out["sshs_model_hash"], out["sshs_legacy_hash"] = model_hash, legacy
    out["modelspec.hash_sha256"] = modelspec_hash(tensors)
    return out

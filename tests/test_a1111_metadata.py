"""A kohya export carries what A1111's card reads: tag frequencies from the captions, kohya's precomputed hashes
(checked against the file itself, as A1111's additional-networks hashes it when indexing), the model spec's
resolution, hash and a thumbnail of the last validation picture."""

import base64
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

STYLES = Path(__file__).resolve().parents[1] / "samples" / "styles"


@pytest.mark.slow
def test_a_trained_adapters_kohya_export_fills_a1111s_card(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from sdlora.adapter_io import read_adapter_file, write_adapter_file
    from sdlora.pipelines import load_base
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    data = tmp_path / "zdots"
    data.mkdir()
    for p in sorted((STYLES / "dots").iterdir())[:12]:
        shutil.copy(p, data / p.name)
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), steps=2, validation_split=0.0,
                      validation_prompts=("a red circle, zdots",), validate_every=2, targets="attn")
    result = train(cfg, progress=False)
    out = write_adapter_file(read_adapter_file(result.adapter), tmp_path / "card.safetensors", "kohya",
                             base=load_base("embedded"))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    captions = [p.read_text().strip() for p in sorted(data.glob("*.txt"))]
    expected = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    assert json.loads(meta["ss_tag_frequency"]) == {"zdots": dict(expected)}
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
    thumb = meta["modelspec.thumbnail"]
    assert thumb.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1]))).size[0] > 0
    # A1111's additional-networks: sha256 over the file's bytes after its header
    raw = out.read_bytes()
    after = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(after).hexdigest()
    tensors = load_file(str(out))
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})  # kohya's legacy formula
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    spec = hashlib.sha256()
    for key in sorted(tensors):  # each tensor alone, as sai_model_spec hashes them, in key order
        alone = save({"tensor": tensors[key]})
        spec.update(alone[8 + int.from_bytes(alone[:8], "little"):])
    assert meta["modelspec.hash_sha256"] == "0x" + spec.hexdigest()
    assert meta["modelspec.trigger_phrase"] == "" or "zdots" in meta["modelspec.trigger_phrase"]

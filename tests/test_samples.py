"""The shipped sample style sets and the embedded base: present, well-formed, reproducible."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from train_scripts.shapes import COLORS, SHAPES, STYLE_TRIGGERS

ROOT = Path(__file__).resolve().parents[1]
STYLES = ROOT / "samples" / "styles"


def test_at_least_three_styles_of_24_to_64_captioned_pictures():
    styles = sorted(p.name for p in STYLES.iterdir() if p.is_dir())
    assert len(styles) >= 3
    for style in styles:
        pngs = sorted((STYLES / style).glob("*.png"))
        assert 24 <= len(pngs) <= 64, style
        for png in pngs:
            with Image.open(png) as im:
                assert im.size[0] >= 64 and im.size[1] >= 64 and im.mode == "RGB"
            words = png.with_suffix(".txt").read_text().replace(",", " ").split()
            assert words[-1] == STYLE_TRIGGERS[style], png
            assert any(c in words for c in COLORS) and any(s in words for s in SHAPES), png


def test_styles_are_visually_distinct():
    """Mean per-style pixel statistics differ: each set has its own look, not just new captions."""
    import numpy as np

    def signature(style):
        arrs = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted((STYLES / style).glob("*.png"))[:16]]
        a = np.stack(arrs)  # (16, 64, 64, 3)
        edges = np.abs(np.diff(a, axis=2)).mean()  # horizontal detail: stripes, dots and grout are busy
        return np.array([a.mean(), edges])

    sigs = {s: signature(s) for s in STYLE_TRIGGERS}
    names = list(sigs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(sigs[a] - sigs[b]).max() > 3.0, (a, b, sigs[a], sigs[b])


@pytest.mark.slow
def test_make_samples_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "train_scripts" / "make_samples.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for style in STYLE_TRIGGERS:
        shipped = sorted(p.name for p in (STYLES / style).iterdir())
        assert shipped == sorted(p.name for p in (tmp_path / style).iterdir())
        for name in shipped:
            assert (STYLES / style / name).read_bytes() == (tmp_path / style / name).read_bytes(), f"{style}/{name}"


def test_embedded_base_layout_and_size():
    folder = ROOT / "samples" / "embedded"
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024, total

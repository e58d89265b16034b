"""The embedded base's VAE keeps what styles are made of: encode -> decode of the sample style sets (which
the VAE never saw), of flat scenes and of flat fills, measured on the 0-255 scale."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from train_scripts.shapes import BACKGROUNDS, COLORS, draw_scene, random_scene

from .style_judge import STYLES, STYLES_DIR




def _reconstruct(vae, pictures: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) float originals and reconstructions (rounded, clamped to 0-255)."""
    x = np.stack([np.asarray(p.convert("RGB"), np.float32) for p in pictures])
    t = torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
    with torch.no_grad():
        rec = vae.decode(vae.encode(t).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    return x, rec


def _psnr(x: np.ndarray, rec: np.ndarray) -> float:
    """Mean over pictures of each picture's PSNR in dB."""
    mse = np.maximum(((x - rec) ** 2).mean(axis=(1, 2, 3)), 1e-3)
    return float((10 * np.log10(255.0**2 / mse)).mean())


@pytest.mark.parametrize("style", STYLES)
def test_each_style_set_survives_the_vae_at_25_db(embedded, style):
    pictures = [Image.open(p) for p in sorted((STYLES_DIR / style).glob("*.png"))]
    assert len(pictures) >= 40
    value = _psnr(*_reconstruct(embedded.pipe.vae, pictures))
    assert value >= 25.0, f"{style}: {value:.2f} dB"


def test_flat_scenes_survive_the_vae_at_30_db(embedded):
    rng = random.Random("vae-test-flat")
    pictures = [draw_scene(random_scene(rng)) for _ in range(40)]
    value = _psnr(*_reconstruct(embedded.pipe.vae, pictures))
    assert value >= 30.0, f"flat scenes: {value:.2f} dB"


def test_flat_fills_come_back_within_3_levels(embedded):
    colours = sorted(set(COLORS.values()) | set(BACKGROUNDS.values()))
    x, rec = _reconstruct(embedded.pipe.vae, [Image.new("RGB", (64, 64), c) for c in colours])
    error = np.abs(rec - x).mean(axis=(1, 2))  # (colours, 3): mean absolute error per channel
    worst = {c: round(float(e.max()), 2) for c, e in zip(colours, error)}
    assert error.max() <= 3.0, f"mean absolute error per colour (worst channel): {worst}"


def test_the_measure_is_not_easy_to_pass():
    """The PSNR above would catch a VAE that blurs: a 3x3 box blur of the mosaic set is far below 25 dB."""
    from PIL import ImageFilter

    pictures = [Image.open(p).convert("RGB") for p in sorted((STYLES_DIR / "mosaic").glob("*.png"))]
    x = np.stack([np.asarray(p, np.float32) for p in pictures])
    blurred = np.stack([np.asarray(p.filter(ImageFilter.BoxBlur(1)), np.float32) for p in pictures])
    assert _psnr(x, blurred) < 25.0

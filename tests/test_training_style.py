"""Style is learned: a short run on the mosaic set moves pictures towards the style, keeps the content.

The statistic is the mosaic's own signature, the share of a picture's edge energy on the 8-pixel
block grid (train_scripts.shapes.grid_edge_share): 1.0 for every picture of the style set, about
0.25 for flat shapes, whose outlines run anywhere. It is checked on ground truth first. Content is
checked per seed against the base's picture for the same seed and prompt: the named colour still
dominates the foreground, and the foreground overlaps the base's (same shape, same place).
"""

import random

import numpy as np
import pytest
from PIL import Image

from sdlora.generate import GenerateSettings, generate
from sdlora.mixing import Mix
from tests.test_training_data import STYLES
from train_scripts.shapes import dominant_foreground_color, draw_scene, foreground_mask, grid_edge_share, random_scene


def test_the_statistic_separates_the_style_from_plain_shapes():
    style = [grid_edge_share(Image.open(p)) for p in sorted((STYLES / "mosaic").glob("*.png"))]
    rng = random.Random(1)
    plain = [grid_edge_share(draw_scene(random_scene(rng))) for _ in range(200)]
    other_styles = [grid_edge_share(Image.open(p)) for s in ("stripes", "dots", "neon")
                    for p in sorted((STYLES / s).glob("*.png"))]
    assert min(style) > 0.95 and max(plain) < 0.6 and max(other_styles) < 0.6


@pytest.fixture(scope="module")
def mosaic_adapter(tmp_path_factory):
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    out = tmp_path_factory.mktemp("mosaic")
    cfg = TrainConfig(data_dir=str(STYLES / "mosaic"), out_dir=str(out), name="mosaic", rank=8, lr=1e-3, steps=300)
    return train(cfg, progress=False).adapter


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("colour, shape", [("red", "circle"), ("blue", "square"), ("green", "triangle")])
def test_pictures_move_towards_the_style_and_keep_shape_and_colour(mosaic_adapter, colour, shape):
    from sdlora.adapter_io import load_adapter
    from sdlora.pipelines import load_base

    base = load_base("embedded")  # the default nf4 quantization is a training choice; generation runs float
    load_adapter(base, mosaic_adapter, "mosaic")
    settings = GenerateSettings(prompts=(f"a {colour} {shape}, zmosaic",), num=10, steps=20, seed=0)
    plain = [r.image for r in generate(base, settings, progress=False)]
    styled = [r.image for r in generate(base, settings, progress=False, mix=Mix({"mosaic": 1.0}))]
    closer = [grid_edge_share(s) > grid_edge_share(p) for s, p in zip(styled, plain)]
    colours = [dominant_foreground_color(s) for s in styled]
    overlap = [_iou(foreground_mask(s), foreground_mask(p)) for s, p in zip(styled, plain)]
    report = (f"grid share with/without: {[round(grid_edge_share(s), 2) for s in styled]} / "
              f"{[round(grid_edge_share(p), 2) for p in plain]}; colours {colours}; IoU {np.round(overlap, 2)}")
    assert sum(closer) >= 8, report
    assert sum(c == colour for c in colours) >= 8, report
    assert sum(o >= 0.5 for o in overlap) >= 8, report

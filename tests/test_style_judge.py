"""The style judge (tests/style_judge.py) on ground truth, before it judges any model: held-out pictures drawn
by each style's own generator are judged as that style and never as another, flat shapes are judged plain, and
pictures that are only near a style (blurred until the texture is gone, blotchy) are not judged in it. The
content measures (object colour by hue, object mask) find what was drawn."""

import collections
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from train_scripts.make_samples import STYLES as STYLE_MAKERS
from train_scripts.shapes import draw_scene, random_scene

from .style_judge import STYLES, STYLES_DIR, default_judge, object_colour, overlap, plain_references


def _held_out(style: str, n: int = 40) -> list[Image.Image]:
    rng = random.Random(f"judge-held-out-{style}")
    return [STYLE_MAKERS[style](random_scene(rng, p_background=0.0 if style == "neon" else 0.35), rng) for _ in range(n)]


@pytest.mark.parametrize("style", STYLES)
def test_the_judge_knows_each_style_on_held_out_pictures_and_never_calls_it_another(style):
    verdicts = collections.Counter(default_judge().judge(im) for im in _held_out(style))
    assert verdicts[style] >= 34, verdicts  # 85% of 40
    assert not any(verdicts[other] for other in STYLES if other != style), verdicts


def test_the_judge_calls_flat_shapes_plain_and_near_misses_nothing():
    judge = default_judge()
    plain = collections.Counter(judge.judge(im) for im in plain_references(100, seed=7))
    assert plain["plain"] >= 95, plain
    # Near a style is not in it: each set blurred until its texture is gone (radius 2), and flat shapes with
    # blotches of noise (what the old grid-edge statistic let pass); at most 10% of those may pass.
    for style in STYLES:
        blurred = [Image.open(p).convert("RGB").filter(ImageFilter.GaussianBlur(2.0))
                   for p in sorted((STYLES_DIR / style).glob("*.png"))]
        verdicts = collections.Counter(judge.judge(im) for im in blurred)
        assert verdicts[style] <= len(blurred) // 5, (style, verdicts)
    rng = np.random.default_rng(0)

    def blotchy(im):
        noise = np.kron(rng.normal(0, 40, (8, 8, 3)), np.ones((8, 8, 1)))  # 8x8-pixel blotches
        return Image.fromarray(np.clip(np.asarray(im, np.float32) + noise, 0, 255).astype(np.uint8))

    verdicts = collections.Counter(judge.judge(blotchy(im)) for im in plain_references(60, seed=3))
    assert sum(verdicts[s] for s in STYLES) <= 6, verdicts


def test_the_content_measures_find_the_drawn_colour_and_object_in_every_style():
    for style in STYLES:
        rng = random.Random(f"content-{style}")
        for _ in range(20):
            scene = random_scene(rng, p_background=0.0 if style == "neon" else 0.35)
            picture = STYLE_MAKERS[style](scene, rng)
            assert object_colour(picture) == scene.color, (style, scene)
            assert overlap(picture, draw_scene(scene)) >= 0.5, (style, scene)


@pytest.mark.slow
def test_the_bar_is_reachable_each_style_drawn_over_the_base_own_pictures_passes_every_measure(embedded):
    """Issue 13's bar for an adapter, met by a perfect one: each set's own drawing code applied to the pictures
    the base draws for the style test's prompts (their object mask as the shape) is judged in the style, keeps
    the named colour and overlaps the base's picture by at least half, so what the adapters miss is theirs,
    not the judge's (the base's thin, turned triangles included)."""
    from sdlora.generate import GenerateSettings, generate
    from train_scripts.make_samples import restyle

    from .style_judge import object_mask
    from .test_training_style_v2 import PROMPTS

    for colour, shape in PROMPTS:
        settings = GenerateSettings(prompts=(f"a {colour} {shape}",), num=10, steps=20, seed=0)
        pictures = [r.image for r in generate(embedded, settings, progress=False)]
        for style in STYLES:
            rng = random.Random(f"reachable-{style}")
            drawn = [restyle(p, object_mask(p), colour, style, rng) for p in pictures]
            styled = sum(default_judge().judge(d) == style for d in drawn)
            kept_colour = sum(object_colour(d) == colour for d in drawn)
            kept_shape = sum(overlap(d, p) >= 0.5 for d, p in zip(drawn, pictures))
            assert min(styled, kept_colour, kept_shape) >= 9, (style, colour, shape, styled, kept_colour, kept_shape)

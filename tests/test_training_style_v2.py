"""Every sample style is learned by `sdlora train` with its default settings, and the content stays.

The judge (tests/style_judge.py, checked on ground truth in tests/test_style_judge.py) must first call the
base's own pictures plain. Then, per style and prompt, 10 seeds with the adapter are judged in the style,
the same seeds without it are not, the named colour stays (by hue) and the object stays where the base
draws it (mask overlap with the base's picture).
"""

import collections

import numpy as np
import pytest

from sdlora.generate import GenerateSettings, generate
from sdlora.mixing import Mix
from train_scripts.shapes import STYLE_TRIGGERS

from .base_version import base_v2
from .style_judge import STYLES, default_judge, object_colour, overlap


# Written for the embedded base v2 of issue 13 (8 latent channels, texture VAE); the shipped base is still v1,
# which cannot show the styles (its VAE keeps 10.8-20.2 dB of them), so these wait for it and run once it ships.
pytestmark = pytest.mark.skipif(not base_v2(), reason="waits for the embedded base v2 (issue 13): samples/embedded is v1")

PROMPTS = [("red", "circle"), ("blue", "square"), ("green", "triangle")]


@pytest.mark.slow
def test_the_base_own_pictures_are_judged_plain(embedded):
    prompts = tuple(f"a {c} {s}" for c, s in PROMPTS) + ("a yellow diamond", "a purple circle on a gray background")
    results = generate(embedded, GenerateSettings(prompts=prompts, num=10, steps=20, seed=0), progress=False)
    verdicts = collections.Counter(default_judge().judge(r.image) for r in results)
    assert verdicts["plain"] >= 0.9 * len(results), verdicts


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_each_style_is_learned_with_the_default_settings_and_keeps_colour_and_shape(style_adapter, style):
    from sdlora.adapter_io import load_adapter
    from sdlora.pipelines import load_base

    base = load_base("embedded")  # the default nf4 quantization is a training choice; generation runs float
    load_adapter(base, style_adapter(style), style)
    judge = default_judge()
    failures = []
    for colour, shape in PROMPTS:
        settings = GenerateSettings(prompts=(f"a {colour} {shape}, {STYLE_TRIGGERS[style]}",), num=10, steps=20, seed=0)
        plain = [r.image for r in generate(base, settings, progress=False)]
        styled = [r.image for r in generate(base, settings, progress=False, mix=Mix({style: 1.0}))]
        with_it = [judge.judge(im) for im in styled]
        without = [judge.judge(im) for im in plain]
        colours = [object_colour(im) for im in styled]
        kept = [overlap(s, p) for s, p in zip(styled, plain)]
        report = (f"{style}, {colour} {shape}: with {with_it}; without {without}; colours {colours}; "
                  f"overlap {np.round(kept, 2).tolist()}")
        print(report)
        if not (sum(v == style for v in with_it) >= 8 and sum(v == style for v in without) <= 1
                and sum(c == colour for c in colours) >= 8 and sum(o >= 0.5 for o in kept) >= 8):
            failures.append(report)
    assert not failures, "\n".join(failures)

"""Generation on the embedded base: determinism, metadata, grids, schedulers, validation."""

import json

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.generate import GenerateSettings, generate, write_outputs
from sdlora.schedulers import SCHEDULERS


def pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_pixels_other_seed_other_pixels(embedded):
    s = GenerateSettings(prompts=("a red circle",), seed=7, steps=8)
    a, b = generate(embedded, s, progress=False), generate(embedded, s, progress=False)
    assert np.array_equal(pixels(a[0]), pixels(b[0]))
    c = generate(embedded, GenerateSettings(prompts=("a red circle",), seed=8, steps=8), progress=False)
    assert np.abs(pixels(a[0]) - pixels(c[0])).mean() > 1.0


def test_picture_k_of_a_batch_is_seed_plus_k(embedded):
    batch = generate(embedded, GenerateSettings(prompts=("a blue square",), seed=3, num=3, steps=8), progress=False)
    assert [r.seed for r in batch] == [3, 4, 5]
    alone = generate(embedded, GenerateSettings(prompts=("a blue square",), seed=5, steps=8), progress=False)
    # Batched and single matmuls may round differently; the pictures are the same up to that.
    assert np.abs(pixels(batch[2]) - pixels(alone[0])).max() <= 2


def test_negative_prompt_and_guidance_matter(embedded):
    plain = generate(embedded, GenerateSettings(prompts=("a red circle",), steps=8), progress=False)[0]
    neg = generate(embedded, GenerateSettings(prompts=("a red circle",), negative="red", steps=8), progress=False)[0]
    low = generate(embedded, GenerateSettings(prompts=("a red circle",), guidance=1.0, steps=8), progress=False)[0]
    assert np.abs(pixels(plain) - pixels(neg)).mean() > 1.0
    assert np.abs(pixels(plain) - pixels(low)).mean() > 1.0


def test_size_other_than_native(embedded):
    [r] = generate(embedded, GenerateSettings(prompts=("a red circle",), steps=2, width=96, height=64), progress=False)
    assert r.image.size == (96, 64)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs(embedded, name):
    [r] = generate(embedded, GenerateSettings(prompts=("a green triangle",), steps=8, scheduler=name), progress=False)
    arr = pixels(r).astype(np.float32)
    assert arr.shape == (64, 64, 3) and arr.std() > 5.0  # not a flat field
    # Not noise either: neighbouring pixels of noise differ by about 1.13 standard deviations
    # (E|a - b| = 2 sigma / sqrt(pi)); a drawn shape on a ground changes at its outline only.
    roughness = np.abs(np.diff(arr, axis=1)).mean() / arr.std()
    assert roughness < 0.3, f"{name}: neighbour difference {roughness:.2f} standard deviations"


def test_png_metadata_holds_the_settings(embedded, tmp_path):
    s = GenerateSettings(prompts=("a yellow diamond",), negative="blue", seed=11, steps=4, guidance=3.5, scheduler="ddim")
    [path] = write_outputs(generate(embedded, s, progress=False), tmp_path / "one.png", s.num)
    info = Image.open(path).info
    meta = json.loads(info["sdlora"])
    assert meta == {**meta, "prompt": "a yellow diamond", "negative": "blue", "seed": 11, "steps": 4,
                    "guidance": 3.5, "scheduler": "ddim", "width": 64, "height": 64, "base": "embedded"}
    assert info["parameters"].splitlines() == [
        "a yellow diamond", "Negative prompt: blue",
        "Steps: 4, Sampler: ddim, CFG scale: 3.5, Seed: 11, Size: 64x64, Model: embedded",
    ]


def test_grid_and_pictures_are_written(embedded, tmp_path):
    s = GenerateSettings(prompts=("a red circle", "a blue square"), num=2, steps=2)
    paths = write_outputs(generate(embedded, s, progress=False), tmp_path / "grid.png", s.num)
    assert [p.name for p in paths] == ["grid.png", "grid-00-00.png", "grid-00-01.png", "grid-01-00.png", "grid-01-01.png"]
    grid = Image.open(paths[0])
    assert grid.width > 2 * 64 * 2 and grid.height > 2 * 64 * 2  # two upscaled columns and rows, plus labels
    assert json.loads(Image.open(paths[4]).info["sdlora"])["prompt"] == "a blue square"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"width": 65}, "width 65 is not a multiple of 8"),
        ({"height": 0}, "height 0 is not a multiple of 8"),
        ({"num": 0}, "num must be between"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"seed": -1}, "seed must be between"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'"),
        ({"prompts": ()}, "no prompt given"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SdloraError, match=message):
        GenerateSettings(**{"prompts": ("x",), **kwargs})

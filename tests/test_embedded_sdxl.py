"""The SDXL-family embedded base (issue 15, point 4): samples/embedded-sdxl loads as SDXL, fits its budget, draws
the named colours, and takes a style adapter end to end through `sdlora train` and `sdlora generate`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.pipelines import load_base
from tests.test_cli import ENV
from train_scripts.shapes import dominant_foreground_color

FOLDER = Path(__file__).resolve().parents[1] / "samples" / "embedded-sdxl"


def test_it_is_an_sdxl_base_within_budget():
    base = load_base("embedded-sdxl")
    assert base.family == "sdxl" and set(base.models()) == {"unet", "text_encoder", "text_encoder_2"}
    assert base.pipe.unet.config.addition_embed_type == "text_time"
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, size
    build = json.loads((FOLDER / "BUILD.json").read_text())
    assert build["family"] == "sdxl" and build["steps_done"] == build["unet_steps"]


def test_it_draws_the_named_colour_through_sdlora_generate():
    """As the SD1 base's colour test, through sdlora's own generate() (a fresh StableDiffusionXLPipeline per call,
    both encoders, pooled embedding and size ids): the named colour is the picture's dominant one, and the ground
    is clean (a pipeline that lost the base's force_zeros_for_empty_prompt = False guided away from zeros the
    base never saw and drew noise whose dominant colour was still right)."""
    from sdlora.generate import GenerateSettings, generate

    base = load_base("embedded-sdxl")
    assert base.pipeline_with().config.force_zeros_for_empty_prompt is False
    hits, rough = {}, []
    for colour, prompt in {"red": "a red circle", "blue": "a blue square", "green": "a green triangle"}.items():
        images = [g.image for g in generate(base, GenerateSettings((prompt,), num=6, steps=20), progress=False)]
        hits[prompt] = sum(dominant_foreground_color(im) == colour for im in images)
        # a flat white ground: the picture's corners (8x8 each) hardly vary
        rough += [np.asarray(im, dtype=np.float32)[c].std(axis=(0, 1)).max() for im in images
                  for c in (np.s_[:8, :8], np.s_[:8, -8:], np.s_[-8:, :8], np.s_[-8:, -8:])]
    assert all(n >= 5 for n in hits.values()), hits
    assert np.median(rough) < 8, np.median(rough)


def test_sdxl_style_training_and_generation_end_to_end(tmp_path):
    """`sdlora train` with the defaults on the SDXL base (an adapter on the UNet and both text encoders),
    then `sdlora generate` with it: the pictures change, and toward the style (neon: a dark ground)."""
    styles = Path(__file__).resolve().parents[1] / "samples" / "styles" / "neon"
    run = subprocess.run([sys.executable, "-m", "sdlora", "train", str(styles), "--base", "embedded-sdxl",
                          "--out", str(tmp_path / "run"), "--steps", "150", "--quiet"],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert run.returncode == 0, run.stderr
    adapter = Path(run.stdout.strip().splitlines()[-1])
    from sdlora.adapter_io import read_adapter_file

    af = read_adapter_file(adapter)
    assert af.base_family == "sdxl" and set(af.roles()) == {"unet", "text_encoder", "text_encoder_2"}
    pictures = {}
    for label, extra in (("plain", []), ("neon", ["--adapter", str(adapter)])):
        out = tmp_path / f"{label}.png"
        proc = subprocess.run([sys.executable, "-m", "sdlora", "generate", "a red circle, zneon", "--base",
                               "embedded-sdxl", "--seed", "1", "--num", "4", "--steps", "20", "--out", str(out),
                               "--quiet", *extra], capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr
        pictures[label] = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert np.abs(pictures["neon"] - pictures["plain"]).mean() > 10
    assert pictures["neon"].mean() < pictures["plain"].mean() - 20  # neon's black ground

"""The `sdlora` command end to end, in a real subprocess as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def sdlora(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_generate_writes_a_png_with_its_settings_and_shows_progress(tmp_path):
    out = tmp_path / "red.png"
    proc = sdlora("generate", "a red circle", "--out", str(out), "--seed", "4", "--steps", "6", "--size", "64x64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "generating" in proc.stderr and "6/6" in proc.stderr  # the progress bar ran to the end
    meta = json.loads(Image.open(out).info["sdlora"])
    assert (meta["prompt"], meta["seed"], meta["steps"]) == ("a red circle", 4, 6)
    again = tmp_path / "again.png"
    assert sdlora("generate", "a red circle", "--out", str(again), "--seed", "4", "--steps", "6", "--quiet").returncode == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "/no/such/base"], "no base at '/no/such/base'"),
        (["--size", "65x64"], "width 65 is not a multiple of 8"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, message):
    out = tmp_path / "x.png"
    proc = sdlora("generate", "a red circle", "--out", str(out), *args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdlora: error: ") and message in lines[0], proc.stderr
    assert not out.exists()


def test_generate_on_a_quantized_base_reports_its_bits(tmp_path):
    out = tmp_path / "q.png"
    proc = sdlora("generate", "a green triangle", "--out", str(out), "--quant", "nf4", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    assert "unet: " in proc.stderr and "bits per parameter" in proc.stderr
    assert Image.open(out).size == (64, 64)
    assert json.loads(Image.open(out).info["sdlora"])["quant"] == "nf4"


def test_help_lists_generate():
    proc = sdlora("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout

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


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    from sdlora.adapter_io import save_adapter
    from sdlora.adapters import AdapterConfig
    from sdlora.inject import adapter_layers
    from sdlora.pipelines import load_base
    from tests.core_helpers import randomize

    folder = tmp_path_factory.mktemp("adapters")
    base = load_base("embedded")
    base.add_adapter("style", AdapterConfig(rank=4, alpha=4), targets="linear", text_encoder=True)
    for model in base.models().values():
        # std 0.15: a strong but sane change; at 0.3 the embedded base v2 draws saturated noise, where rounding
        # differences of 1e-6 (a rank-4 resize) grow to 15 levels in a few pixels
        randomize(adapter_layers(model), "style", seed=1, std=0.15)
    return {fmt: save_adapter(base, "style", folder / f"style-{fmt}.safetensors", fmt, trigger_words=["zdots"])
            for fmt in ("sdlora", "kohya", "diffusers")}


def test_inspect_and_inspect_json(adapter_files):
    proc = sdlora("inspect", str(adapter_files["kohya"]))
    assert proc.returncode == 0, proc.stderr
    assert "format: kohya" in proc.stdout and "ss_network_dim: 4" in proc.stdout
    info = json.loads(sdlora("inspect", str(adapter_files["sdlora"]), "--json").stdout)
    assert (info["format"], info["method"], info["ranks"], info["trigger_words"]) == ("sdlora", "lora", [4], ["zdots"])


def test_export_between_formats_keeps_the_weights(adapter_files, tmp_path):
    out = tmp_path / "k.safetensors"
    proc = sdlora("export", str(adapter_files["diffusers"]), "--format", "kohya", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{adapter_files['diffusers']}: diffusers lora" in proc.stderr  # it says what it found
    from safetensors.torch import load_file

    assert load_file(str(out)).keys() == load_file(str(adapter_files["kohya"])).keys()


def test_generate_with_adapters_in_every_format_gives_the_same_picture(adapter_files, tmp_path):
    pictures = []
    for fmt, path in adapter_files.items():
        out = tmp_path / f"{fmt}.png"
        proc = sdlora("generate", "a red circle", "--adapter", f"{path}:0.9:0.5", "--out", str(out), "--steps", "6",
                      "--quiet")
        assert proc.returncode == 0, proc.stderr
        pictures.append(np.asarray(Image.open(out), dtype=np.int16))
    plain = tmp_path / "plain.png"
    assert sdlora("generate", "a red circle", "--out", str(plain), "--steps", "6", "--quiet").returncode == 0
    assert all(np.array_equal(p, pictures[0]) for p in pictures)
    assert np.abs(pictures[0] - np.asarray(Image.open(plain), dtype=np.int16)).mean() > 1.0
    assert json.loads(Image.open(tmp_path / "kohya.png").info["sdlora"])["adapters"] == [f"{adapter_files['kohya']}:0.9:0.5"]


def test_generate_with_a_bad_adapter_says_so_in_one_line(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"pickle")
    proc = sdlora("generate", "a red circle", "--adapter", f"{bad}:0.5", "--out", str(tmp_path / "o.png"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "never unpickles" in lines[0]


def test_merge_resize_bake_and_extract_from_the_command_line(adapter_files, tmp_path):
    merged = tmp_path / "merged.safetensors"
    # the same adapter twice at half weight is the adapter once, exactly
    proc = sdlora("merge", f"{adapter_files['sdlora']}:0.5", f"{adapter_files['kohya']}:0.5", "--out", str(merged))
    assert proc.returncode == 0 and "relative error 0" in proc.stderr, proc.stderr
    small = tmp_path / "small.safetensors"
    proc = sdlora("resize", str(merged), "--rank", "4", "--format", "kohya", "--out", str(small))
    assert proc.returncode == 0, proc.stderr
    err = float(proc.stderr.strip().rsplit(" ", 1)[-1])
    assert err < 1e-5  # rank 4 holds the rank-4 original whole
    baked = tmp_path / "baked"
    assert sdlora("bake", f"{small}:1.0", "--out", str(baked)).returncode == 0
    pics = []
    for args in (["--base", str(baked)], ["--adapter", str(adapter_files["sdlora"])]):
        out = tmp_path / f"p{len(pics)}.png"
        assert sdlora("generate", "a red circle", "--out", str(out), "--steps", "5", "--quiet", *args).returncode == 0
        pics.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(pics[0] - pics[1]).max() <= 1  # the baked base draws what base + adapter draws
    proc = sdlora("extract", "--tuned", str(baked), "--rank", "4", "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 0 and float(proc.stderr.strip().rsplit(" ", 1)[-1]) < 1e-4, proc.stderr
    proc = sdlora("resize", str(merged), "--out", str(tmp_path / "y.safetensors"))
    assert proc.returncode == 2  # argparse: --rank or --energy is required


def test_generate_compare_puts_the_plain_row_above_the_adapter_row(adapter_files, tmp_path):
    out = tmp_path / "ab.png"
    common = ["--out", str(out), "--steps", "4", "--num", "2", "--quiet"]
    proc = sdlora("generate", "a red circle", "--adapter", str(adapter_files["kohya"]), "--compare", *common)
    assert proc.returncode == 0, proc.stderr
    plain = tmp_path / "plain.png"
    sdlora("generate", "a red circle", "--out", str(plain), "--steps", "4", "--num", "2", "--quiet")
    with_adapter = tmp_path / "with.png"
    sdlora("generate", "a red circle", "--adapter", str(adapter_files["kohya"]), "--out", str(with_adapter),
           "--steps", "4", "--num", "2", "--quiet")

    def pixels(p):
        return np.asarray(Image.open(p))

    for k in range(2):  # row 0 = without, row 1 = with, the same seeds
        assert np.array_equal(pixels(tmp_path / f"ab-00-0{k}.png"), pixels(tmp_path / f"plain-00-0{k}.png"))
        assert np.array_equal(pixels(tmp_path / f"ab-01-0{k}.png"), pixels(tmp_path / f"with-00-0{k}.png"))
    assert not np.array_equal(pixels(tmp_path / "ab-00-00.png"), pixels(tmp_path / "ab-01-00.png"))
    proc = sdlora("generate", "a red circle", "--compare", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "give at least one --adapter" in proc.stderr


def test_xy_draws_the_web_page_grid_for_each_prompt_and_refuses_a_bad_axis(tmp_path):
    from sdlora.adapter_io import save_adapter
    from sdlora.adapters import AdapterConfig
    from sdlora.inject import adapter_layers
    from sdlora.pipelines import load_base
    from tests.core_helpers import randomize

    library = tmp_path / "lib"
    for seed, name in enumerate(("a", "b")):
        base = load_base("embedded")
        base.add_adapter(name, AdapterConfig(rank=2, seed=seed), targets="attn")
        randomize(adapter_layers(base.pipe.unet), name, seed, std=0.1)
        save_adapter(base, name, library / f"{name}.safetensors", "kohya")
    out = tmp_path / "grid.png"
    proc = sdlora("xy", "a red circle", "a blue square", "--library", str(library), "--x", "a=0,1", "--y", "b=0,0.5,1",
                  "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    one = tmp_path / "one.png"
    assert sdlora("xy", "a red circle", "--library", str(library), "--x", "a=0,1", "--y", "b=0,0.5,1", "--steps", "2",
                  "--out", str(one)).returncode == 0
    grid, single = Image.open(out), Image.open(one)
    assert grid.height > 2 * single.height - 20 and grid.width > single.width  # two grids stacked, labelled
    proc = sdlora("xy", "a red circle", "--library", str(library), "--x", "a:0,1", "--y", "b=1", "--out", str(one))
    assert proc.returncode == 2 and "axis 'a:0,1' is not NAME=W,W,..." in proc.stderr
    proc = sdlora("xy", "a red circle", "--library", str(library), "--x", "zz=0,1", "--y", "b=1", "--out", str(one))
    assert proc.returncode == 2 and "no adapter named 'zz'" in proc.stderr


def test_debug_shows_the_traceback_behind_the_one_line(tmp_path):
    out = tmp_path / "x.png"
    proc = sdlora("--debug", "generate", "a red circle", "--out", str(out), "--size", "65x64")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sdlora: error: width 65 is not a multiple of 8")


def test_every_training_setting_is_a_flag_with_its_default_and_one_option_list():
    """The train flags are built from TrainConfig's fields: a new field is a flag and a TOML key at once."""
    import dataclasses

    from sdlora.adapters import trainable_methods
    from sdlora.choices import TRAIN_METHODS, TRAIN_QUANT, UNET_PRESETS
    from sdlora.cli import build_parser
    from sdlora.training.config import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    actions = {a.dest: a for a in train._actions}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(fields) <= set(actions) and set(actions) - set(fields) == {"help", "config", "quiet"}
    assert actions["quant"].choices == TRAIN_QUANT and actions["targets"].choices == UNET_PRESETS
    assert actions["method"].choices == TRAIN_METHODS == trainable_methods()
    assert f"(default {TrainConfig.rank})" in actions["rank"].help and actions["out_dir"].option_strings == ["--out"]
    args = parser.parse_args(["train", "data", "--out", "o", "--rank", "3", "--validation-prompt", "a", "--validation-prompt",
                              "b", "--text-encoder", "--lr", "0.01"])
    cfg = TrainConfig.load(None, **{name: getattr(args, name) for name in fields})
    assert (cfg.data_dir, cfg.out_dir, cfg.rank, cfg.validation_prompts, cfg.text_encoder, cfg.lr) == \
        ("data", "o", 3, ("a", "b"), True, 0.01)
    assert cfg.steps == TrainConfig.steps  # unset flags keep the default (or the config file's value)

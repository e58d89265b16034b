"""Files crafted to be wrong (issue 16): every command that reads them refuses in one line naming the file and
the key, exits 2 and writes nothing; a merge that would overflow writes nothing; one bad file in the library
costs only its own row."""

import pytest
import torch
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.library import AdapterLibrary
from tests.test_training_data import STYLES

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # (96, 96) in the embedded base


def _kohya(path, **override):
    g = torch.Generator().manual_seed(0)
    tensors = {f"{LIN}.lora_down.weight": torch.randn(4, 96, generator=g) * 0.1,
               f"{LIN}.lora_up.weight": torch.randn(96, 4, generator=g) * 0.1, f"{LIN}.alpha": torch.tensor(4.0)}
    tensors.update({f"{LIN}.{k.replace('__', '.')}": v for k, v in override.items()})
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


BROKEN = {
    "rank-mismatched": ({"lora_up__weight": torch.randn(96, 3)}, "do not pair"),
    "transposed-down": ({"lora_down__weight": torch.randn(96, 4) * 0.1}, "do not pair"),
    "int64": ({"lora_down__weight": torch.ones(4, 96, dtype=torch.int64)}, "is int64, not floating point"),
    "alpha-of-three": ({"alpha": torch.tensor([1.0, 2.0, 3.0])}, "has shape [3], but it must hold one number"),
}


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_modules_are_refused_by_every_command(tmp_path, capsys, kind):
    override, message = BROKEN[kind]
    bad = _kohya(tmp_path / f"{kind}.safetensors", **override)
    out = tmp_path / "out.safetensors"
    for args in (["inspect", bad], ["export", bad, "--format", "sdlora", "--out", out],
                 ["export", bad, "--format", "kohya", "--out", out], ["merge", f"{bad}:0.5", "--out", out],
                 ["resize", bad, "--rank", "2", "--out", out],
                 ["generate", "a red circle", "--adapter", bad, "--steps", "2", "--out", tmp_path / "p.png"]):
        code, err = run(capsys, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0] and bad.name in lines[0], (args, err)
        assert not out.exists() and not (tmp_path / "p.png").exists()


def test_path_like_kohya_names_and_foreign_keys_are_refused_not_dropped(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_../../etc"
    bad = tmp_path / "dots.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 96, generator=g),
               f"{name}.lora_up.weight": torch.randn(96, 4, generator=g)}, str(bad))
    for fmt in ("kohya", "sdlora"):
        out = tmp_path / f"out-{fmt}.safetensors"
        code, err = run(capsys, "export", bad, "--format", fmt, "--out", out)
        assert code == 2 and "dots.safetensors" in err and not out.exists(), err
    mixed = _kohya(tmp_path / "mixed.safetensors", **{"extra__weight": torch.ones(2)})  # a key no format knows
    code, err = run(capsys, "resize", mixed, "--rank", "2", "--out", tmp_path / "r.safetensors")
    assert code == 2 and "no adapter keys sdlora knows" in err and not (tmp_path / "r.safetensors").exists(), err


def test_huge_weights_are_refused_and_an_overflowing_merge_writes_nothing(tmp_path, capsys):
    good = _kohya(tmp_path / "good.safetensors")
    out = tmp_path / "m.safetensors"
    for spec in (f"{good}:1e308", f"{good}:1:-1e308", f"{good}:101"):
        code, err = run(capsys, "merge", spec, "--out", out)
        assert code == 2 and "from -100 to 100" in err and not out.exists(), err
    code, err = run(capsys, "generate", "a red circle", "--adapter", f"{good}:1e308", "--out", tmp_path / "p.png")
    assert code == 2 and "from -100 to 100" in err and not (tmp_path / "p.png").exists(), err
    # Weights in bounds whose product overflows float32: the check of what is about to be written stops it.
    big = _kohya(tmp_path / "big.safetensors", lora_up__weight=torch.full((96, 4), 3e37))
    out.write_bytes(b"keep me")
    code, err = run(capsys, "merge", f"{big}:100", "--out", out)
    assert code == 2 and "NaN or infinite" in err and out.read_bytes() == b"keep me", err
    code, err = run(capsys, "merge", f"{good}:abc", "--out", out)
    assert code == 2 and "weight 'abc' of" in err and "no such adapter file" not in err, err


def test_one_bad_file_in_the_library_costs_only_its_row(tmp_path):
    _kohya(tmp_path / "fine.safetensors")
    _kohya(tmp_path / "three.safetensors", alpha=torch.tensor([1.0, 2.0, 3.0]))
    rows = {e.name: e for e in AdapterLibrary(tmp_path).entries()}
    assert rows["fine"].format == "kohya" and rows["fine"].ranks == "4"
    assert rows["three"].format == "unreadable" and "shape [3]" in rows["three"].method


@pytest.mark.parametrize("line, message", [
    ('lr = "1e-4"', "lr = '1e-4' must be a number"), ("steps = 1.5", "steps = 1.5 must be a whole number"),
    ("steps = true", "steps = True must be a whole number"),
    ('validation_prompts = "a red circle"', "validation_prompts = 'a red circle' must be a list of strings"),
])
def test_toml_values_are_type_checked(tmp_path, capsys, line, message):
    config = tmp_path / "run.toml"
    config.write_text(f'data_dir = "samples/styles/neon"\nout_dir = "{tmp_path / "out"}"\n{line}\n')
    code, err = run(capsys, "train", "--config", config)
    assert code == 2 and message in err and "run.toml" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_paths_that_cannot_be_written_are_one_line_and_results_are_world_readable(tmp_path, capsys):
    good = _kohya(tmp_path / "good.safetensors")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (["export", good, "--format", "kohya", "--out", blocker / "x.safetensors"],
                 ["generate", "a red circle", "--steps", "2", "--out", blocker / "p.png"],
                 ["train", "samples/styles/neon", "--out", blocker, "--steps", "1"]):
        code, err = run(capsys, *args)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.endswith(" modules")]  # less tell()'s line
        assert code == 2 and len(lines) == 1 and "a-file" in lines[0], (args, err)
    assert blocker.read_text() == "x"
    out = tmp_path / "copy.safetensors"
    assert run(capsys, "export", good, "--format", "kohya", "--out", out)[0] == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as a picture gets, not safetensors' 0600


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_closed_pipe_is_no_traceback(tmp_path):
    import subprocess
    import sys

    good = _kohya(tmp_path / "good.safetensors")
    proc = subprocess.run(f"{sys.executable} -m sdlora inspect --json {good} | head -c 10", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and proc.stdout.startswith("{"), proc.stderr


def test_uploads_are_checked_as_pictures_and_the_data_root_is_bounded(tmp_path):
    import os

    from sdlora.errors import SdloraError
    from sdlora.pipelines import load_base
    from sdlora.studio import Limits, Studio

    root = tmp_path / "data"
    root.mkdir()
    studio = Studio(load_base("embedded"), AdapterLibrary(tmp_path / "lib"), tmp_path / "outputs", root,
                    limits=Limits(max_upload_mb=2, max_data_root_mb=3))
    fake = tmp_path / "fake.png"
    fake.write_bytes(os.urandom(1000))
    real = sorted((STYLES / "dots").glob("*.png"))[0]
    with pytest.raises(SdloraError, match="fake.png is not a usable picture: unreadable"):
        studio.add_dataset("bad", [real, fake])
    assert studio.datasets() == []
    (root / "old").mkdir()
    (root / "old" / "filler.bin").write_bytes(os.urandom(int(2.5 * 2**20)))  # what earlier uploads hold
    with pytest.raises(SdloraError, match="would pass its 3 MB limit"):
        studio.add_dataset("more", [real, real.with_suffix(".txt"), _copy_big_png(tmp_path)])
    assert "more" not in studio.datasets()
    assert studio.add_dataset("fine", [real, real.with_suffix(".txt")]) == "fine"  # small enough


def _copy_big_png(tmp_path):
    """A real picture of about 0.6 MB (noise compresses badly)."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (450, 450, 3), dtype=np.uint8)).save(path)
    return path


def test_exports_keep_private_folder_paths_out(tmp_path, capsys):
    import json

    from safetensors import safe_open

    from sdlora.adapter_io import read_adapter_file, write_adapter_file

    af = read_adapter_file(_kohya(tmp_path / "k.safetensors"))
    af.training = {"data_dir": "/home/me/private/cats", "out_dir": "/home/me/runs/cats-1", "base": "embedded", "rank": 4}
    native = tmp_path / "cats.safetensors"
    write_adapter_file(af, native, "kohya")  # kohya names, no base needed
    for fmt in ("kohya",):
        out = tmp_path / f"shared-{fmt}.safetensors"
        assert run(capsys, "export", native, "--format", fmt, "--out", out)[0] == 0
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        training = json.loads(meta["sdlora_training"])
        assert (training["data_dir"], training["out_dir"], training["base"]) == ("cats", "cats-1", "embedded")
        assert "/home/me" not in json.dumps(meta)


def test_every_train_flag_says_its_default():
    import argparse

    from sdlora.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    helps = {o: a.help or "" for a in sub._actions for o in a.option_strings}
    for flag in ("--method", "--rank", "--alpha", "--targets", "--lr", "--seed", "--repeats", "--noise-offset",
                 "--lr-schedule", "--warmup-steps", "--trigger"):
        assert "default" in helps[flag], (flag, helps[flag])


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_a_full_or_read_only_disk_is_one_line_and_the_old_file_stays(tmp_path, capsys, monkeypatch, error):
    """As root these tests cannot make a real read-only folder or fill a disk: the write's last step (the rename
    that would put the new file in place) fails as the kernel would fail it."""
    import os

    good = _kohya(tmp_path / "good.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the earlier file")
    real_replace = os.replace

    def failing(src, dst, *a, **k):
        if str(dst) == str(out):
            err = type(error)(error.errno, error.strerror)
            err.filename = str(dst)
            raise err
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    code, err = run(capsys, "export", good, "--format", "kohya", "--out", out)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.endswith(" modules")]
    assert code == 2 and len(lines) == 1 and error.strerror in lines[0] and "out.safetensors" in lines[0], err
    assert out.read_bytes() == b"the earlier file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind

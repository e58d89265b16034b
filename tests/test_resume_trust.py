"""Resume that trusts nothing (issue 16): an unreadable newest checkpoint falls back to the one before, named;
settings or pictures that are not the run's are refused by field before any work; temporaries of killed writes
go; loss.csv comes back with every row's epoch and learning rate."""

import csv
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.errors import SdloraError
from sdlora.training.config import TrainConfig
from sdlora.training.loop import train
from tests.test_training_data import STYLES


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 6-step run on 8 pictures, checkpoints at steps 2 and 4, and the config that made it (trained once)."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    data.mkdir()
    for p in sorted((STYLES / "dots").glob("*"))[:16]:  # 8 pictures with their captions
        shutil.copy(p, data / p.name)
    cfg = TrainConfig(data_dir=str(data), out_dir=str(root / "out"), rank=4, steps=6, batch_size=2, lr=1e-3,
                      seed=3, checkpoint_every=2, keep_checkpoints=3, validation_split=0.0)
    train(cfg, progress=False)
    return cfg


@pytest.fixture
def run(made, tmp_path):
    """That run's output folder, copied for one test to change."""
    shutil.copytree(made.out_dir, tmp_path / "out")
    return replace(made, out_dir=str(tmp_path / "out"))


def _rows(cfg):
    return list(csv.DictReader(open(f"{cfg.out_dir}/logs/loss.csv")))


@pytest.mark.parametrize("damaged", ["tensors.safetensors", "state.json"])
def test_unreadable_newest_checkpoints_are_skipped_by_name(run, capsys, damaged):
    straight = load_file(f"{run.out_dir}/adapter.safetensors")
    rows = _rows(run)
    ckpts = f"{run.out_dir}/checkpoints"
    data = open(f"{ckpts}/step-00000004/{damaged}", "rb").read()
    open(f"{ckpts}/step-00000004/{damaged}", "wb").write(data[: len(data) // 2])  # cut short, as a full disk does
    (tmp := __import__("pathlib").Path(ckpts) / ".step-00000006.0123abcd.tmp").mkdir()  # a killed write's leftover
    (tmp / "tensors.safetensors").write_bytes(b"partial")
    (__import__("pathlib").Path(run.out_dir) / "adapter.safetensors").unlink()
    capsys.readouterr()
    result = train(replace(run, resume=True), progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint step-00000004" in err and not tmp.exists()
    resumed = load_file(str(result.adapter))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # from step 2, the same adapter
    again = _rows(run)
    assert again == rows and all(r["epoch"] != "" and r["lr"] != "" for r in again)  # restored rows are whole


def test_a_nan_adapter_in_a_checkpoint_is_skipped_not_blamed_on_pictures(run, capsys):
    path = f"{run.out_dir}/checkpoints/step-00000004/tensors.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("adapter/"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path)
    (__import__("pathlib").Path(run.out_dir) / "adapter.safetensors").unlink()
    capsys.readouterr()
    train(replace(run, resume=True), progress=False)
    assert "NaN or infinite values (saved from a diverged run)" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [({"lr": 2e-3}, "lr 0.001 -> 0.002"), ({"rank": 8}, "rank 4 -> 8"),
                                           ({"seed": 4}, "seed 3 -> 4"), ({"targets": "attn"}, "targets 'all' -> 'attn'")])
def test_settings_that_cannot_apply_are_refused_by_field(run, change, named):
    with pytest.raises(SdloraError, match=f"trained with other settings: .*{named}"):
        train(replace(run, resume=True, steps=8, **change), progress=False)
    assert len(_rows(run)) == 6  # nothing was rewritten


def test_other_pictures_are_refused_and_more_steps_are_allowed(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run.data_dir, other)
    next(other.glob("*.png")).unlink()
    with pytest.raises(SdloraError, match="are not those step-00000004 was trained on \\(0 new or changed, 1 gone\\)"):
        train(replace(run, resume=True, data_dir=str(other), steps=8), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(run.data_dir, moved)
    capsys.readouterr()
    result = train(replace(run, resume=True, data_dir=str(moved), steps=8), progress=True)  # same pictures, moved
    assert len(result.losses) == 8
    said = capsys.readouterr().err  # before the first step, what the run found and does
    assert f"train: 8 pictures in {moved}" in said and "encoding 8 pictures into latents" in said

"""The training loop on the embedded base: a short real run, end to end."""

import csv

import pytest
import torch

from sdlora.adapter_io import load_adapter, read_adapter_file
from sdlora.errors import SdloraError
from sdlora.pipelines import load_base
from sdlora.training.config import TrainConfig
from sdlora.training.loop import train
from tests.test_formats import outputs
from tests.test_training_data import STYLES


@pytest.mark.slow
def test_a_short_run_writes_a_working_adapter_and_its_log(tmp_path):
    cfg = TrainConfig(data_dir=str(STYLES / "dots"), out_dir=str(tmp_path), name="dots", rank=4, steps=12,
                      batch_size=4, lr=1e-3, trigger="zdots", seed=3)
    result = train(cfg, progress=False)
    assert result.adapter == tmp_path / "dots.safetensors" and len(result.losses) == 12
    rows = list(csv.DictReader(open(tmp_path / "logs" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13)) and all(float(r["loss"]) >= 0 for r in rows)
    af = read_adapter_file(result.adapter)
    assert af.trigger_words == ["zdots"] and af.training["steps_done"] == 12
    assert (af.training["pictures"], af.training["held_out"]) == (36, 4)  # 10% held out for the validation loss
    val = list(csv.DictReader(open(tmp_path / "logs" / "val_loss.csv")))
    assert [int(r["step"]) for r in val] == [12] and float(val[0]["val_loss"]) > 0
    assert af.training["final_val_loss"] == pytest.approx(float(val[0]["val_loss"]), abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert [round(e.value, 6) for e in events.Scalars("train/loss")] == [float(r["loss"]) for r in rows]
    assert [e.step for e in events.Scalars("val/loss")] == [12]
    base = load_base("embedded")
    load_adapter(base, result.adapter, "dots")
    plain, adapted = outputs(base), outputs(base, "dots")
    assert (plain[1] - adapted[1]).abs().max() > 1e-4  # it learned something that changes the UNet


def test_config_from_toml_with_overrides_and_clear_errors(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('data_dir = "data"\nout_dir = "out"\nrank = 16\nlr = 2e-4\n')
    cfg = TrainConfig.load(toml, rank=None, steps=50)
    assert (cfg.rank, cfg.lr, cfg.steps, cfg.quant) == (16, 2e-4, 50, TrainConfig.quant)
    with pytest.raises(SdloraError, match="unknown training setting\\(s\\): rnak"):
        TrainConfig.load(toml, rnak=3)
    with pytest.raises(SdloraError, match="training setting lr = -1.0 must be a positive number"):
        TrainConfig.load(toml, lr=-1.0)
    with pytest.raises(SdloraError, match="missing training setting\\(s\\): data_dir, out_dir"):
        TrainConfig.load(None)


def _train_cmd(out, *extra, steps=160):
    import sys

    from tests.test_training_data import STYLES as styles

    return [sys.executable, "-m", "sdlora", "train", str(styles / "stripes"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--rank", "4", "--lr", "1e-3", "--seed", "7", "--trigger", "zstripes",
            "--checkpoint-every", "20", "--optimizer", "adamw8bit", "--ema-decay", "0.9", "--lr-schedule", "cosine",
            "--quiet", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kill_9_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(request, tmp_path, family):
    """60 steps, checkpoints every 10, killed after the one at 40 is complete: SD1 on the embedded base; SDXL on
    the tiny SDXL folder (both text encoders trained, the second at its own rate; time ids per picture; mirrored
    and shifted pictures, drawn from the saved RNG)."""
    import os
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps, extra = 60, ()  # killed past 40: the cosine schedule and the EMA are mid-way when it resumes
    if family == "sdxl":
        extra = ("--base", str(request.getfixturevalue("tiny_sdxl_dir")), "--text-encoder-2-lr", "5e-4", "--flip",
                 "--latent-shift", "1")

    def cmd(out, *more):
        return _train_cmd(out, *extra, "--checkpoint-every", "10", *more, steps=steps)

    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "step-00000040" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run, somewhere after step 40
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    subprocess.run(cmd(tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True, timeout=600)

    straight = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = list(csv.DictReader(open(tmp_path / "killed" / "logs" / "loss.csv")))
    straight_rows = list(csv.DictReader(open(tmp_path / "straight" / "logs" / "loss.csv")))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows] and len(rows) == steps
    # only complete checkpoints remain, the last two (of five)
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == [f"step-{steps - 20:08d}", f"step-{steps - 10:08d}"]
    if family == "sdxl":
        roles = {k.split("/", 1)[0] for k in straight}
        assert roles == {"unet", "text_encoder", "text_encoder_2"}, roles


def test_resume_without_a_checkpoint_says_so(tmp_path):
    cfg = TrainConfig(data_dir=str(STYLES / "dots"), out_dir=str(tmp_path), steps=2, resume=True)
    with pytest.raises(SdloraError, match="no complete checkpoint in"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_8bit_optimizer_cosine_schedule_ema_and_validation_pictures(tmp_path):
    from PIL import Image

    from sdlora.training.loop import lr_factor

    cfg = TrainConfig(data_dir=str(STYLES / "mosaic"), out_dir=str(tmp_path), name="m", rank=2, steps=6, batch_size=2,
                      optimizer="paged_adamw8bit", lr_schedule="cosine", warmup_steps=2, ema_decay=0.5,
                      validation_prompts=("a red circle, zmosaic",), validate_every=3, validation_seeds=2)
    with pytest.warns(UserWarning, match="plain 8-bit AdamW is used"):
        result = train(cfg, progress=False)
    assert [round(lr_factor(s, cfg), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    grid = Image.open(tmp_path / "samples" / "step-000006.png")
    assert grid.height > 2 * 64 * 2  # a base row and an adapter row
    assert read_adapter_file(result.adapter).training["ema_decay"] == 0.5


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_naming_the_files_and_keeps_the_checkpoint(tmp_path):
    # An absurd learning rate: after one AdamW step the adapter is ~1e12 and the next loss is not finite.
    cfg = TrainConfig(data_dir=str(STYLES / "dots"), out_dir=str(tmp_path), rank=2, steps=5, batch_size=2, lr=1e12,
                      checkpoint_every=1)
    with pytest.raises(SdloraError, match=r"the loss became (nan|inf) at step \d+ on \d{3}\.png, \d{3}\.png"):
        train(cfg, progress=False)
    kept = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "step-00000001" in kept and not (tmp_path / "adapter.safetensors").exists()


def test_a_new_run_never_writes_over_an_earlier_one(tmp_path):
    (tmp_path / "adapter.safetensors").write_bytes(b"an earlier result")
    cfg = TrainConfig(data_dir=str(STYLES / "dots"), out_dir=str(tmp_path), steps=2)
    with pytest.raises(SdloraError, match="already holds an earlier run's adapter.safetensors.*--resume"):
        train(cfg, progress=False)
    assert (tmp_path / "adapter.safetensors").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # nothing else was written
    (tmp_path / "adapter.safetensors").unlink()
    (tmp_path / "checkpoints" / "step-00000140").mkdir(parents=True)
    with pytest.raises(SdloraError, match=r"earlier run's checkpoints \(step-00000140\)"):
        train(cfg, progress=False)


def test_bad_data_stops_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"broken")
    (data / "a.txt").write_text("x")
    with pytest.raises(SdloraError, match="a.png: unreadable"):
        train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "out"), steps=2), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mixed_precision_runs_back_to_back_keep_fp32_weights(tmp_path):
    """bf16 then fp16 in one process (as the web UI would); the trained weights stay fp32 and the
    losses follow the fp32 run's."""
    from safetensors.torch import load_file

    common = dict(data_dir=str(STYLES / "dots"), steps=3, batch_size=2, rank=2, lr=1e-3, validation_split=0)
    full = train(TrainConfig(out_dir=str(tmp_path / "no"), **common), progress=False)
    bf16 = train(TrainConfig(out_dir=str(tmp_path / "bf16"), mixed_precision="bf16", **common), progress=False)
    assert {t.dtype for t in load_file(str(bf16.adapter)).values()} == {torch.float32}
    assert bf16.losses == pytest.approx(full.losses, rel=0.05) and bf16.losses != full.losses  # autocast ran
    assert read_adapter_file(bf16.adapter).training["precision"] == "bf16"
    if not torch.cuda.is_available():  # accelerate has no fp16 autocast on the CPU: said, and fp32 runs
        with pytest.warns(UserWarning, match="mixed precision fp16 is not supported on cpu; training runs in fp32"):
            fp16 = train(TrainConfig(out_dir=str(tmp_path / "fp16"), mixed_precision="fp16", **common), progress=False)
        assert fp16.losses == full.losses and read_adapter_file(fp16.adapter).training["precision"] == "no"


@pytest.mark.slow
def test_an_sdxl_cli_run_trains_the_chosen_encoders_and_its_adapter_draws(tiny_sdxl_dir, tmp_path):
    """`sdlora train` on an SDXL folder: validation pictures, the second encoder left out with a rate of 0,
    and `sdlora generate` draws with the adapter something else than without it."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sdlora", "train", str(STYLES / "dots"), "--out", str(out), "--base",
                    str(tiny_sdxl_dir), "--steps", "6", "--rank", "4", "--lr", "1e-2", "--text-encoder-2-lr", "0",
                    "--validation-prompt", "a red circle, zdots", "--quiet"], check=True, capture_output=True,
                   timeout=600)
    af = read_adapter_file(out / "adapter.safetensors")
    assert af.roles() == ["text_encoder", "unet"] and af.training["steps_done"] == 6
    assert (out / "samples" / "step-000006.png").exists()
    pictures = []
    for extra in ([], ["--adapter", str(out / "adapter.safetensors")]):
        path = tmp_path / f"picture{len(extra)}.png"
        subprocess.run([sys.executable, "-m", "sdlora", "generate", "a red circle, zdots", "--out", str(path), "--base",
                        str(tiny_sdxl_dir), "--steps", "4", *extra], check=True, capture_output=True, timeout=600)
        pictures.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.int16))
    assert np.abs(pictures[0] - pictures[1]).mean() > 0.5

"""The training loop on the embedded base: a short real run, end to end."""

import csv
import json

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
    assert af.trigger_words == ["zdots"] and af.training["steps_done"] == 12 and af.training["pictures"] == 40
    base = load_base("embedded")
    load_adapter(base, result.adapter, "dots")
    plain, adapted = outputs(base), outputs(base, "dots")
    assert (plain[1] - adapted[1]).abs().max() > 1e-4  # it learned something that changes the UNet


def test_config_from_toml_with_overrides_and_clear_errors(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('data_dir = "data"\nout_dir = "out"\nrank = 16\nlr = 2e-4\n')
    cfg = TrainConfig.load(toml, rank=None, steps=50)
    assert (cfg.rank, cfg.lr, cfg.steps, cfg.quant) == (16, 2e-4, 50, "nf4")
    with pytest.raises(SdloraError, match="unknown training setting\\(s\\): rnak"):
        TrainConfig.load(toml, rnak=3)
    with pytest.raises(SdloraError, match="training setting lr = -1.0 must be a positive number"):
        TrainConfig.load(toml, lr=-1.0)
    with pytest.raises(SdloraError, match="missing training setting\\(s\\): data_dir, out_dir"):
        TrainConfig.load(None)

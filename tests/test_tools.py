"""merge, resize, extract and bake: checked against the mixes they stand for."""

import pytest
import torch

from sdlora.adapter_io import adapter_from_base, load_adapter, save_adapter
from sdlora.errors import SdloraError
from sdlora.mixing import AdapterWeights, Mix
from sdlora.pipelines import load_base
from sdlora.tools.bake import bake
from sdlora.tools.extract import extract
from sdlora.tools.merge import merge, resize
from tests.core_helpers import same_bits, snapshot, table_times_absmax
from tests.test_formats import outputs, trained


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A base holding two LoRA-family adapters, and their files."""
    base = load_base("embedded")
    trained(base, "a", "lora", "all", seed=1)
    trained(base, "b", "vera", "linear", seed=5)
    folder = tmp_path_factory.mktemp("two")
    return base, {n: save_adapter(base, n, folder / f"{n}.safetensors") for n in ("a", "b")}


def _load_af(base, af, name, tmp_path):
    from sdlora.adapter_io import write_adapter_file

    path = write_adapter_file(af, tmp_path / f"{name}.safetensors", "sdlora")
    load_adapter(base, path, name)


def test_concatenating_merge_equals_the_sum_of_the_separate_adapters(two, tmp_path):
    base, _ = two
    merged, report = merge([(adapter_from_base(base, "a"), 0.7), (adapter_from_base(base, "b"), -0.4)])
    assert report.relative_error == 0.0 and report.rank == 8  # 4 + 4 where both adapt a layer
    fresh = load_base("embedded")
    _load_af(fresh, merged, "m", tmp_path)
    expected = outputs(base, mix=Mix({"a": 0.7, "b": -0.4}))
    for got, want in zip(outputs(fresh, "m"), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_svd_merge_error_falls_with_rank_and_is_zero_at_full_rank(two):
    base, _ = two
    parts = [(adapter_from_base(base, "a"), 0.7), (adapter_from_base(base, "b"), -0.4)]
    errors = [merge(parts, rank=r)[1].relative_error for r in (1, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6  # rank 8 holds the whole sum of a rank-4 and a rank-4 update


def test_resize_to_an_energy_share(two):
    base, _ = two
    af = adapter_from_base(base, "a")
    small, report = resize(af, energy=0.8)
    assert report.relative_error <= (1 - 0.8) ** 0.5 + 1e-9
    assert max(m.rank for m in small.modules.values()) <= 4
    with pytest.raises(SdloraError, match="energy share must be in"):
        resize(af, energy=1.5)


def test_dora_adapters_are_not_merged(tmp_path):
    base = trained(load_base("embedded"), "d", "dora", "attn")
    with pytest.raises(SdloraError, match="DoRA adapter"):
        merge([(adapter_from_base(base, "d"), 1.0)])


@pytest.mark.slow
def test_bake_then_extract_round_trip(two, tmp_path):
    base, files = two
    mix = Mix({"a": 0.7, "b": -0.4})
    before = snapshot(base.pipe.unet)
    expected = outputs(base, mix=mix)
    report = bake(base, mix, tmp_path / "baked")
    folder = report.folder
    assert report.requantization_error == 0.0 and report.layers > 0
    assert same_bits(before, snapshot(base.pipe.unet))  # the base is as it was, adapters included
    baked = load_base(str(folder))
    for got, want in zip(outputs(baked), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # extracting the difference back at full rank gives the mix again
    af, report = extract(load_base("embedded"), baked, targets="all", rank=8)
    assert report.relative_error < 1e-5
    fresh = load_base("embedded")
    _load_af(fresh, af, "x", tmp_path)
    for got, want in zip(outputs(fresh, "x"), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(SdloraError, match="exists and is not empty"):
        bake(base, mix, folder)


@pytest.mark.slow
def test_bake_into_a_quantized_base_requantizes_and_reports(two, tmp_path):
    _, files = two
    base = load_base("embedded")
    base.quantize("nf4")
    load_adapter(base, files["a"], "a")
    before = snapshot(base.pipe.unet)
    report = bake(base, Mix({"a": 0.8}), tmp_path / "q")
    assert same_bits(before, snapshot(base.pipe.unet))
    print(f"\n{report}")
    assert report.requantization_error > 0
    baked = load_base(str(report.folder))
    from sdlora.quant import dequantized_weight

    # an untouched quantized layer is written as exactly its dequantized weights
    name = "time_embedding.linear_1"  # quantized, and not in any preset
    assert torch.equal(baked.pipe.unet.get_submodule(name).weight, dequantized_weight(base.pipe.unet.get_submodule(name)))
    # a changed layer holds W0 + 0.8 D put through a fresh NF4 quantization, computed here apart
    import bitsandbytes as bnb

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = base.pipe.unet.get_submodule(name)
    with torch.no_grad():
        merged = dequantized_weight(layer.base_layer) + 0.8 * layer.adapters["a"].delta_weight()
        q = bnb.nn.Params4bit(merged.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
        expected = table_times_absmax(q.data, q.quant_state)  # not bitsandbytes' kernel: core_helpers says why
    assert torch.equal(baked.pipe.unet.get_submodule(name).weight, expected)
    # requantizing re-rounds every weight of a changed layer (a fresh NF4 error, ~9% per layer), so
    # the outputs agree only roughly with the quantized base + mix; this bound guards regressions
    want = outputs(base, mix=Mix({"a": 0.8}))
    for got, w in zip(outputs(baked), want):
        assert float((got - w).norm() / w.norm()) < 0.3


def test_bake_writes_the_schedule_the_adapters_were_trained_for_and_refuses_two_schedules(tmp_path):
    import json

    base = trained(trained(load_base("embedded"), "vpred", "lora", "attn"), "eps", "lora", "attn", seed=5)
    base.adapter_info["vpred"]["training"] = {"prediction_type": "v_prediction", "zero_terminal_snr": True}
    base.adapter_info["eps"]["training"] = {"prediction_type": "epsilon", "zero_terminal_snr": False}
    with pytest.raises(SdloraError, match="trained for different schedules"):
        bake(base, Mix({"vpred": 1.0, "eps": 1.0}), tmp_path / "both")
    assert not (tmp_path / "both").exists()
    bake(base, Mix({"vpred": 1.0, "eps": AdapterWeights(unet=0.0, text_encoder=1.0)}), tmp_path / "v")
    config = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["prediction_type"], config["rescale_betas_zero_snr"]) == ("v_prediction", True)
    # SD1.5 folders ship PNDM, which cannot hold zero terminal SNR: the baked folder samples with Euler
    from diffusers import PNDMScheduler

    base.pipe.scheduler = PNDMScheduler.from_config(base.pipe.scheduler.config)
    bake(base, Mix({"vpred": 1.0}), tmp_path / "pndm")
    config = json.loads((tmp_path / "pndm" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler" and config["rescale_betas_zero_snr"] is True
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    bake(base, Mix({"eps": 1.0}), tmp_path / "eps")
    config = json.loads((tmp_path / "eps" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "epsilon" and not config.get("rescale_betas_zero_snr")

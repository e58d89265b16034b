"""PEFT as the oracle: the same weights in our layers and PEFT's give the same outputs."""

import copy

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model

from sdlora.adapters import AdapterConfig
from sdlora.inject import add_adapter, wrap
from sdlora.mixing import Mix, Mixer
from sdlora.quant import dequantized_weight
from tests.core_helpers import base_model, table_times_absmax

CASES = [("lora", "linear"), ("lora", "conv"), ("dora", "linear"), ("vera", "linear")]


def _peft_and_ours(method, kind, quant):
    ours = base_model(kind, quant)
    ref = copy.deepcopy(ours)
    if kind == "conv" and quant:
        # PEFT has no 4-bit convolution: its reference is a float Conv2d holding exactly our
        # dequantized NF4 weight, the same base layer mathematically.
        ref = base_model(kind, None)
        with torch.no_grad():
            for name in ("0", "2"):
                ref.get_submodule(name).weight.copy_(dequantized_weight(ours.get_submodule(name)))
    if method == "vera":
        cfg = VeraConfig(r=4, target_modules=["0", "2"], projection_prng_key=7, d_initial=0.1)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=method == "dora",
                         init_lora_weights="gaussian")
    peft_model = get_peft_model(ref, cfg).eval()
    layers = wrap(ours, ["0", "2"], "unet")
    add_adapter(layers, "a", AdapterConfig(method=method, rank=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("0", "2"):
            theirs, mine = peft_model.base_model.model.get_submodule(name), layers[name].adapters["a"]
            if method == "vera":
                theirs.vera_lambda_d["default"].copy_(torch.rand(4, generator=gen))
                theirs.vera_lambda_b["default"].copy_(torch.rand(theirs.out_features, generator=gen))
                # PEFT keeps one (r, max_in) / (max_out, r) pair per model and slices it per layer.
                mine.shared_a = theirs.vera_A["default"][:, : theirs.in_features].clone()
                mine.shared_b = theirs.vera_B["default"][: theirs.out_features].clone()
                mine.vera_d.copy_(theirs.vera_lambda_d["default"])
                mine.vera_b.copy_(theirs.vera_lambda_b["default"])
            else:
                b = theirs.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
                mine.down.copy_(theirs.lora_A["default"].weight)
                mine.up.copy_(b)
                if method == "dora":
                    mag = theirs.lora_magnitude_vector["default"].weight
                    mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=gen))
                    mine.magnitude.copy_(mag)
    return peft_model, ours


@pytest.mark.parametrize("quant", [None, "nf4", "nf4-nodq", "fp4"], ids=["float", "nf4", "nf4-nodq", "fp4"])
@pytest.mark.parametrize("method, kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_same_weights_same_outputs_as_peft(method, kind, quant, monkeypatch):
    if quant:  # PEFT's DoRA reads the 4-bit base weight through bitsandbytes' dequantize_4bit, which misreads
        # these 32- and 48-weight rows on AVX512 builds: it gets the format's own values, as our layers compute
        import bitsandbytes as bnb

        monkeypatch.setattr(bnb.functional, "dequantize_4bit", table_times_absmax)
    peft_model, ours = _peft_and_ours(method, kind, quant)
    x = torch.randn(3, 32) if kind == "linear" else torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = peft_model(x)
        with Mixer({"unet": ours}).apply(Mix({"a": 1.0}), mode="unfused"):
            got = ours(x)
        assert (got - ours(x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if quant is None:  # merged into the weights: the same outputs again
        with torch.no_grad(), Mixer({"unet": ours}).apply(Mix({"a": 1.0}), mode="fused"):
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)

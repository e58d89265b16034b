"""Injection into tiny SD1 and SDXL pipelines: every preset x method x base precision trains,
and mixes change the picture."""

import numpy as np
import pytest
import torch

from sdlora.adapters import AdapterConfig
from sdlora.errors import SdloraError
from sdlora.inject import adapter_layers, adapter_parameters, text_encoder_targets, unet_targets, unwrap, wrap
from sdlora.mixing import Mix
from sdlora.pipelines import load_base
from tests.core_helpers import same_bits, snapshot


def unet_inputs(base):
    g = torch.Generator().manual_seed(0)
    unet = base.pipe.unet
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if base.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return torch.randn(1, unet.config.in_channels, 16, 16, generator=g), torch.tensor([500]), hidden, kwargs


def test_presets_grow_and_cover_the_named_layers(tiny_sd1_dir):
    unet = load_base(str(tiny_sd1_dir)).pipe.unet
    attn, linear, everything = (set(unet_targets(unet, p)) for p in ("attn", "linear", "all"))
    n_attention = sum(1 for _, m in unet.named_modules() if hasattr(m, "to_q"))
    assert len(attn) == 4 * n_attention and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in attn)
    assert attn < linear < everything
    assert any(n.endswith("ff.net.2") for n in linear) and any(n.endswith("proj_in") for n in linear)
    assert any(n.endswith("resnets.0.conv1") for n in everything) and any("downsamplers.0.conv" in n for n in everything)


def test_text_encoder_targets_and_wrap_unwrap_restores_the_modules(tiny_sdxl_dir):
    base = load_base(str(tiny_sdxl_dir))
    for model in (base.pipe.text_encoder, base.pipe.text_encoder_2):
        names = text_encoder_targets(model)
        n_layers = model.config.num_hidden_layers
        assert len(names) == 6 * n_layers
        originals = {n: model.get_submodule(n) for n in names}
        wrap(model, names, "text_encoder")
        assert len(adapter_layers(model)) == len(names)
        assert unwrap(model) == len(names)
        assert all(model.get_submodule(n) is m for n, m in originals.items())


@pytest.mark.slow
@pytest.mark.parametrize("family_dir", ["tiny_sd1_dir", "tiny_sdxl_dir"])
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
@pytest.mark.parametrize("preset", ["attn", "linear", "all"])
def test_every_preset_method_and_precision_trains(request, family_dir, quant, method, preset):
    base = load_base(str(request.getfixturevalue(family_dir)))
    if quant:
        base.quantize(quant)
    n = base.add_adapter("a", AdapterConfig(method=method, rank=2, seed=1), targets=preset)
    assert n > 0
    unet = base.pipe.unet
    layers = adapter_layers(unet)
    params = adapter_parameters(layers, "a")
    frozen = snapshot(unet)
    frozen = {k: v for k, v in frozen.items() if ".adapters." not in k}
    sample, t, hidden, kwargs = unet_inputs(base)
    opt = torch.optim.SGD(params, lr=0.5)
    with base.mixer.apply(Mix({"a": 1.0}), mode="unfused"):
        before = unet(sample, t, hidden, **kwargs).sample
        before.pow(2).mean().backward()
        grads = {name for name, p in unet.named_parameters() if p.grad is not None}
        opt.step()
        with torch.no_grad():
            after = unet(sample, t, hidden, **kwargs).sample
    assert grads and all(".adapters.a." in g for g in grads)  # gradients reach only the adapter
    assert (after - before).abs().max() > 1e-6  # one step changed the output
    now = {k: v for k, v in snapshot(unet).items() if ".adapters." not in k}
    assert same_bits(frozen, now)  # the (quantized) base did not move


@pytest.mark.slow
def test_text_encoder_adapters_train(tiny_sd1_dir):
    base = load_base(str(tiny_sd1_dir))
    base.quantize("nf4")
    base.add_adapter("t", AdapterConfig(rank=2), targets="attn", text_encoder=True)
    te = base.pipe.text_encoder
    ids = base.pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    params = adapter_parameters(adapter_layers(te), "t")
    assert params
    opt = torch.optim.SGD(params, lr=1.0)
    with base.mixer.apply(Mix({"t": 1.0})):
        before = te(ids)[0]
        before.pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            assert (te(ids)[0] - before).abs().max() > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("family_dir, quant", [("tiny_sd1_dir", None), ("tiny_sd1_dir", "nf4"), ("tiny_sdxl_dir", "int8")])
def test_a_mix_of_two_adapters_changes_the_picture(request, family_dir, quant):
    from sdlora.generate import GenerateSettings, generate
    from tests.core_helpers import randomize

    base = load_base(str(request.getfixturevalue(family_dir)))
    if quant:
        base.quantize(quant)
    for i, (name, method) in enumerate([("a", "lora"), ("b", "dora")]):
        base.add_adapter(name, AdapterConfig(method=method, rank=2, seed=i), targets="linear", text_encoder=True)
        for model in base.models().values():
            randomize({k: v for k, v in adapter_layers(model).items() if name in v.adapters}, name, seed=i, std=0.5)
    s = GenerateSettings(prompts=("a red circle",), steps=3, width=64, height=64)
    plain = np.asarray(generate(base, s, progress=False)[0].image, dtype=np.int16)
    mixed = np.asarray(generate(base, s, progress=False, mix=Mix({"a": 1.0, "b": 0.7}))[0].image, dtype=np.int16)
    again = np.asarray(generate(base, s, progress=False)[0].image, dtype=np.int16)
    assert np.abs(mixed - plain).mean() > 1.0
    assert np.array_equal(plain, again)  # leaving the mix restored the model


def test_bad_injection_input(tiny_sd1_dir):
    base = load_base(str(tiny_sd1_dir))
    before = snapshot(base.pipe.unet)
    with pytest.raises(SdloraError, match="unknown target preset 'everything'"):
        base.add_adapter("a", AdapterConfig(), targets="everything")
    with pytest.raises(SdloraError, match="rank must be an integer of at least 1"):
        AdapterConfig(rank=0)
    with pytest.raises(SdloraError, match="unknown adapter method 'boft'"):
        AdapterConfig(method="boft")
    assert same_bits(before, snapshot(base.pipe.unet)) and not adapter_layers(base.pipe.unet)
    base.quantize("nf4")
    with pytest.raises(SdloraError, match="already quantized"):
        base.quantize("int8")


@pytest.mark.slow
def test_per_sample_generation_equals_each_mix_alone(tiny_sd1_dir):
    """One batch of two pictures with two mixes (guidance doubles it to four) gives each picture
    what its mix gives alone."""
    from sdlora.generate import GenerateSettings, generate
    from tests.core_helpers import randomize

    base = load_base(str(tiny_sd1_dir))
    base.quantize("nf4")
    for i, (name, method) in enumerate([("a", "lora"), ("b", "dora")]):
        base.add_adapter(name, AdapterConfig(method=method, rank=2, seed=i), targets="linear", text_encoder=True)
        for model in base.models().values():
            randomize({k: v for k, v in adapter_layers(model).items() if name in v.adapters}, name, seed=i, std=0.5)
    mixes = [Mix({"a": 1.0}), Mix({"b": 0.8, "a": -0.3})]
    settings = GenerateSettings(prompts=("a red circle",), num=2, seed=5, steps=3)
    batch = generate(base, settings, progress=False, mix=mixes)
    for k, mix in enumerate(mixes):
        # The same batch shape with one shared mix: only the per-sample weighting differs.
        shared = generate(base, settings, progress=False, mix=mix)[k]
        diff = np.abs(np.asarray(batch[k].image, dtype=np.int16) - np.asarray(shared.image, dtype=np.int16))
        assert diff.max() <= 1, (k, diff.max())
        # Alone (batch of one): the same picture up to the rounding of other matmul shapes.
        alone = generate(base, GenerateSettings(prompts=("a red circle",), seed=5 + k, steps=3), progress=False,
                         mix=mix)[0]
        diff = np.abs(np.asarray(batch[k].image, dtype=np.int16) - np.asarray(alone.image, dtype=np.int16))
        assert diff.mean() < 0.5, (k, diff.mean())
    with pytest.raises(SdloraError, match="per-sample mixes for 3 pictures"):
        generate(base, GenerateSettings(prompts=("x",), num=3, steps=1), progress=False, mix=mixes)

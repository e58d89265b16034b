"""Mixing invariants (as in diffusers' LoRA tests): exact restore, modes agree, per-sample batches."""

import random

import pytest
import torch

from sdlora.adapters import AdapterConfig
from sdlora.errors import SdloraError
from sdlora.inject import add_adapter, wrap
from sdlora.mixing import AdapterWeights, Mix, Mixer
from tests.core_helpers import adapted, base_model, randomize, same_bits, snapshot

X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
XC = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_fresh_adapter_and_weight_zero_give_the_base_exactly(method, quant):
    model = base_model("linear", quant)
    with torch.no_grad():
        expected = model(X)
    layers = wrap(model, ["0", "2"], "unet")
    add_adapter(layers, "fresh", AdapterConfig(method=method, rank=4))
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        assert torch.equal(model(X), expected)  # no mix: no adapters
        with mixer.apply(Mix({"fresh": 1.0}), mode="unfused"):
            fresh = model(X)
        from tests.core_helpers import randomize

        randomize(layers, "fresh", seed=1)
        with mixer.apply(Mix({"fresh": 0.0})):
            zero = model(X)
    assert torch.equal(zero, expected)
    if method == "vera":  # VeRA's b starts at zero, so the delta is exactly zero
        assert torch.equal(fresh, expected)
    else:  # up starts at zero (LoRA), magnitude = ||W0|| (DoRA): zero up to rounding
        torch.testing.assert_close(fresh, expected, atol=1e-6, rtol=0)


def test_100_random_fused_mixes_leave_the_base_bit_for_bit():
    model, _ = adapted("linear", None, {"a": "lora", "b": "dora", "c": "vera"})
    before = snapshot(model)
    mixer = Mixer({"unet": model})
    rng = random.Random(0)
    for _ in range(100):
        mix = Mix({n: rng.uniform(-2, 2) for n in rng.sample(["a", "b", "c"], rng.randint(1, 3))})
        with torch.no_grad(), mixer.apply(mix, mode="fused"):
            model(X)
    assert same_bits(before, snapshot(model))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_equals_unfused(kind):
    methods = {"a": "lora", "b": "dora"} if kind == "conv" else {"a": "lora", "b": "dora", "c": "vera"}
    model, _ = adapted(kind, None, methods)
    mix = Mix({n: 0.3 + 0.4 * i for i, n in enumerate(methods)})
    x = X if kind == "linear" else XC
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        with mixer.apply(mix, mode="fused"):
            fused = model(x)
        with mixer.apply(mix, mode="unfused"):
            unfused = model(x)
        assert (fused - model(x)).abs().max() > 1e-3
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_concatenated_rank_equals_sum_of_separate_adapters(quant):
    """One pair of matmuls over ranks 4+4+4 equals adding each adapter's own delta."""
    model, layers = adapted("linear", quant, {"a": "lora", "b": "lora", "c": "vera"})
    layer = layers["0"]
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    with torch.no_grad():
        out = layer.base_layer(X)
        together = layer.delta_output(X, out, weights)
        separate = sum(w * layer.adapters[n].output_delta(X, out, layer.base_weight) for n, w in weights.items())
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_per_sample_batch_equals_each_sample_alone(quant, guidance):
    model, _ = adapted("linear", quant, {"a": "lora", "b": "dora", "c": "vera"})
    mixes = [Mix({"a": 1.0}), Mix({"b": 0.5, "c": 1.5}), Mix({}), Mix({"a": -0.5, "b": 1.0, "c": 0.2})]
    x = torch.cat([X, X * 0.5]) if guidance else X  # guidance doubles the batch: [uncond; cond]
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        with mixer.apply(mixes):
            batched = model(x)
        for i, mix in enumerate(mixes):
            rows = [i, i + len(mixes)] if guidance else [i]
            with mixer.apply(mix, mode="unfused"):
                alone = model(x[rows])
            torch.testing.assert_close(batched[rows], alone, atol=1e-5, rtol=0)


def test_block_weights_and_step_ranges():
    w = AdapterWeights(unet=0.8, text_encoder=0.3, blocks={"down": 0.5, "up": 0.0}, steps=(2, 5))
    assert w.weight_for("unet.down.1", 2) == pytest.approx(0.4)
    assert w.weight_for("unet.up.0", 3) == 0.0
    assert w.weight_for("unet.mid", 4) == pytest.approx(0.8)
    assert w.weight_for("text_encoder", 2) == pytest.approx(0.3)
    assert w.weight_for("unet.down.1", 5) == 0.0 and w.weight_for("unet.down.1", 1) == 0.0


def test_a_step_range_switches_the_adapter_on_and_off():
    model, _ = adapted("linear", None, {"a": "lora"})
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        base = model(X)
        with mixer.apply(Mix({"a": AdapterWeights(steps=(1, 2))})) as plan:
            assert plan.fused is False  # step ranges run unfused
            outs = []
            for step in range(3):
                plan.step = step
                outs.append(model(X))
    assert torch.equal(outs[0], base) and torch.equal(outs[2], base)
    assert (outs[1] - base).abs().max() > 1e-3


def test_mixes_in_threads_do_not_leak():
    """Each thread sees only the mix its own call set (a ContextVar, not module state)."""
    import threading

    model, _ = adapted("linear", "nf4", {"a": "lora", "b": "lora"})
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        expected = {}
        for name in ("a", "b"):
            with mixer.apply(Mix({name: 1.0})):
                expected[name] = model(X)
    results, barrier = {}, threading.Barrier(2)

    def run(name):
        with torch.no_grad(), mixer.apply(Mix({name: 1.0})):
            barrier.wait()  # both mixes are active at once
            results[name] = [model(X) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for name in ("a", "b"):
        assert all(torch.equal(r, expected[name]) for r in results[name])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: m.apply(Mix({"nope": 1.0})), "not loaded: nope"),
        (lambda m: m.apply(Mix({"a": float("nan")})), "must be a number from -100 to 100"),
        (lambda m: m.apply(Mix({"a": AdapterWeights(blocks={"left": 1.0})})), "unknown block name"),
        (lambda m: m.apply(Mix({"a": 1.0}), mode="sideways"), "unknown mix mode"),
    ],
)
def test_bad_mixes_are_refused_and_change_nothing(make, message):
    model, _ = adapted("linear", None, {"a": "lora"})
    before = snapshot(model)
    mixer = Mixer({"unet": model})
    with pytest.raises(SdloraError, match=message):
        with make(mixer):
            pass
    assert same_bits(before, snapshot(model))


def test_fusing_a_quantized_base_is_refused():
    model, _ = adapted("linear", "nf4", {"a": "lora"})
    with pytest.raises(SdloraError, match="cannot fuse into a quantized base"):
        with Mixer({"unet": model}).apply(Mix({"a": 1.0}), mode="fused"):
            pass


@pytest.mark.parametrize("method, b_names", [("lora", {"up"}), ("dora", {"up"}), ("vera", {"vera_b"})])
def test_loraplus_groups_give_b_the_higher_rate(method, b_names):
    from sdlora.adapters.optim import param_groups

    model, layers = adapted("linear", None, {"a": method})
    groups = param_groups(layers, "a", lr=1e-3, loraplus_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[1]["params"]} == b_names
    assert not {names[id(p)] for p in groups[0]["params"]} & b_names
    n_trainable = sum(1 for n, p in model.named_parameters() if ".adapters.a." in n)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_trainable
    with pytest.raises(SdloraError, match="LoRA\\+ ratio must be at least 1"):
        param_groups(layers, "a", lr=1e-3, loraplus_ratio=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_half_precision_compute(quant, dtype):
    """Adapters keep fp32 parameters; the layer computes in the input's dtype."""
    model, layers = adapted("linear", quant, {"a": "lora", "b": "dora"})
    with torch.no_grad(), Mixer({"unet": model}).apply(Mix({"a": 1.0, "b": 0.5}), mode="unfused"):
        ref = model(X)
        if quant is None:
            for layer in layers.values():
                layer.base_layer.to(dtype)
        out = model(X.to(dtype))
    assert out.dtype == dtype
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapters." in n)
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_fused_mode_leaves_the_callers_grad_mode_alone():
    model, _ = adapted("linear", None, {"a": "lora"})
    with Mixer({"unet": model}).apply(Mix({"a": 1.0}), mode="fused"):
        assert torch.is_grad_enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_fused_low_rank_layer_keeps_only_what_rounding_loses_and_restores_bit_for_bit(dtype):
    from torch import nn

    from sdlora.adapters import AdapterConfig
    from sdlora.fusing import fuse_layer
    from sdlora.inject import add_adapter, wrap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512)).to(dtype)
    with torch.no_grad():
        model[0].weight[0, :8] = 0.0
        model[0].weight[0, 8:16] = -0.0  # signed zeros must come back with their sign
    layers = wrap(model, ["0"], "unet")
    for i, name in enumerate(("a", "b")):
        add_adapter(layers, name, AdapterConfig(rank=8, alpha=8, seed=i))
        randomize(layers, name, seed=10 + i, std=0.002)
    layer = layers["0"]
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    with torch.no_grad():
        saved = fuse_layer(layer, {"a": 0.8, "b": -0.4})
        assert not torch.equal(weight, before)  # fused for real
        full = before.numel() * before.element_size()
        assert saved.full is None and saved.nbytes() < 0.5 * full, (saved.nbytes(), full)
        saved.restore()
    assert torch.equal(weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_a_dora_layer_keeps_a_full_copy_and_restores_it():
    from sdlora.fusing import fuse_layer

    model, layers = adapted("linear", None, {"d": "dora"})
    before = snapshot(model)
    with torch.no_grad():
        saved = [fuse_layer(layer, {"d": 1.0}) for layer in layers.values()]
        assert all(s.full is not None for s in saved)
        for s in reversed(saved):
            s.restore()
    assert same_bits(snapshot(model), before)


def test_a_mixer_keeps_originals_off_the_process_and_restores_them_by_copy():
    """Fused mixes through a Mixer: originals in its store (a temporary file on the CPU), nothing of them in the
    Saved objects; each weight written once and restored bit for bit across switches, conv layers too."""
    model, layers = adapted("conv", None, {"a": "lora", "b": "dora"})
    before = snapshot(model)
    mixer = Mixer({"unet": model})
    writes = []
    with torch.no_grad():
        for weights in ({"a": 0.7, "b": 0.2}, {"a": -1.3}, {"a": 0.4, "b": 1.1}):
            with mixer.apply(Mix(weights), mode="fused"):
                fused = snapshot(model)
                assert not same_bits(fused, before)  # the mix really is in the weights
            writes.append(mixer._originals._end)
            assert same_bits(snapshot(model), before)
    assert writes[0] > 0 and writes == [writes[0]] * 3  # written at the first fuse only


def test_a_weight_changed_between_fused_mixes_is_stored_again():
    """A base weight edited after a fused mix (even through .data, which its version counter misses) must come
    back as edited, not as the stale original of the store."""
    model, layers = adapted("linear", None, {"a": "lora"})
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        with mixer.apply(Mix({"a": 1.0}), mode="fused"):
            pass
        for layer in layers.values():
            layer.base_layer.weight.data.mul_(0.5)  # an edit the version counter does not see
        edited = snapshot(model)
        with mixer.apply(Mix({"a": 0.6}), mode="fused"):
            pass
    assert same_bits(snapshot(model), edited)


def test_where_the_store_cannot_be_written_the_rounding_scheme_restores_bit_for_bit(tmp_path):
    from sdlora.fusing import Originals, fuse_layer

    model, layers = adapted("linear", None, {"a": "lora"})
    before = snapshot(model)
    missing = Originals(directory=str(tmp_path / "no-such-folder"))
    with torch.no_grad():
        saved = [fuse_layer(layer, {"a": 0.9}, missing) for layer in layers.values()]
        assert all(s.store is None and s.index is not None for s in saved)
        for s in reversed(saved):
            s.restore()
    assert same_bits(snapshot(model), before)


@pytest.mark.parametrize("mode", ["per_sample", "grouped"])
def test_a_batch_that_is_no_multiple_of_the_mixes_is_refused(mode):
    """Three mixes cannot be spread over four rows: refused in one line, in both batched modes."""
    model, _ = adapted("linear", None, {"a": "lora"})
    mixer = Mixer({"unet": model})
    with torch.no_grad(), mixer.apply([Mix({"a": 1.0}), Mix({}), Mix({"a": 0.5})], mode=mode):
        with pytest.raises(SdloraError, match="a batch of 4 cannot carry 3 per-sample mixes"):
            model(X)


def test_a_grouped_pass_over_its_weight_budget_keeps_no_fused_weight_and_computes_the_same(monkeypatch):
    """Fused weights of a grouped pass are kept only within GROUPED_CACHE_BYTES; past it they are formed at
    each call, the same bits, and nothing (the plan or its per-layer layouts) holds one."""
    from sdlora import mixing

    model, _ = adapted("linear", None, {"a": "lora", "b": "dora"})
    mixer = Mixer({"unet": model})
    mixes = [Mix({"a": 1.0}), Mix({}), Mix({"a": 0.5, "b": 1.0}), Mix({"b": -0.7})]
    outs = []
    for budget in (1 << 30, 0):
        monkeypatch.setattr(mixing, "GROUPED_CACHE_BYTES", budget)
        with torch.no_grad(), mixer.apply(mixes, mode="grouped") as plan:
            outs.append(model(X))
            outs.append(model(X))  # the second call reads what the first kept
            kept = list(plan._fused.values())
            in_layouts = [v for layout in plan._layouts.values() for v in vars(layout).values()
                          if isinstance(v, list) and any(torch.is_tensor(w) and w.dim() > 1 for w in v)]
        assert not in_layouts
        assert bool(kept) == (budget > 0)
    assert all(torch.equal(outs[0], o) for o in outs[1:])

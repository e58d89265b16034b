"""A grouped pass (what the server batches, sdlora/batching.py): every picture gets exactly the bits it gets alone.

Issue 17: requests that share a pass must each get the pixels they get when served alone. Here the embedded
base runs eight pictures with eight different mixes in one pass (generate_items, as the Batcher calls it) and
each picture alone; the UNet's output at every step and the pixels must be equal bit for bit. The mixes cover
what changes how a lone call computes: no adapters, fused float mixes, an attention LoRA and a LoCon on every
layer including the ResNet blocks' time_emb_proj (a (batch, channels) input), DoRA, text-encoder weights, a
step range (a lone call then runs unfused), and an NF4 base (unfused, quantized products).
"""

import numpy as np
import pytest
import torch

from sdlora.adapters import AdapterConfig
from sdlora.generate import GenerateSettings, Item, generate_items
from sdlora.inject import adapter_layers
from sdlora.mixing import AdapterWeights, Mix
from tests.core_helpers import randomize


def _base(quant):
    from sdlora.pipelines import load_base

    base = load_base("embedded")
    if quant:
        base.quantize(quant)
    for seed, (name, method, targets) in enumerate((("a", "lora", "attn"), ("b", "lora", "all"),
                                                    ("c", "dora", "attn")), start=1):
        base.add_adapter(name, AdapterConfig(method=method, rank=4, alpha=4, seed=seed), targets=targets,
                         text_encoder=True)
        for model in base.models().values():
            layers = {k: v for k, v in adapter_layers(model).items() if name in v.adapters}
            randomize(layers, name, seed=seed, std=0.1)
    return base


MIXES = [Mix(), Mix({"a": 1.0}), Mix({"b": 1.0}), Mix({"a": 0.5, "b": 0.7}),
         Mix({"c": AdapterWeights(unet=1.2, text_encoder=0.3)}), Mix({"b": AdapterWeights(unet=1.0, steps=(1, 3))}),
         Mix({"a": -0.5, "c": 0.8}), Mix({"b": 2.0})]


def _unet_outputs(base, run):
    """run()'s result and the UNet's output at every step."""
    outputs = []
    handle = base.pipe.unet.register_forward_hook(lambda m, i, o: outputs.append(o[0].detach().clone()))
    try:
        result = run()
    finally:
        handle.remove()
    return result, outputs


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """CPU kernels choose by thread count too: exact on one thread (make test's workers) and on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_each_picture_of_a_grouped_pass_is_bit_for_bit_its_lone_run(quant, threads):
    base = _base(quant)
    settings = GenerateSettings(prompts=("x",), steps=4, width=64, height=64, guidance=5.0, scheduler="euler_a")
    items = [Item(p, "blurry" if k % 3 == 0 else "", 20 + k, mix) for k, (p, mix) in enumerate(
        zip(["a red circle", "a blue square", "a green triangle", "a yellow diamond"] * 2, MIXES))]
    together, unet_together = _unet_outputs(base, lambda: generate_items(base, settings, items))
    # negative prompts differ in presence, so the server would not batch these; the pass still must be exact
    n = len(items)
    for k, item in enumerate(items):
        (alone,), unet_alone = _unet_outputs(base, lambda: generate_items(base, settings, [item]))
        for step, (a, b) in enumerate(zip(unet_together, unet_alone)):
            assert torch.equal(a[[k, n + k]], b), f"picture {k}, step {step}: the UNet's output differs"
        assert np.array_equal(np.asarray(together[k].image), np.asarray(alone.image)), f"picture {k}"
    # the mixes did change the pictures: no test of equal nothing
    assert len({np.asarray(g.image).tobytes() for g in together}) == n


def test_a_lone_run_with_two_pictures_equals_the_two_in_company():
    """A request of two pictures (one mix) alone and the same two in a pass with others: the same bits."""
    base = _base(None)
    settings = GenerateSettings(prompts=("x",), steps=3, width=64, height=64, guidance=4.0)
    pair = [Item("a purple circle", "", 5, MIXES[3]), Item("a purple circle", "", 6, MIXES[3])]
    others = [Item("a red circle", "", 7, MIXES[1]), Item("a blue square", "", 8, MIXES[4])]
    alone = generate_items(base, settings, pair)
    together = generate_items(base, settings, others[:1] + pair + others[1:])
    for k in range(2):
        assert np.array_equal(np.asarray(alone[k].image), np.asarray(together[k + 1].image)), f"picture {k}"


def test_time_embedding_layers_run_row_by_row():
    """The (batch, channels) layers are the row-wise ones (sdlora/batch_invariance.py), and their rows equal
    a lone row's bits, where the plain product's do not have to."""
    from sdlora.batch_invariance import RowwiseMixin
    from sdlora.pipelines import load_base

    unet = load_base("embedded").pipe.unet
    rowwise = {n for n, m in unet.named_modules() if isinstance(m, RowwiseMixin)}
    assert "time_embedding.linear_1" in rowwise and "time_embedding.linear_2" in rowwise
    assert any(n.endswith("resnets.0.time_emb_proj") for n in rowwise)
    assert not any("attn" in n or n.endswith("conv1") for n in rowwise)
    emb = torch.randn(16, unet.time_embedding.linear_1.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(unet.time_embedding(emb)[:2], unet.time_embedding(emb[:2]))


def test_equal_rows_are_computed_once_in_inference_and_each_row_otherwise():
    """by_rows (the row-wise forward): 16 equal rows (pictures at one timestep) make one call and give the
    bits 16 calls give; rows that differ, or any call that records gradients, go one row at a time."""
    from sdlora.batch_invariance import by_rows

    lin = torch.nn.Linear(192, 96)
    calls = []

    def fn(row):
        calls.append(row.shape[0])
        return lin(row)

    row = torch.randn(1, 192, generator=torch.Generator().manual_seed(0))
    same, differ = row.repeat(16, 1), torch.randn(16, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        once = by_rows(fn, same)
        assert calls == [1] and once.is_contiguous()
        assert torch.equal(once, torch.cat([lin(same[i : i + 1]) for i in range(16)]))
        calls.clear()
        each = by_rows(fn, differ)
        assert calls == [1] * 16
        assert torch.equal(each, torch.cat([lin(differ[i : i + 1]) for i in range(16)]))
    calls.clear()
    by_rows(fn, same).sum().backward()
    assert calls == [1] * 16 and lin.weight.grad is not None


@pytest.mark.parametrize("threads_", [1, 2])
def test_conv2d_gives_a_picture_the_same_bits_at_any_batch_size(threads_):
    """sdlora.batch_invariance.conv2d on the shapes where oneDNN's own kernels differ by batch size (measured:
    3x3 for one picture against sixteen, 1x1 with 144+ input channels on one thread): equal bits, while
    F.conv2d differs on some of them (so this test measures something)."""
    from sdlora.batch_invariance import conv2d

    before = torch.get_num_threads()
    torch.set_num_threads(threads_)
    gen = torch.Generator().manual_seed(0)
    plain_differs = 0
    try:
        with torch.inference_mode():
            for k, c, o, side in ((3, 4, 48, 16), (3, 48, 96, 8), (3, 96, 96, 4), (1, 144, 96, 8), (1, 320, 320, 8),
                                  (1, 48, 48, 16), (3, 320, 320, 8)):
                x = torch.randn(16, c, side, side, generator=gen)
                w, b = torch.randn(o, c, k, k, generator=gen), torch.randn(o, generator=gen)
                whole = conv2d(x, w, b, padding=k // 2)
                torch.testing.assert_close(whole, torch.nn.functional.conv2d(x, w, b, padding=k // 2), atol=1e-4, rtol=1e-5)
                for n in (1, 2, 3):
                    assert torch.equal(conv2d(x[:n], w, b, padding=k // 2), whole[:n]), (k, c, o, side, n)
                    plain = torch.nn.functional.conv2d
                    plain_differs += not torch.equal(plain(x[:n], w, b, padding=k // 2), plain(x, w, b, padding=k // 2)[:n])
    finally:
        torch.set_num_threads(before)
    assert plain_differs > 0

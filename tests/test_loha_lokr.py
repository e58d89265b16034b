"""LoHa and LoKr trained in our own layers, against LyCORIS (lycoris-lora 4.1.3) as the oracle: the same
factorization and part shapes, the same delta from the same parts, and our kohya exports merged by LyCORIS
itself give our fused weights; they train, round-trip through files and mix per sample."""

import pytest
import torch
from torch import nn

from sdlora.adapter_io import adapter_from_base, load_adapter, read_adapter_file, write_adapter_file
from sdlora.adapters import AdapterConfig, AdapterLayer
from sdlora.adapters.factored import factorization
from sdlora.errors import SdloraError
from sdlora.inject import add_adapter, wrap
from sdlora.mixing import Mix, Mixer
from sdlora.pipelines import load_base
from tests.core_helpers import base_model, randomize
from tests.test_formats import outputs

SETTINGS = [  # (method, rank, alpha, extra AdapterConfig fields)
    ("loha", 4, 2.0, {}),
    ("lokr", 4, 2.0, {}),  # w2 a pair (linear), whole (the conv: rank >= half of w2's side)
    ("lokr", 2, 1.0, {"decompose_both": True}),  # both pairs on the linear, w1 a pair on the conv
    ("lokr", 4, 2.0, {"full_matrix": True}),  # both whole: scale 1
    ("lokr", 2, 3.0, {"factor": 4}),
    ("lokr", 1, 1.0, {"factor": 2, "decompose_both": True}),
]
LAYERS = [lambda: nn.Linear(64, 96), lambda: nn.Conv2d(32, 48, 3, padding=1), lambda: nn.Linear(128, 90)]


def test_factorization_is_lycoris():
    from lycoris.functional import factorization as theirs

    for dim in range(1, 260):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


@pytest.mark.parametrize("method,rank,alpha,extra", SETTINGS)
def test_parts_and_delta_are_lycoris_modules(method, rank, alpha, extra):
    """Our fresh adapter has LyCORIS's module's parts, shape for shape; with the same random parts copied into
    both, D is what LyCORIS's module applies in its forward (get_weight, the delta it trains with)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = LohaModule if method == "loha" else LokrModule
    for make in LAYERS:
        base = make()
        layer = AdapterLayer(base)
        ours = AdapterConfig(method=method, rank=rank, alpha=alpha, **extra).build(layer, torch.Generator(), {})
        theirs = cls("m", base, 1.0, rank, alpha, **extra)
        want = {k: p for k, p in theirs.named_parameters() if k.startswith(("hada_", "lokr_"))}
        assert {k: tuple(p.shape) for k, p in ours.factors.items()} == {k: tuple(p.shape) for k, p in want.items()}
        assert torch.equal(ours.delta_weight(), torch.zeros(base.weight.shape))  # D starts at 0, as LyCORIS's
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, p in want.items():
                p.copy_(torch.randn(p.shape, generator=g))
                ours.factors[k].copy_(p)
            torch.testing.assert_close(ours.delta_weight(), theirs.get_weight(base.weight.shape), atol=1e-4, rtol=1e-5)


# LoKr with a factor that divides every layer side: LyCORIS's loader guesses the factor back from w1's shape
# and refuses a non-square w1 (its own files with factor -1 on a 48 x 32 layer too); A1111 and ComfyUI need no guess.
@pytest.mark.parametrize("method,extra", [("loha", {}), ("lokr", {"factor": 4}), ("lokr", {"decompose_both": True, "factor": 4})])
def test_kohya_export_merged_by_lycoris_is_our_fused_weights(tmp_path, method, extra):
    """Our kohya file, loaded and merged by LyCORIS's own kohya network, changes every adapted weight (UNet
    linears and convolutions, text encoder) as our fused mix does. alpha = rank: LyCORIS 4.1.3's merge
    (get_diff_weight) multiplies by alpha / rank twice, where its forward, A1111 and ComfyUI do once."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights
    from safetensors.torch import load_file

    base = load_base("embedded")
    base.add_adapter("x", AdapterConfig(method=method, rank=2, alpha=2.0, **extra), targets="all", text_encoder=True)
    layers = {f"{role}/{p}": m for role, model in base.models().items() for p, m in model.named_modules()
              if isinstance(m, AdapterLayer)}
    randomize(layers, "x", seed=2, std=0.3)
    path = write_adapter_file(adapter_from_base(base, "x"), tmp_path / "x.safetensors", "kohya", base)
    tensors = load_file(str(path))
    reference = load_base("embedded")
    merged = 0
    te_prefix = "lora_te_" if hasattr(reference.pipe.text_encoder, "text_model") else "lora_te_text_model_"
    for role, prefix in (("unet", "lora_unet_"), ("text_encoder", te_prefix)):
        # LyCORIS's own loader and merge, per model: its names are the module paths after its prefix (CLIP's
        # have no "text_model." under transformers 5).
        sd = {LycorisNetwork.LORA_PREFIX + "_" + k.removeprefix(prefix): v for k, v in tensors.items()
              if k.startswith(prefix)}
        net, _ = create_lycoris_from_weights(1.0, "", reference.models()[role], weights_sd=sd)
        net.merge_to(1.0)
        merged += len(net.loras)
    assert merged == len(layers)
    convs = 0
    with torch.no_grad(), base.mixer.apply(Mix({"x": 1.0}), mode="fused"):
        for key, layer in layers.items():
            role, _, mpath = key.partition("/")
            want = reference.models()[role].get_submodule(mpath).weight
            torch.testing.assert_close(layer.base_layer.weight, want, atol=2e-5, rtol=0, msg=key)
            convs += layer.geometry.is_conv
    assert convs > 0


@pytest.mark.slow  # two real training runs, about 90 s on 2 CPU cores
def test_training_changes_outputs_and_files_round_trip(tmp_path):
    """A few steps of `sdlora train --method lokr/loha` (flags) and a TOML config key for LoKr's options: the
    adapter learns something, and its sdlora and kohya files load back to the same outputs."""
    from sdlora.cli import main
    from tests.test_training_data import STYLES

    toml = tmp_path / "lokr.toml"
    toml.write_text("factor = 4\ndecompose_both = true\n")
    runs = {"lokr": ["--config", str(toml), "--full-matrix"], "loha": []}
    for method, extra in runs.items():
        out = tmp_path / method
        assert main(["train", str(STYLES / "dots"), "--out", str(out), "--method", method, "--rank", "2", "--steps",
                     "3", "--batch-size", "2", "--lr", "1e-2", "--targets", "attn", "--quiet", *extra]) == 0
        af = read_adapter_file(out / "adapter.safetensors")
        assert {m.method for m in af.modules.values()} == {method}
        if method == "lokr":
            assert (af.config["factor"], af.config["decompose_both"], af.config["full_matrix"]) == (4, True, True)
            assert all("lokr_w2" in m.parts for m in af.modules.values())  # full matrix: w2 whole
        base = load_base("embedded")
        load_adapter(base, out / "adapter.safetensors", "a")
        plain, adapted = outputs(base), outputs(base, "a")
        assert (plain[1] - adapted[1]).abs().max() > 1e-4
        kohya = write_adapter_file(af, tmp_path / f"{method}-kohya.safetensors", "kohya", base)
        again = load_base("embedded")
        load_adapter(again, kohya, "k")
        for a, b in zip(outputs(again, "k"), adapted):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_lokr_and_lora_in_one_per_sample_batch():
    """Each row of a per-sample batch gets what its own mix gives alone; fused and unfused agree."""
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    model = base_model("linear", None)
    layers = wrap(model, ["0", "2"], "unet")
    add_adapter(layers, "k", AdapterConfig(method="lokr", rank=2, factor=4))
    add_adapter(layers, "h", AdapterConfig(method="loha", rank=2))
    add_adapter(layers, "l", AdapterConfig(method="lora", rank=2))
    for i, name in enumerate("khl"):
        randomize(layers, name, seed=i)
    mixes = [Mix({"k": 1.0}), Mix({"l": 0.7, "k": -0.5}), Mix({"h": 1.2, "l": 0.3})]
    mixer = Mixer({"unet": model})
    with torch.no_grad():
        plain = model(x)
        with mixer.apply(mixes):
            batched = model(x)
        for i, mix in enumerate(mixes):
            with mixer.apply(mix, mode="unfused"):
                alone = model(x[[i]])
            with mixer.apply(mix, mode="fused"):
                fused = model(x[[i]])
            torch.testing.assert_close(batched[[i]], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(fused, alone, atol=1e-5, rtol=0)
            assert (alone - plain[[i]]).abs().max() > 1e-3


def test_invalid_options_are_one_clear_error():
    with pytest.raises(SdloraError, match="factor must be -1"):
        AdapterConfig(method="lokr", factor=0)
    with pytest.raises(SdloraError, match="only shape LoKr"):
        AdapterConfig(method="loha", full_matrix=True)
    from sdlora.training.config import TrainConfig

    with pytest.raises(SdloraError, match="training setting factor = 0"):
        TrainConfig(data_dir="d", out_dir="o", method="lokr", factor=0)
    with pytest.raises(SdloraError, match="training setting method = 'lora' must be lokr"):
        TrainConfig(data_dir="d", out_dir="o", decompose_both=True)

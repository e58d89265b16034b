"""The method registry is the only dispatch: a method defined here, in this one file, and registered with
one line, trains-to-be (AdapterConfig builds it), runs, saves and loads through every format that can
hold it, with no other module knowing its name."""

import pytest
import torch
from torch import nn

from sdlora.adapter_io import describe, load_adapter, read_adapter_file, save_adapter
from sdlora.adapters import METHODS, AdapterConfig
from sdlora.adapters.functional import lora_delta
from sdlora.adapters.lora import LoraAdapter
from sdlora.errors import SdloraError
from sdlora.formats.adapter import ModuleWeights
from sdlora.inject import adapter_layers
from sdlora.pipelines import load_base
from tests.core_helpers import randomize
from tests.test_formats import outputs


class GainLora(LoraAdapter):
    """A toy method: D = (alpha / r) * g * up @ down, LoRA with one trained scalar gain g (1,).
    Its own stored parts are the raw up (out, r) and g; the equivalent pair is (down, g * up)."""

    method = "gainlora"

    def __init__(self, geometry, rank, alpha=None, **kwargs):
        super().__init__(geometry, rank, alpha, **kwargs)
        self.gain = nn.Parameter(torch.ones(1))

    def pair(self):
        return self.down, self.gain * self.up

    def b_side(self):
        return [self.up, self.gain]

    def delta_weight(self, w0=None):
        return lora_delta(*self.pair(), self.scale)

    def stored_parts(self):
        return {"raw_up": self.up, "gain": self.gain}

    @classmethod
    def from_weights(cls, layer, m, *, config, shared):
        a = cls(layer.geometry, m.rank, m.alpha)
        with torch.no_grad():
            a.down.copy_(m.down), a.up.copy_(m.parts["raw_up"]), a.gain.copy_(m.parts["gain"])
        return a

    @classmethod
    def file_parts(cls, m):
        return {"down": m.down, "raw_up": m.parts["raw_up"], "gain": m.parts["gain"]}

    @classmethod
    def from_file_parts(cls, parts, scale, config, where):
        up = parts["gain"] * parts["raw_up"]  # the same product pair() computes
        return ModuleWeights(cls.method, parts["down"], up, scale, {"raw_up": parts["raw_up"], "gain": parts["gain"]})


@pytest.fixture
def toy_source(monkeypatch):
    monkeypatch.setitem(METHODS, "gainlora", GainLora)  # the one registry line
    base = load_base("embedded")
    base.add_adapter("toy", AdapterConfig(method="gainlora", rank=3, alpha=6.0, seed=4), targets="all",
                     text_encoder=True)
    for model in base.models().values():
        layers = {k: v for k, v in adapter_layers(model).items() if "toy" in v.adapters}
        randomize(layers, "toy", seed=9, std=0.1)  # gain 1 + N(0, 0.01): every part matters
    return base


def _toy_layers(base):
    return [layer.adapters["toy"] for model in base.models().values() for layer in adapter_layers(model).values()
            if "toy" in layer.adapters]


def test_the_toy_method_builds_and_runs_from_its_registry_line(toy_source):
    adapters = _toy_layers(toy_source)
    convs = [a for a in adapters if a.geometry.is_conv]
    assert adapters and convs and all(type(a) is GainLora for a in adapters)  # LoCon-style on convolutions too
    plain = outputs(toy_source)
    styled = outputs(toy_source, "toy")
    assert all((s - p).abs().max() > 1e-3 for s, p in zip(styled, plain))
    # It trains: every part of it gets a gradient through the wrapper.
    a = convs[0]
    x = torch.randn(2, a.geometry.in_features, 8, 8)
    layer = next(l for l in adapter_layers(toy_source.pipe.unet).values() if l.adapters["toy"] is a)
    from sdlora.mixing import Mix

    with toy_source.mixer.apply(Mix({"toy": 1.0}), mode="unfused"):
        layer(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


@pytest.mark.parametrize("fmt", ["sdlora", "kohya", "diffusers"])
def test_the_toy_method_round_trips_through_every_format(toy_source, tmp_path, fmt):
    path = tmp_path / f"toy-{fmt}.safetensors"
    save_adapter(toy_source, "toy", path, fmt)
    base = load_base("embedded")
    loaded = load_adapter(base, path, "copy")
    assert loaded.warnings == [] and loaded.layers == len(_toy_layers(toy_source))
    for ours, theirs in zip(outputs(toy_source, "toy"), outputs(base, "copy")):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    copies = [layer.adapters["copy"] for model in base.models().values()
              for layer in adapter_layers(model).values() if "copy" in layer.adapters]
    if fmt == "sdlora":
        # Our own files keep the method itself, every part bit for bit.
        assert loaded.file.method == "gainlora" and all(type(c) is GainLora for c in copies)
        for src, dst in zip(_toy_layers(toy_source), copies):
            for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
                assert torch.equal(p, q), n
    else:
        # kohya and diffusers files hold its equivalent pair, which loads (here and in other tools) as LoRA.
        assert all(type(c) is LoraAdapter for c in copies)
        for src, dst in zip(_toy_layers(toy_source), copies):
            torch.testing.assert_close(dst.delta_weight(), src.delta_weight().detach(), atol=1e-6, rtol=0)
    info = describe(read_adapter_file(path, base), str(path))
    assert info["ranks"] == [3] and info["alphas"] == [6.0]


def test_without_its_registry_line_the_method_is_refused_by_name(toy_source, tmp_path, monkeypatch):
    path = tmp_path / "toy.safetensors"
    save_adapter(toy_source, "toy", path, "sdlora")
    monkeypatch.delitem(METHODS, "gainlora")
    with pytest.raises(SdloraError, match=f"{path}: unknown adapter method 'gainlora'"):
        read_adapter_file(path)
    with pytest.raises(SdloraError, match="unknown adapter method 'gainlora'"):
        AdapterConfig(method="gainlora")

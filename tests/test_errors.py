"""Errors a user can cause reach them as SdloraError (one line: what is wrong; what to do), never as a bare
ValueError or TypeError that the CLI would show as a traceback."""

import pytest
import torch
from torch import nn

from sdlora.errors import SdloraError


def test_adapter_construction_errors_are_sdlora_errors():
    from sdlora.adapters.base import BaseGeometry
    from sdlora.adapters.delta import DeltaAdapter
    from sdlora.adapters.layer import AdapterLayer
    from sdlora.adapters.lora import LoraAdapter
    from sdlora.adapters.vera import VeraAdapter

    conv = BaseGeometry(4, 8, (3, 3), (1, 1), (1, 1), (1, 1))
    cases = [
        (lambda: VeraAdapter(conv, 2, seed=0), "VeRA adapts linear layers only"),
        (lambda: LoraAdapter(BaseGeometry(4, 8), 0, 1.0), "rank must be at least 1"),
        (lambda: DeltaAdapter(BaseGeometry(4, 8), torch.zeros(3, 3)), "does not fit a layer of"),
        (lambda: DeltaAdapter(BaseGeometry(4, 8), torch.zeros(8, 4)).pair(), "resize it to LoRA first"),
        (lambda: AdapterLayer(nn.Conv2d(4, 4, 3, groups=2)), "cannot be adapted"),
        (lambda: AdapterLayer(nn.LayerNorm(4)), "neither Linear-like nor Conv2d-like"),
    ]
    for make, message in cases:
        with pytest.raises(SdloraError, match=message):
            make()
    layer = AdapterLayer(nn.Linear(4, 8))
    layer.add_adapter("a", LoraAdapter(BaseGeometry(4, 8), 2, 1.0))
    with pytest.raises(SdloraError, match="already on this layer"):
        layer.add_adapter("a", LoraAdapter(BaseGeometry(4, 8), 2, 1.0))
    with pytest.raises(SdloraError, match="another base"):
        layer.add_adapter("b", LoraAdapter(BaseGeometry(8, 4), 2, 1.0))


def test_an_unknown_prediction_type_is_refused_in_one_line():
    from types import SimpleNamespace

    from sdlora.training.loss import target_for

    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    with pytest.raises(SdloraError, match="'flow', which training does not support"):
        target_for(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_int8_says_that_convolutions_go_to_nf4():
    from sdlora.quant import quantize_model

    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 4 * 4, 32))
    with pytest.warns(UserWarning, match="convolutions are quantized in NF4"):
        report = quantize_model(model, "int8")
    assert report.conv == 1 and report.linear == 1


def test_the_optimizer_fallback_hides_only_what_an_unusable_bitsandbytes_raises(monkeypatch):
    from sdlora.training import optimizers

    def broken():
        raise ImportError("no bitsandbytes here")

    monkeypatch.setattr(optimizers, "bitsandbytes", broken)
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match="adamw8bit is unavailable here"):
        assert isinstance(optimizers.make_optimizer("adamw8bit", [{"params": params}], torch.device("cpu")),
                          torch.optim.AdamW)

    def buggy():
        raise KeyError("a bug, not a missing build")

    monkeypatch.setattr(optimizers, "bitsandbytes", buggy)
    with pytest.raises(KeyError):
        optimizers.make_optimizer("adamw8bit", [{"params": params}], torch.device("cpu"))


def test_the_core_imports_bitsandbytes_in_quant_only_and_the_layer_quant_cycle_is_broken():
    """sdlora.quant.layers is the one module that imports bitsandbytes, and no quant module imports the
    adapters back."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "sdlora"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        if any(m.split(".")[0] == "bitsandbytes" for m in names):
            assert path == root / "quant" / "layers.py", f"{path} imports bitsandbytes"
        if path.parent == root / "quant":
            relative = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
            assert not any(m.startswith("adapters") for m in relative), relative
    assert (root / "quant" / "layers.py").exists()  # the loop above saw the importer
    code = "import sys, sdlora.adapters, sdlora.mixing, sdlora.pipelines; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

"""Tiny models and adapter set-up shared by the core tests (no diffusers needed)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sdlora.adapters import AdapterConfig
from sdlora.inject import add_adapter, wrap
from sdlora.quant import quantize_model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48))


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 16, 3, stride=2, padding=1))


def base_model(kind: str, quant: str | None, seed: int = 0) -> nn.Sequential:
    """quant: None, "nf4", "fp4", "int8" (double quantization on), or "<mode>-nodq" (off)."""
    model = mlp(seed) if kind == "linear" else convnet(seed)
    if quant:
        mode, _, nodq = quant.partition("-")
        quantize_model(model, mode, convs=kind == "conv", double_quant=not nodq)
    return model.eval()


def randomize(layers, name: str, seed: int, std: float = 0.2) -> None:
    """Give adapter `name` non-trivial weights (a fresh adapter is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * std)


def adapted(kind: str, quant: str | None, methods: dict[str, str], seed: int = 0, rank: int = 4):
    """A model with one randomised adapter per entry of methods (adapter name -> method)."""
    model = base_model(kind, quant, seed)
    layers = wrap(model, ["0", "2"], "unet")
    for i, (name, method) in enumerate(methods.items()):
        add_adapter(layers, name, AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, seed=i))
        randomize(layers, name, seed=100 + i)
    return model, layers


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clone(model):
    return copy.deepcopy(model)


def table_times_absmax(packed: torch.Tensor, state) -> torch.Tensor:
    """A 4-bit weight as its format defines it, written apart from bitsandbytes' kernels: each byte holds two
    indices into the 16-entry code table (high nibble first), each value times its block's absmax (the flat
    weight in blocks of state.blocksize; a double-quantized absmax dequantized by bitsandbytes plus its offset).
    In the stored dtype and shape, as dequantize_4bit returns it. bitsandbytes 0.50.2's AVX512 CPU kernel misreads
    rows of a multiple of 16 weights that are not whole blocks (tests/test_quant.py): where a test's reference
    (PEFT's DoRA, a fresh quantization) dequantizes through bitsandbytes, this stands in for it."""
    from math import prod

    import bitsandbytes as bnb

    b = packed.reshape(-1)
    idx = torch.stack([b >> 4, b & 15], 1).reshape(-1).long()
    absmax = (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested \
        else state.absmax
    n = prod(state.shape)
    vals = state.code.float()[idx[:n]] * absmax.float().repeat_interleave(state.blocksize)[:n]
    return vals.to(state.dtype).view(state.shape)

"""Micro-benchmark of the CPU 4-bit dequantization (quant.fast4bit) against bitsandbytes' own path, on one
SD1.5-sized conv (1280x1280x3x3) and linear (1280 -> 5120), NF4 double-quantized, fp32: the dequantization
alone, and a training forward+backward (input gradient only). Median of 20 after one warm-up, best of two.

    python -m tests.bench.dequant_micro [tokens]    (linear input rows, default 512)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from sdlora.quant import QuantConv2d, bitsandbytes, quantize_linear
from sdlora.quant.fast4bit import dequantize_scratch


def median_s(fn, n: int = 20) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best(fn) -> float:
    return min(median_s(fn), median_s(fn))


def main(tokens: int = 512) -> None:
    bnb = bitsandbytes()
    torch.manual_seed(0)
    conv = QuantConv2d(nn.Conv2d(1280, 1280, 3, padding=1))
    old_conv = QuantConv2d(nn.Conv2d(1280, 1280, 3, padding=1))
    # the path before fast4bit: bitsandbytes' dequantize_4bit, in one piece
    old_conv.weight_chunks = lambda dtype: iter([(0, 1280, old_conv.dequantize().to(dtype).reshape(1280, -1))])
    lin = nn.Linear(1280, 5120)
    ours, ref = quantize_linear(lin, "nf4"), quantize_linear(lin, "nf4", bnb_forward=True)
    for name, p in (("conv", conv.weight), ("linear", ours.weight)):
        old = best(lambda: bnb.functional.dequantize_4bit(p.data, p.quant_state))
        new = best(lambda: dequantize_scratch(bnb, p.data, p.quant_state, torch.float32))
        print(f"{name} dequantize: bitsandbytes {old * 1e3:.2f} ms, fast4bit {new * 1e3:.2f} ms, ratio {new / old:.3f}")
    xc = torch.randn(2, 1280, 16, 16, requires_grad=True)  # (batch, channels, h, w): SD1.5's 16x16 level
    xl = torch.randn(tokens, 1280, requires_grad=True)  # (tokens, in)

    def step(layer, x):
        return lambda: layer(x).sum().backward()

    for name, old_fn, new_fn in (("conv", step(old_conv, xc), step(conv, xc)), ("linear", step(ref, xl), step(ours, xl))):
        old, new = best(old_fn), best(new_fn)
        print(f"{name} forward+backward: before {old * 1e3:.2f} ms, now {new * 1e3:.2f} ms, ratio {new / old:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)

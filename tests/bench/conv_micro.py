"""Micro-benchmark of the two convolution paths of generation that are ours rather than oneDNN's (a batch of 2):

- NF4 3x3 convolutions whose dequantized weight passes quant.fast4bit.CHUNK_BYTES, by chunks of output channels
  against in one piece, with the float convolution (its weight held in fp32) as the yardstick;
- 1x1 convolutions through batch_invariance.conv2d (one (O, C) @ (C, H*W) per picture) against the
  (N*H*W, C) @ (C, O) product through channels-last views it replaced, and against F.conv2d.

Median of 9 after one warm-up, in ms.    python -m tests.bench.conv_micro
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.batch_invariance import conv2d
from sdlora.quant import QuantConv2d, fast4bit

from .dequant_micro import median_s

# (in, out, latent side): SD1.5's 3x3 shapes at 32x32 latents (the generation bench) and 64x64 (512 px).
CONVS = ((1280, 1280, 4), (1280, 1280, 8), (2560, 1280, 8), (1920, 1280, 8), (1280, 1280, 16), (640, 640, 32),
         (320, 320, 64))
POINTWISE = ((320, 320, 32), (640, 640, 16), (1280, 1280, 8), (960, 640, 16), (1920, 1280, 8), (320, 320, 64))


def median_ms(fn, n: int = 9) -> float:
    return median_s(fn, n) * 1e3


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    budget = fast4bit.CHUNK_BYTES
    for c_in, c_out, side in CONVS:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        q = QuantConv2d(conv)
        x = torch.randn(2, c_in, side, side)
        w = q.dequantize().clone()
        plain = median_ms(lambda: F.conv2d(x, w, conv.bias, 1, 1))
        chunked = median_ms(lambda: q(x))
        fast4bit.CHUNK_BYTES = 1 << 62
        whole = median_ms(lambda: q(x))
        fast4bit.CHUNK_BYTES = budget
        print(f"nf4 3x3 {c_in}->{c_out} at {side}x{side}: float {plain:.1f}, one piece {whole:.1f}, "
              f"by chunks {chunked:.1f} ms ({chunked / whole:.2f}x one piece, {chunked / plain:.2f}x float)")
    for c_in, c_out, side in POINTWISE:
        x = torch.randn(2, c_in, side, side)
        w, b = torch.randn(c_out, c_in, 1, 1), torch.randn(c_out)
        ours = median_ms(lambda: conv2d(x, w, b))
        views = median_ms(lambda: F.linear(x.permute(0, 2, 3, 1), w.reshape(c_out, -1), b).permute(0, 3, 1, 2)
                          .contiguous())
        onednn = median_ms(lambda: F.conv2d(x, w, b))
        print(f"1x1 {c_in}->{c_out} at {side}x{side}: per picture {ours:.2f}, channels-last product {views:.2f}, "
              f"F.conv2d {onednn:.2f} ms ({ours / views:.2f}x the product)")


if __name__ == "__main__":
    main()

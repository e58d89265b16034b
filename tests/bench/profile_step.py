"""Where a training step's time goes (torch profiler, CPU time by operator), ours and reference.

    python -m tests.bench.profile_step [nf4|none] [attn|linear]

Used to explain a missed time goal; prints the top operators of one step after a warm-up."""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from .common import sd15_unet


def profile(impl: str, quant: str, targets: str, top: int = 12) -> str:
    from sdlora.mixing import Mix
    from sdlora.quant import quantize_model

    from . import adapters

    unet = sd15_unet()
    if quant == "nf4":
        quantize_model(unet, "nf4", convs=impl == "ours")
    if impl == "ours":
        _, mixer = adapters.ours(unet, targets, ["a"], std=0.0)
        context = lambda: mixer.apply(Mix({"a": 1.0}), mode="unfused")  # noqa: E731
        params = [p for n, p in unet.named_parameters() if ".adapters." in n]
    else:
        adapters.reference(unet, targets, ["a"], std=0.0)
        context = nullcontext
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)

    def step():
        with context():
            unet(x, torch.tensor([500]), hidden).sample.square().mean().backward()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=top, max_name_column_width=40)


if __name__ == "__main__":
    quant = sys.argv[1] if len(sys.argv) > 1 else "nf4"
    targets = sys.argv[2] if len(sys.argv) > 2 else "attn"
    for impl in ("ours", "reference"):
        print(f"== {impl}, {quant} base, {targets} ==")
        print(profile(impl, quant, targets))

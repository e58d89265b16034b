"""Training step (rank 16, SD1.5 UNet, 32x32 latents, batch 1): time and peak memory, ours against
a PEFT-injected diffusers UNet, on a float and on an NF4 base.

Each variant runs in its own process, so its peak resident memory (Linux VmHWM, reset once the
model is built and quantized) is its own. Peak memory is counted from the process's size after
imports: it holds the base, the adapter, activations, gradients and optimizer state. The NF4
reference is what diffusers' bitsandbytes path gives (NF4 with double quantization on linear
layers); ours is NF4 on linear and conv layers."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from contextlib import nullcontext

import torch

from .common import Row, median_time, peak_bytes, reset_peak, rss_bytes, sd15_unet


def measure(impl: str, quant: str, targets: str, runs: int) -> dict:
    import importlib

    for module in ("diffusers", "peft", "sdlora.quant", "sdlora.mixing"):  # both sides' imports, before the baseline
        importlib.import_module(module)
    baseline = rss_bytes()
    unet = sd15_unet()
    if impl == "ours":
        from sdlora.inject import adapter_parameters
        from sdlora.mixing import Mix
        from sdlora.quant import quantize_model

        from . import adapters

        if quant == "nf4":
            quantize_model(unet, "nf4", convs=True)
        layers, mixer = adapters.ours(unet, targets, ["a"], std=0.0)
        params = adapter_parameters(layers, "a")
        context = lambda: mixer.apply(Mix({"a": 1.0}), mode="unfused")  # noqa: E731
    else:
        from sdlora.quant import quantize_model

        from . import adapters

        if quant == "nf4":
            quantize_model(unet, "nf4", convs=False)
        adapters.reference(unet, targets, ["a"], std=0.0)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        context = nullcontext
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    hidden, t = torch.randn(1, 77, 768, generator=g), torch.tensor([500])

    def step():
        with context():
            loss = torch.nn.functional.mse_loss(unet(x, t, hidden).sample, target)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gc.collect()
    reset_peak()
    ms = median_time(step, runs=runs, warmup=1)
    return {"ms": ms, "peak_bytes": peak_bytes() - baseline, "trainable": sum(p.numel() for p in params)}


def run(machine: str, runs: int = 5) -> list[Row]:
    rows = []
    for quant in ("none", "nf4"):
        for targets in ("attn", "linear"):
            got = {}
            for impl in ("ours", "reference"):
                proc = subprocess.run([sys.executable, "-m", "tests.bench.train_step", impl, quant, targets, str(runs)],
                                      capture_output=True, text=True, check=True)
                got[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            base = "float" if quant == "none" else "nf4"
            assert got["ours"]["trainable"] == got["reference"]["trainable"], got
            rows.append(Row(f"train step {base} base, {targets} (ms)", got["ours"]["ms"], got["reference"]["ms"], "ms",
                            1.0, machine, note=f"{got['ours']['trainable'] / 1e6:.2f} M trainable parameters"))
            rows.append(Row(f"train step {base} base, {targets} peak memory (MB)", got["ours"]["peak_bytes"] / 2**20,
                            got["reference"]["peak_bytes"] / 2**20, "MB", 0.6 if quant == "nf4" else None, machine))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["ours", "reference"])
    ap.add_argument("quant", choices=["none", "nf4"])
    ap.add_argument("targets", choices=["attn", "linear"])
    ap.add_argument("runs", type=int)
    a = ap.parse_args()
    print(json.dumps(measure(a.impl, a.quant, a.targets, a.runs)))

"""Training step (rank 16, SD1.5 UNet, 32x32 latents, batch 1): time and peak memory, ours against
a PEFT-injected diffusers UNet, on a float and on an NF4 base.

Times are taken in a fresh process per row, ours and the reference's steps alternately (paired_times),
with the page faults each side's step takes (run.py says why a process of its own). Peak memory is
taken with each variant in its own process, so its peak resident memory (Linux VmHWM, reset once the
model is built and quantized) is its own. Peak memory is counted from the process's size after
imports: it holds the base, the adapter, activations, gradients and optimizer state. The NF4
reference is what diffusers' bitsandbytes path gives (NF4 with double quantization on linear
layers); ours is NF4 on linear and conv layers."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import torch

from .common import KEEP_ALLOCATOR_ENV, KEEP_ALLOCATOR_NOTE, Row, paired_times, peak_bytes, reset_peak, rss_bytes, sd15_unet, sdxl_unet

SDXL_SIDE = 32  # latents (256 px) for the SDXL rows on the CPU: a 2.6B-parameter UNet step takes minutes beyond


def build(impl: str, quant: str, targets: str, arch: str = "sd15", checkpointing: bool = False):
    """(one training step as a callable, trainable parameter count). arch sdxl: SDXL's UNet with its added
    conditions, at SDXL_SIDE latents; checkpointing: each side's gradient checkpointing (ours keeps the mix
    in the recomputation, the reference is diffusers' own)."""
    from sdlora.inject import adapter_parameters
    from sdlora.mixing import Mix
    from sdlora.quant import quantize_model
    from sdlora.training.loop import enable_unet_checkpointing

    from . import adapters

    unet = sdxl_unet() if arch == "sdxl" else sd15_unet()
    if quant == "nf4":
        # the reference: NF4 on linear layers with bitsandbytes' own Linear4bit forward, as diffusers
        quantize_model(unet, "nf4", convs=impl == "ours", bnb_forward=impl != "ours")
    if impl == "ours":
        layers, mixer = adapters.ours(unet, targets, ["a"], std=0.0)
        params = adapter_parameters(layers, "a")
        context = lambda: mixer.apply(Mix({"a": 1.0}), mode="unfused")  # noqa: E731
    else:
        adapters.reference(unet, targets, ["a"], std=0.0)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        context = nullcontext
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if checkpointing:
        enable_unet_checkpointing(unet) if impl == "ours" else unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = SDXL_SIDE if arch == "sdxl" else 32
    x, target = torch.randn(1, 4, side, side, generator=g), torch.randn(1, 4, side, side, generator=g)
    hidden, t = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g), torch.tensor([500])
    extra = {}
    if arch == "sdxl":  # the pooled embedding (1, 1280) and the six time ids
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g),
                                      "time_ids": torch.tensor([[8.0 * side, 8 * side, 0, 0, 8 * side, 8 * side]])}

    def step():
        with context():
            loss = torch.nn.functional.mse_loss(unet(x, t, hidden, **extra).sample, target)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def peak_memory(impl: str, quant: str, targets: str, arch: str = "sd15", checkpointing: bool = False) -> dict:
    """In a fresh process: peak resident bytes above the size after imports, over two steps."""
    import importlib

    for module in ("diffusers", "peft", "sdlora.quant", "sdlora.mixing"):  # both sides' imports, before the baseline
        importlib.import_module(module)
    baseline = rss_bytes()
    step, trainable = build(impl, quant, targets, arch, checkpointing)
    gc.collect()
    reset_peak()
    step()
    step()
    return {"peak_bytes": peak_bytes() - baseline, "trainable": trainable}


# glibc raises its mmap threshold after large frees, so the fp32 model a process builds before
# quantizing it would stay resident as free heap and hide the quantized model's real size. A fixed
# threshold (the same for both sides) hands every large freed block back to the system.
_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _process(*args: str, env: dict | None = None) -> dict:
    """`python -m tests.bench.train_step ARGS` in a fresh process: its last line, as JSON."""
    proc = subprocess.run([sys.executable, "-m", "tests.bench.train_step", *args], capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_pair(quant: str, targets: str, runs: int, arch: str = "sd15", checkpointing: bool = False) -> dict:
    """Ours and the reference's step (ms, medians of `runs` alternating pairs) and page faults per step, both
    built in this process (ours first)."""
    ours_step, _ = build("ours", quant, targets, arch, checkpointing)
    ref_step, _ = build("reference", quant, targets, arch, checkpointing)
    faults: dict = {}
    ours_ms, ref_ms = paired_times(ours_step, ref_step, runs, warmup=1 if arch == "sdxl" else 2, faults=faults)
    return {"ours_ms": ours_ms, "ref_ms": ref_ms, "ours_faults": faults["a"], "ref_faults": faults["b"]}


def _faults_note(t: dict) -> str:
    return f"page faults per step: ours {t['ours_faults']:.0f}, reference {t['ref_faults']:.0f}"


def run_sdxl(machine: str, runs: int = 3) -> list[Row]:
    """SDXL's UNet, NF4 base (ours: linear and conv layers; the reference: diffusers' linear layers), attention
    LoRA, gradient checkpointing on both sides: time and peak memory of one step, ours over the reference."""
    mem = {impl: _process(impl, "nf4", "attn", "--sdxl", env=_ENV) for impl in ("ours", "reference")}
    assert mem["ours"]["trainable"] == mem["reference"]["trainable"], mem
    t = _process("ours", "nf4", "attn", "--sdxl", "--time", str(runs))
    note = f"{SDXL_SIDE}x{SDXL_SIDE} latents, gradient checkpointing, {mem['ours']['trainable'] / 1e6:.2f} M trainable"
    return [Row("sdxl train step nf4 base, attn (ms)", t["ours_ms"], t["ref_ms"], "ms", 1.0, machine,
                note=f"{note}; {_faults_note(t)}"),
            Row("sdxl train step nf4 base, attn peak memory (MB)", mem["ours"]["peak_bytes"] / 2**20,
                mem["reference"]["peak_bytes"] / 2**20, "MB", 0.6, machine, note=note)]


def run(machine: str, runs: int = 5) -> list[Row]:
    rows = []
    for quant in ("none", "nf4"):
        for targets in ("attn", "linear"):
            mem = {impl: _process(impl, quant, targets, env=_ENV) for impl in ("ours", "reference")}
            assert mem["ours"]["trainable"] == mem["reference"]["trainable"], mem
            t = _process("ours", quant, targets, "--time", str(runs))  # the default allocator, as a user's process
            base = "float" if quant == "none" else "nf4"
            rows.append(Row(f"train step {base} base, {targets} (ms)", t["ours_ms"], t["ref_ms"], "ms", 1.0, machine,
                            note=f"{mem['ours']['trainable'] / 1e6:.2f} M trainable parameters; {_faults_note(t)}"))
            rows.append(Row(f"train step {base} base, {targets} peak memory (MB)", mem["ours"]["peak_bytes"] / 2**20,
                            mem["reference"]["peak_bytes"] / 2**20, "MB", 0.6 if quant == "nf4" else None, machine))
            if quant == "nf4":  # reported, not a goal: the same pair where no step takes page faults
                k = _process("ours", quant, targets, "--time", str(runs), env=KEEP_ALLOCATOR_ENV)
                rows.append(Row(f"train step {base} base, {targets}, allocator keeping its memory (ms)", k["ours_ms"],
                                k["ref_ms"], "ms", None, machine,
                                note=f"{KEEP_ALLOCATOR_NOTE}; {_faults_note(k)}"))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["ours", "reference"])
    ap.add_argument("quant", choices=["none", "nf4"])
    ap.add_argument("targets", choices=["attn", "linear"])
    ap.add_argument("--sdxl", action="store_true", help="SDXL's UNet with gradient checkpointing")
    ap.add_argument("--time", type=int, metavar="RUNS", help="time ours against the reference (impl is ignored)")
    a = ap.parse_args()
    arch = "sdxl" if a.sdxl else "sd15"
    if a.time:
        print(json.dumps(time_pair(a.quant, a.targets, a.time, arch, a.sdxl)))
    else:
        print(json.dumps(peak_memory(a.impl, a.quant, a.targets, arch, a.sdxl)))

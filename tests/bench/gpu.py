"""make bench-gpu: the CUDA bench (issue 18), ours against diffusers + PEFT in the same run, on the SD1.5 UNet
architecture (random weights), bf16:

- a LoRA training step (rank 16, attention targets) at 64x64 latents, batch 4, on a bf16 base and on an NF4 base
  (bitsandbytes' CUDA kernels; ours NF4 on linear and conv layers, the reference on linear layers as diffusers'
  bitsandbytes path): ms per step, peak memory (torch.cuda.max_memory_allocated), and MFU: the step's FLOPs
  (counted once with torch's FlopCounterMode on the meta device: forward plus the backward the frozen base
  needs, the input gradients) over the time and the GPU's dense bf16 peak;
- generation, one UNet step of a guidance-doubled batch of 2, with 1, 4 and 8 adapters: ours (fused on bf16)
  against set_adapters;
- a per-sample batch of 8 mixes against one shared mix (ours, unfused, batch 8).

    python -m tests.bench.gpu [--out bench-gpu.json] [--runs 10]

Without CUDA it refuses in one line (exit 2). Budget: under 8 minutes on one H100/H200."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; SDLORA_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
SIDE, BATCH = 64, 4


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
    ap.add_argument("--runs", type=int, default=10, help="timed runs per figure after 3 warm-ups (default 10)")
    return ap.parse_args(argv)


def peak_tflops(name: str) -> float | None:
    import os

    if os.environ.get("SDLORA_PEAK_TFLOPS"):
        return float(os.environ["SDLORA_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_flops(side: int = SIDE, batch: int = BATCH) -> float:
    """FLOPs of one LoRA training step's base compute on the SD1.5 UNet, counted on the meta device (no memory,
    no GPU): the forward and the input-gradient backward (the frozen base needs no weight gradients)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .common import CONFIGS

    config = json.loads((CONFIGS / "sd15_unet.json").read_text())
    config.pop("_class_name")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(torch.bfloat16)
        x = torch.randn(batch, 4, side, side, dtype=torch.bfloat16, requires_grad=True)
        hidden = torch.randn(batch, 77, 768, dtype=torch.bfloat16)
        t = torch.full((batch,), 500)
    unet.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, hidden).sample.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def _cuda_time(fn, runs: int) -> float:
    """Median ms of fn() over `runs` after 3 warm-ups, timed with CUDA events."""
    import statistics

    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _train_step(impl: str, quant: str):
    """(step callable, model) for one side: a bf16 SD1.5 UNet on CUDA, rank-16 attention LoRA, AdamW."""
    from contextlib import nullcontext

    from sdlora.inject import adapter_parameters
    from sdlora.mixing import Mix
    from sdlora.quant import quantize_model

    from . import adapters
    from .common import sd15_unet

    unet = sd15_unet(torch.bfloat16)
    if quant == "nf4":
        quantize_model(unet, "nf4", convs=impl == "ours", compute_dtype=torch.bfloat16, device="cuda",
                       bnb_forward=impl != "ours")
    unet.cuda()
    if impl == "ours":
        layers, mixer = adapters.ours(unet, "attn", ["a"], std=0.0)
        params = adapter_parameters(layers, "a")
        context = lambda: mixer.apply(Mix({"a": 1.0}), mode="unfused")  # noqa: E731
    else:
        adapters.reference(unet, "attn", ["a"], std=0.0)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        context = nullcontext
    unet.cuda()  # the adapters too
    unet.requires_grad_(False)
    for p in params:
        p.data = p.data.float()  # trained weights in fp32, as a mixed-precision trainer keeps them
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, 4, SIDE, SIDE, device="cuda", dtype=torch.bfloat16, generator=g)
    target = torch.randn_like(x)
    hidden = torch.randn(BATCH, 77, 768, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.full((BATCH,), 500, device="cuda")

    def step():
        with context(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(unet(x, t, hidden).sample.float(), target.float())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, unet


def training_rows(runs: int, machine: str, flops: float, peak: float | None) -> list:
    from .common import Row

    rows, ms = [], {}
    for quant in ("none", "nf4"):
        result = {}
        for impl in ("ours", "reference"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step, model = _train_step(impl, quant)
            result[impl] = (_cuda_time(step, runs), torch.cuda.max_memory_allocated() / 2**20)
            del step, model
        ms[quant] = result["ours"][0]
        base = "bf16" if quant == "none" else "nf4"
        rows.append(Row(f"gpu train step {base} base, attn, 64x64 b4 (ms)", result["ours"][0], result["reference"][0],
                        "ms", 1.0, machine))
        rows.append(Row(f"gpu train step {base} base, attn peak memory (MB)", result["ours"][1],
                        result["reference"][1], "MB", 0.6 if quant == "nf4" else None, machine))
        if peak:  # MFU, ours and the reference's; higher is better, so no ratio goal: the note says met or missed
            mfu = [100 * flops / (result[i][0] / 1000) / (peak * 1e12) for i in ("ours", "reference")]
            goal = f"; goal >= 35% {'met' if mfu[0] >= 35 else 'MISSED'}" if quant == "none" else ""
            rows.append(Row(f"gpu train step {base} base MFU (%)", mfu[0], mfu[1], "%", None, machine,
                            note=f"{flops / 1e12:.2f} TFLOP per step, peak {peak:g} TFLOP/s{goal}"))
    rows.append(Row("gpu train step: nf4 over bf16 (ms)", ms["nf4"], ms["none"], "ms", 1.15, machine))
    return rows


@torch.no_grad()
def generation_rows(runs: int, machine: str) -> list:
    import copy

    from sdlora.mixing import Mix

    from . import adapters
    from .common import Row, sd15_unet

    names = [f"a{i}" for i in range(8)]
    pristine = sd15_unet(torch.bfloat16)
    ours = copy.deepcopy(pristine).cuda()
    _, mixer = adapters.ours(ours, "attn", names)
    ours.to(torch.bfloat16)
    ref = adapters.reference(copy.deepcopy(pristine), "attn", names).to("cuda", torch.bfloat16)
    del pristine
    x = torch.randn(2, 4, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    t, hidden = torch.full((2,), 500, device="cuda"), torch.randn(2, 77, 768, device="cuda", dtype=torch.bfloat16)
    rows = []
    for n in (1, 4, 8):
        mix = Mix({a: 1.0 / n for a in names[:n]})
        ref.set_adapters(names[:n], [1.0 / n] * n)
        with mixer.apply(mix, mode="fused"):
            ours_ms = _cuda_time(lambda: ours(x, t, hidden), runs)
        ref_ms = _cuda_time(lambda: ref(x, t, hidden), runs)
        rows.append(Row(f"gpu generate, {n} adapters: ours fused vs set_adapters (ms/step)", ours_ms, ref_ms, "ms",
                        None, machine))
    x8, t8 = torch.randn(8, 4, SIDE, SIDE, device="cuda", dtype=torch.bfloat16), torch.full((8,), 500, device="cuda")
    h8 = torch.randn(8, 77, 768, device="cuda", dtype=torch.bfloat16)
    mixes = [Mix({names[i]: 1.0}) for i in range(8)]

    def per_sample():
        with mixer.apply(mixes):
            ours(x8, t8, h8)

    def shared():
        with mixer.apply(Mix({names[0]: 1.0}), mode="unfused"):
            ours(x8, t8, h8)

    rows.append(Row("gpu per-sample batch of 8 mixes vs one shared mix (ms)", _cuda_time(per_sample, runs),
                    _cuda_time(shared, runs), "ms", 1.1, machine))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench-gpu: error: no CUDA device here; run it on a machine with an NVIDIA GPU (make bench is the CPU "
              "bench)", file=sys.stderr)
        return 2
    from .common import print_table, versions, write_results

    t0 = time.time()
    name = torch.cuda.get_device_name(0)
    machine = f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    peak = peak_tflops(name)
    flops = step_flops()
    rows = training_rows(args.runs, machine, flops, peak) + generation_rows(args.runs, machine)
    print_table(rows)
    write_results(rows, args.out, {"machine": machine, "versions": versions(), "seconds": round(time.time() - t0),
                                   "peak_tflops": peak, "step_flops": flops})
    print(f"\nwrote {args.out} ({len(rows)} rows) in {time.time() - t0:.0f} s on {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of a fused 4-adapter mix (issue 18): the SD1.5 UNet (fp32, random weights), rank-16 adapters on
its `linear` targets, one UNet step of a guidance-doubled batch of 2 at 32x32 latents under the fused mix,
against the same step with no adapter applied. Each variant in its own process: the peak resident size above
the size after imports (Linux VmHWM, reset once the model and its adapters are built). Before sdlora/fusing.py a fused mix kept a
full copy of every weight it touched (1.7 GB here)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from .common import Row, peak_bytes, reset_peak, rss_bytes, sd15_unet

NAMES = ["a0", "a1", "a2", "a3"]


@torch.no_grad()
def measure(variant: str) -> dict:
    import gc

    from sdlora.mixing import Mix

    from . import adapters

    baseline = rss_bytes()  # after imports: the peak counts the model, its adapters, the step and what fusing keeps
    unet = sd15_unet()
    _, mixer = adapters.ours(unet, "linear", NAMES)
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])
    before = {n: p.detach().clone() for n, p in list(unet.named_parameters())[:4]}  # a spot check of the restore
    gc.collect()
    reset_peak()
    mix = Mix({n: 0.25 for n in NAMES}) if variant == "fused4" else Mix()
    with mixer.apply(mix, mode="fused" if variant == "fused4" else "unfused"):
        unet(x, t, hidden)
    restored = all(torch.equal(p, before[n]) for n, p in list(unet.named_parameters())[:4])
    return {"peak_bytes": peak_bytes() - baseline, "restored": restored}


def run(machine: str) -> list[Row]:
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # as train_step: freed blocks go back to the system
    import os

    out = {}
    for variant in ("none", "fused4"):
        proc = subprocess.run([sys.executable, "-m", "tests.bench.fused_memory", variant], capture_output=True,
                              text=True, check=True, env={**os.environ, **env})
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fused4"]["restored"], "the fused mix did not restore the base bit for bit"
    note = "SD1.5 UNet fp32, 4 rank-16 adapters on linear targets, one step at 32x32 (batch 2); peak above the process after imports"
    return [Row("fused 4-adapter mix step: peak memory vs no adapters (MB)", out["fused4"]["peak_bytes"] / 2**20,
                out["none"]["peak_bytes"] / 2**20, "MB", 1.10, machine, note=note)]


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))

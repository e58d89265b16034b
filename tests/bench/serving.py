"""Serving 8 requests with 8 different mixes (issue 17): the embedded base, 64x64 pictures, 20 steps, one
random rank-8 attention adapter per request (UNet and text encoder).

Ours concurrent: 8 threads call Studio.pictures at once (what the page and the A1111 API call); the batcher
runs them as one per-sample pass. Ours serial: the same 8 one after another through the same Studio (each
pays the batch window, as a lone request does). Reference: diffusers + PEFT, the same pipeline and the
same 8 adapters loaded with load_lora_weights (kohya files), `set_adapters` then the pipeline per request,
one after another. Wall times; each figure the median of `runs`."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .common import Row

N, STEPS = 8, 20


def _adapters(folder: Path) -> list[Path]:
    from sdlora.adapter_io import save_adapter
    from sdlora.adapters import AdapterConfig
    from sdlora.inject import adapter_layers
    from sdlora.pipelines import load_base
    from tests.core_helpers import randomize

    paths = []
    for i in range(N):
        maker = load_base("embedded")
        maker.add_adapter(f"s{i}", AdapterConfig(rank=8, alpha=8, seed=i), targets="attn", text_encoder=True)
        for model in maker.models().values():
            randomize(adapter_layers(model), f"s{i}", seed=i, std=0.05)
        paths.append(save_adapter(maker, f"s{i}", folder / f"s{i}.safetensors", "kohya"))
    return paths


def _median(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run(machine: str, runs: int = 3) -> list[Row]:
    from diffusers import StableDiffusionPipeline

    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import embedded_path, load_base
    from sdlora.studio import Studio

    folder = Path(tempfile.mkdtemp(prefix="sdlora-bench-serve-"))
    paths = _adapters(folder / "library")
    studio = Studio(load_base("embedded"), AdapterLibrary(folder / "library"), folder / "outputs")
    prompts = [f"a red circle <lora:s{i}:{0.5 + 0.1 * i:.1f}>" for i in range(N)]

    def one(i):
        studio.pictures(prompts[i], [], seed=i, steps=STEPS, guidance=5.0, width=64, height=64)

    def serial():
        for i in range(N):
            one(i)

    def concurrent():
        threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    ref = StableDiffusionPipeline.from_pretrained(embedded_path(), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for i, p in enumerate(paths):
        ref.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f"s{i}")

    def reference():
        for i in range(N):
            ref.set_adapters([f"s{i}"], [0.5 + 0.1 * i])
            ref("a red circle", num_inference_steps=STEPS, guidance_scale=5.0, width=64, height=64,
                generator=torch.Generator().manual_seed(i))

    concurrent_ms, serial_ms, ref_ms = (_median(f, runs) for f in (concurrent, serial, reference))
    before = len(studio.batcher.passes)
    concurrent()
    passes = studio.batcher.passes[before:]
    note = f"{N} requests, {STEPS} steps, 64x64, embedded base; last concurrent run's passes: {passes}"
    return [Row("serve 8 mixes concurrently vs the same 8 served serially (ms)", concurrent_ms, serial_ms, "ms", 0.6,
                machine, note=note),
            Row("serve 8 mixes concurrently vs diffusers+PEFT set_adapters serially (ms)", concurrent_ms, ref_ms, "ms",
                0.6, machine, note=note)]

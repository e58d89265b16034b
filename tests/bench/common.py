"""Shared pieces of `make bench`: timing, memory readings, the machine, result rows.

Every time is the median of at least 5 runs after a warm-up; every ratio is ours / reference,
both measured in the same run, pair by pair, alternately (paired_times)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Row:
    name: str
    ours: float | None
    reference: float | None
    unit: str
    goal: float | None  # the largest ours/reference we accept; None: reported only
    machine: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    def as_json(self) -> dict:
        d = asdict(self)
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
        cpu = model
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} x {cpu} (CPU), {torch.get_num_threads()} threads, torch {torch.__version__}"


def versions() -> dict:
    import accelerate
    import bitsandbytes
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def paired_times(a, b, runs: int = 5, warmup: int = 2, faults: dict | None = None) -> tuple[float, float]:
    """Medians (ms) of a() and b(), run alternately after `warmup` calls of each, so that drift of
    the machine (clock, caches, page faults of fresh copies) falls on both sides alike. faults: a dict
    given here gets the median minor page faults per call of each side ("a", "b"): memory that an
    allocator hands back to the system and takes again at each call is zeroed page by page, and that
    is part of a side's time (see run.py)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    fa, fb = [], []
    for _ in range(runs):
        for fn, out, flt in ((a, ta, fa), (b, tb, fb)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1000)
            flt.append(minor_faults() - f0)
    if faults is not None:
        faults.update(a=statistics.median(fa), b=statistics.median(fb))
    return statistics.median(ta), statistics.median(tb)


def minor_faults() -> int:
    """This process's minor page faults so far (each a fresh 4 KB page zeroed on first touch)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# An allocator that keeps what it takes: every allocation from the heap (no mmap below 1 GB), nothing handed
# back (no trim below 100 GB). Then neither side's step takes page faults, and the rows timed under it say what
# the steps' compute costs apart from the default allocator's zeroing of fresh pages (run.py).
KEEP_ALLOCATOR_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(10**9), "MALLOC_TRIM_THRESHOLD_": str(10**11)}
KEEP_ALLOCATOR_NOTE = "MALLOC_MMAP_THRESHOLD_=1e9 MALLOC_TRIM_THRESHOLD_=1e11"


def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    """Linux: make VmHWM (the peak resident size) start again from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def print_table(rows: list[Row]) -> None:
    head = f"{'benchmark':<58} {'ours':>12} {'reference':>12} {'unit':<9} {'ratio':>7} {'goal':>6}  verdict"
    print(head)
    print("-" * len(head))
    for r in rows:
        ours = "-" if r.ours is None else f"{r.ours:.4g}"
        ref = "-" if r.reference is None else f"{r.reference:.4g}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        goal = "-" if r.goal is None else f"{r.goal:g}"
        verdict = "" if r.goal is None or r.ratio is None else ("met" if r.ratio <= r.goal else "MISSED")
        print(f"{r.name:<58} {ours:>12} {ref:>12} {r.unit:<9} {ratio:>7} {goal:>6}  {verdict}")
        if r.note:
            print(f"{'':<4}{r.note}")


def write_results(rows: list[Row], path: Path, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.as_json() for r in rows], indent=1) + "\n")
    tmp.replace(path)
    meta = path.with_name(path.stem + "-meta.json")
    meta.write_text(json.dumps(extra, indent=1) + "\n")


def sd15_unet(dtype=torch.float32, seed: int = 0):
    """The real SD1.5 UNet architecture from its published config, random weights (no download)."""
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / "sd15_unet.json").read_text())
    config.pop("_class_name")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).to(dtype).eval()


def sdxl_unet(seed: int = 0):
    """The real SDXL UNet architecture from its published config, random weights, fp32 (10 GB)."""
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / "sdxl_unet.json").read_text())
    config.pop("_class_name", None)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def sd15_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**json.loads((CONFIGS / "sd15_text_encoder.json").read_text()))
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def sdxl_text_encoder_2(seed: int = 0):
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14, 694 M parameters) from its published config, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**json.loads((CONFIGS / "sdxl_text_encoder_2.json").read_text()))
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def sd_vae(seed: int = 0):
    """The SD1.5 / SDXL VAE architecture (AutoencoderKL, 84 M parameters) from its published config, random weights."""
    from diffusers import AutoencoderKL

    config = json.loads((CONFIGS / "sd_vae.json").read_text())
    config.pop("_class_name")
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()

"""Where a training step's time goes (torch profiler, CPU time by operator), ours and reference.

    python -m tests.bench.profile_step [nf4|none] [attn|linear]

Used to explain a missed time goal; prints the top operators of one step (the same step
train_step times) after a warm-up."""

from __future__ import annotations

import sys

import torch

from .train_step import build


def profile(impl: str, quant: str, targets: str, top: int = 12) -> str:
    step, _ = build(impl, quant, targets)
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

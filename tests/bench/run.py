"""make bench: every benchmark, a table on stdout, bench-results.json (rows) beside it.

    python -m tests.bench.run [--out bench-results.json] [--quick] [--only SECTION ...]

--quick: 3 runs per figure instead of 5 and no SDXL (a smoke run; the figures `make bench`
reports use the defaults).

Each section runs in a process of its own (and each training row's timing in one of its own, see
train_step.py), so that a figure does not depend on which sections ran before it. It did: the memory
section builds and frees about 13 GB of models, and glibc keeps most of it as free heap in the process.
A later step's large temporary tensors (bitsandbytes' dequantized weights, oneDNN's reordered conv
weights, activations) were then carved out of that already-resident memory, where in a process of its
own, as a user's, each comes from the system and is zeroed page by page at every step: the reference's
NF4 training step takes about 700,000 page faults (2.8 GB) per step there and ours, whose dequantized
weights go to reused scratch buffers (sdlora/quant/fast4bit.py), a few. The rows give both sides' faults
per step, and the NF4 training and generation steps are also timed with an allocator that keeps its
memory (no faults on either side; reported, without goals)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import KEEP_ALLOCATOR_ENV, KEEP_ALLOCATOR_NOTE, Row, machine, print_table, versions, write_results

SECTIONS = ["memory", "train", "train-sdxl", "generate", "generate-nf4", "serve"]


def section(name: str, where: str, runs: int, quick: bool) -> list[Row]:
    """One section's rows, computed in this process."""
    if name == "memory":
        from . import fused_memory, memory

        return memory.run(where, sdxl=not quick) + fused_memory.run(where)
    if name == "train":
        from . import train_step

        return train_step.run(where, runs=runs)
    if name == "train-sdxl":
        from . import train_step

        return train_step.run_sdxl(where)
    if name == "generate":
        from . import generation

        return generation.run(where, runs=runs)
    if name == "generate-nf4":
        from . import generation

        return generation.run_nf4(where, runs=runs)
    from . import serving

    return serving.run(where, runs=3)


def _keeping_rows(rows: list[Row]) -> list[Row]:
    """generate-nf4's goal rows against the reference (0 and 8 adapters), run with KEEP_ALLOCATOR_ENV: renamed and
    without goals (reported only); their notes keep the page-fault counts (the last part of each note)."""
    return [Row(r.name.replace(" (ms", ", allocator keeping its memory (ms"), r.ours, r.reference, r.unit, None,
                r.machine, note=f"{KEEP_ALLOCATOR_NOTE}; {r.note.split('; ')[-1]}")
            for r in rows if r.goal and "vs set_adapters" in r.name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, default=None)
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # the child: one section's rows
    ap.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    runs = 3 if args.quick else 5
    where = machine()
    if args.section:
        rows = section(args.section, where, runs, args.quick)
        args.rows_out.write_text(json.dumps([r.__dict__ for r in rows]))
        return 0
    sections = args.only or [s for s in SECTIONS if not (args.quick and s == "train-sdxl")]
    rows: list[Row] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sdlora-bench-") as tmp:
        for name in sections:
            # The NF4 generation steps also with an allocator that keeps its memory (common.KEEP_ALLOCATOR_ENV),
            # reported without goals: what the steps cost apart from the default allocator's fresh pages.
            for keep in (False, True) if name == "generate-nf4" else (False,):
                out = Path(tmp) / f"{name}-{keep}.json"
                cmd = [sys.executable, "-m", "tests.bench.run", "--section", name, "--rows-out", str(out)]
                subprocess.run(cmd + (["--quick"] if args.quick else []), check=True,
                               env=KEEP_ALLOCATOR_ENV if keep else None)
                got = [Row(**r) for r in json.loads(out.read_text())]
                rows += _keeping_rows(got) if keep else got
            print(f"[{name} done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if not torch.cuda.is_available():
        rows.append(Row("GPU rows (64x64 latents, bf16, MFU)", None, None, "-", None, where,
                        note="no GPU on this machine: run `make bench-gpu` where CUDA is present"))
    print_table(rows)
    write_results(rows, args.out, {"machine": where, "versions": versions(), "seconds": round(time.time() - t0),
                                   "runs_per_figure": runs, "sections": "one process each"})
    print(f"\nwrote {args.out} ({len(rows)} rows) in {time.time() - t0:.0f} s; versions: {json.dumps(versions())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""make bench: every benchmark, a table on stdout, bench-results.json (rows) beside it.

    python -m tests.bench.run [--out bench-results.json] [--quick]

--quick: 3 runs per figure instead of 5 and no SDXL (a smoke run; the figures `make bench`
reports use the defaults)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .common import Row, machine, print_table, versions, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=["memory", "train", "train-sdxl", "generate", "serve"], default=None)
    args = ap.parse_args(argv)
    runs = 3 if args.quick else 5
    where = machine()
    sections = args.only or ["memory", "train", "generate", "serve"] + ([] if args.quick else ["train-sdxl"])
    rows: list[Row] = []
    t0 = time.time()
    if "memory" in sections:
        from . import memory

        rows += memory.run(where, sdxl=not args.quick)
        from . import fused_memory

        rows += fused_memory.run(where)
        print(f"[memory done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if "train" in sections:
        from . import train_step

        rows += train_step.run(where, runs=runs)
        print(f"[training done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if "train-sdxl" in sections:
        from . import train_step

        rows += train_step.run_sdxl(where)
        print(f"[SDXL training done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if "generate" in sections:
        from . import generation

        rows += generation.run(where, runs=runs)
        print(f"[generation done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if "serve" in sections:
        from . import serving

        rows += serving.run(where, runs=3)
        print(f"[serving done at {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    if not torch.cuda.is_available():
        rows.append(Row("GPU rows (64x64 latents, bf16, MFU)", None, None, "-", None, where,
                        note="no GPU on this machine: run `make bench` where CUDA is present"))
    print_table(rows)
    write_results(rows, args.out, {"machine": where, "versions": versions(), "seconds": round(time.time() - t0),
                                   "runs_per_figure": runs})
    print(f"\nwrote {args.out} ({len(rows)} rows) in {time.time() - t0:.0f} s; versions: {json.dumps(versions())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench-results.json as the Markdown table the README shows: python -m tests.bench.table [FILE]."""

import json
import sys
from pathlib import Path


def markdown(rows: list[dict]) -> str:
    out = ["| benchmark | ours | reference | ratio | goal |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["ours"] is None:
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        goal = "-" if r["goal"] is None else (f"<= {r['goal']:.3g}" + (" met" if r["ratio"] <= r["goal"] else " **missed**"))
        out.append(f"| {r['name']} | {r['ours']:.4g} | {r['reference']:.4g} | {ratio} | {goal} |")
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results.json")
    print(markdown(json.loads(path.read_text())))

"""The adapter-file commands of `sdlora`: inspect, export, merge, resize, extract, bake (parsers and runs)."""

from __future__ import annotations

import argparse
import sys

from .choices import FILE_FORMATS, UNET_PRESETS
from .cli_common import add_base_flags, load_mix, parse_adapter_spec, pick_device, tell
from .errors import SdloraError


def add_tool_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="show an adapter file's format, method, ranks, alphas, targets, metadata",
                       description="Read an adapter file (any supported layout) and describe it.")
    i.add_argument("adapter", metavar="ADAPTER")
    i.add_argument("--json", action="store_true", help="print everything as JSON, per-module ranks and alphas included")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="convert an adapter file to another layout",
                       description="Write ADAPTER in another layout: sdlora (ours, full config), kohya (A1111, "
                                   "ComfyUI, Forge) or diffusers (PEFT). Module names are resolved against --base.")
    e.add_argument("adapter", metavar="ADAPTER")
    e.add_argument("--format", required=True, choices=FILE_FORMATS)
    e.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    add_base_flags(e, runs_model=False)
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", help="merge adapters with weights into one",
                       description="Merge adapters: sum_i w_i D_i per layer. Without --rank/--energy the merge is "
                                   "exact (the ranks are concatenated); with one, each layer is cut to that rank by "
                                   "SVD and the relative error is printed. DoRA adapters cannot be merged (bake them).")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER[:W[:TE_W]]")
    m.add_argument("--out", required=True, metavar="FILE")
    _add_rank_flags(m, required=False)
    add_base_flags(m, runs_model=False)
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resize", help="change an adapter's rank by SVD",
                       description="Cut every layer of an adapter to a rank, or to the rank that keeps an energy share, "
                                   "by truncated SVD; prints the relative error.")
    r.add_argument("adapter", metavar="ADAPTER")
    r.add_argument("--out", required=True, metavar="FILE")
    _add_rank_flags(r, required=True)
    add_base_flags(r, runs_model=False)
    r.set_defaults(func=cmd_resize)

    x = sub.add_parser("extract", help="extract a LoRA from a fine-tuned model",
                       description="Truncated SVD of (tuned - base) for every target layer that changed.")
    x.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model (same kinds as --base)")
    x.add_argument("--out", required=True, metavar="FILE")
    x.add_argument("--targets", default="all", choices=UNET_PRESETS)
    x.add_argument("--no-text-encoder", action="store_true", help="leave the text encoder(s) out")
    _add_rank_flags(x, required=True)
    add_base_flags(x, runs_model=False)
    x.set_defaults(func=cmd_extract)

    b = sub.add_parser("bake", help="fuse a mix of adapters into the base and write a diffusers folder",
                       description="Fuse ADAPTER[:W[:TE_W]]... into the base and save the pipeline as a diffusers "
                                   "folder that any diffusers tool loads without adapters. Exact for a float base; "
                                   "with --quant, each changed layer is dequantized, merged and requantized, the "
                                   "folder holds what the quantized model computes, and the error is printed.")
    b.add_argument("adapters", nargs="+", metavar="ADAPTER[:W[:TE_W]]")
    b.add_argument("--out", required=True, metavar="DIR")
    add_base_flags(b)
    b.set_defaults(func=cmd_bake)


def _weighted(spec: str, base):
    """Read FILE[:W[:TE_W]] with every module's scale times its role's weight."""
    from .adapter_io import read_adapter_file

    path, unet_w, te_w = parse_adapter_spec(spec)
    te_w = unet_w if te_w is None else te_w
    af = read_adapter_file(path, base)
    tell(path, af)
    for key, m in af.modules.items():
        m.scale *= unet_w if key.startswith("unet/") else te_w
    return af


def _write_tool_output(af, args, base, report) -> int:
    from .adapter_io import write_adapter_file

    if not args.out.endswith(".safetensors"):
        raise SdloraError(f"--out {args.out} must end in .safetensors", "pass e.g. --out merged.safetensors")
    print(write_adapter_file(af, args.out, args.format, base))
    print(report, file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from .pipelines import load_base
    from .tools.merge import merge

    base = load_base(args.base, device="cpu", config=args.base_config)
    merged, report = merge([(_weighted(spec, base), 1.0) for spec in args.adapters], args.rank, args.energy,
                           family=base.family)
    return _write_tool_output(merged, args, base, report)


def cmd_resize(args) -> int:
    from .adapter_io import read_adapter_file
    from .pipelines import load_base
    from .tools.merge import resize

    base = load_base(args.base, device="cpu", config=args.base_config)
    af = read_adapter_file(args.adapter, base)
    tell(args.adapter, af)
    resized, report = resize(af, args.rank, args.energy)
    return _write_tool_output(resized, args, base, report)


def cmd_extract(args) -> int:
    from .pipelines import load_base
    from .tools.extract import extract

    base = load_base(args.base, device="cpu", config=args.base_config)
    tuned = load_base(args.tuned, device="cpu")
    af, report = extract(base, tuned, args.targets, not args.no_text_encoder, args.rank, args.energy)
    return _write_tool_output(af, args, base, report)


def cmd_bake(args) -> int:
    from .pipelines import load_base
    from .tools.bake import bake

    base = load_base(args.base, device=pick_device(args.device), config=args.base_config)
    if args.quant != "none":
        base.quantize(args.quant)
    mix = load_mix(base, args.adapters)
    report = bake(base, mix, args.out)
    print(report.folder)
    print(report, file=sys.stderr)
    return 0


def _add_rank_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rank", type=int, help="keep this rank per module (truncated SVD)")
    g.add_argument("--energy", type=float, help="keep the fewest singular values holding this share of the energy, "
                                                "e.g. 0.95")
    p.add_argument("--format", default="sdlora", choices=FILE_FORMATS,
                   help="layout of the written file (default sdlora)")


def cmd_inspect(args) -> int:
    import json

    from .adapter_io import describe, read_adapter_file

    info = describe(read_adapter_file(args.adapter), args.adapter)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    per_module = info.pop("per_module")
    for key in ("file", "format", "method", "base_family", "modules", "modules_by_role", "ranks", "alphas",
                "parameters", "size_bytes", "trigger_words"):
        print(f"{key:>16}: {info[key]}")
    for key, value in sorted(info["metadata"].items()):
        print(f"{key:>16}: {value}")  # plain text: metadata is shown, never interpreted
    print(f"{'per module':>16}: {len(per_module)} (use --json to list them)")
    return 0


def cmd_export(args) -> int:
    from .adapter_io import read_adapter_file, write_adapter_file
    from .pipelines import load_base

    if not args.out.endswith(".safetensors"):
        raise SdloraError(f"--out {args.out} must end in .safetensors", "pass e.g. --out style.safetensors")
    base = load_base(args.base, device="cpu", config=args.base_config)
    af = read_adapter_file(args.adapter, base)
    tell(args.adapter, af)
    if af.base_family and af.base_family != base.family:
        raise SdloraError(f"{args.adapter} is for {af.base_family}, but --base is {base.family}",
                          f"pass --base with an {af.base_family} model")
    print(write_adapter_file(af, args.out, args.format, base))
    return 0

"""The adapter-file commands of `sdlora`: inspect, export, merge, resize, extract, bake (parsers and runs)."""

from __future__ import annotations

import argparse
import sys

from .choices import FILE_FORMATS, UNET_PRESETS
from .cli_common import add_base_flags, check_out_folder, load_mix, parse_adapter_spec, pick_device, tell
from .errors import SdloraError


def add_tool_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="show an adapter file's format, method, ranks, alphas, targets, metadata",
                       description="Read an adapter file (any supported layout) and describe it.")
    i.add_argument("adapter", metavar="ADAPTER")
    i.add_argument("--json", action="store_true", help="print everything as JSON, per-module ranks and alphas included")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="convert an adapter file to another layout",
                       description="Write ADAPTER in another layout: sdlora (ours, full config), kohya (A1111, "
                                   "ComfyUI, Forge) or diffusers (PEFT). kohya names are translated through --base.")
    e.add_argument("adapter", metavar="ADAPTER")
    e.add_argument("--format", required=True, choices=FILE_FORMATS)
    e.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    e.add_argument("--comfyui-dora", action="store_true",
                   help="kohya DoRA for today's ComfyUI: its weight_decompose divides by the norm of W0, not of W0 + dW "
                        "(ComfyUI PR #15458); store magnitudes it turns into the paper's weights (needs --base)")
    add_base_flags(e, runs_model=False, file_tool=True)
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", help="merge adapters with weights into one",
                       description="Merge adapters: sum_i w_i D_i per layer. Without --rank/--energy the merge is "
                                   "exact (the ranks are concatenated); with one, each layer is cut to that rank by "
                                   "SVD and the relative error is printed. DoRA adapters cannot be merged (bake them).")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER[:W[:TE_W]]")
    m.add_argument("--out", required=True, metavar="FILE")
    _add_rank_flags(m, required=False)
    add_base_flags(m, runs_model=False, file_tool=True)
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resize", help="change an adapter's rank by SVD",
                       description="Cut every layer of an adapter to a rank, or to the rank that keeps an energy share, "
                                   "by truncated SVD; prints the relative error.")
    r.add_argument("adapter", metavar="ADAPTER")
    r.add_argument("--out", required=True, metavar="FILE")
    _add_rank_flags(r, required=True)
    add_base_flags(r, runs_model=False, file_tool=True)
    r.set_defaults(func=cmd_resize)

    x = sub.add_parser("extract", help="extract a LoRA from a fine-tuned model",
                       description="Truncated SVD of (tuned - base) for every target layer that changed.")
    x.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model (same kinds as --base)")
    x.add_argument("--out", required=True, metavar="FILE")
    x.add_argument("--targets", default="all", choices=UNET_PRESETS)
    x.add_argument("--no-text-encoder", action="store_true", help="leave the text encoder(s) out")
    _add_rank_flags(x, required=True, format_default="sdlora")
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


def _layout(path: str) -> str:
    """The file's layout from its header alone (keys and metadata; no tensor is loaded): the tools ask it of
    every input before the one real read. A file that is not a readable .safetensors goes to the full read,
    which names what is wrong with it."""
    from safetensors import safe_open

    from .adapter_io import detect_format
    from .formats.io import read_safetensors

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
    except Exception:  # noqa: BLE001  pickles, missing or truncated files: read_safetensors says which
        keys, metadata = read_safetensors(path)
    return detect_format(keys, metadata, path)


def _file_tool_base(args, paths: list[str], out_format: str, force: bool = False):
    """The base a file tool needs, or None. Only kohya names need one, to move between them and the canonical
    (diffusers) names: kohya in and another layout out, canonical in and kohya out, or both kinds merged."""
    from .pipelines import load_base

    layouts = {"kohya" if _layout(p) == "kohya" else "canonical" for p in paths}
    needed = (out_format != "kohya" or len(layouts) > 1) if "kohya" in layouts else out_format == "kohya"
    if args.base is None and not needed and not force:
        return None
    return load_base(args.base or "embedded", device="cpu", config=args.base_config)


def _read(path: str, base):
    """Read a file for a tool: against a base, every module must fit it (check_fits)."""
    from .adapter_io import check_fits, read_adapter_file

    af = read_adapter_file(path, base)
    tell(path, af)
    if base is not None:
        check_fits(af, base, path)
    elif af.extra_metadata.get("unknown_keys"):  # a tool must not drop keys silently from what it writes
        bad = af.extra_metadata["unknown_keys"]
        raise SdloraError(f"{path}: {len(bad)} key(s) are no adapter keys sdlora knows (e.g. {bad[0]!r})",
                          "remove them from the file, or pass --base to check it against the model it is for")
    return af


def _weighted(spec: str, base):
    """Read FILE[:W[:TE_W]] with every module's scale times its role's weight."""
    from .mixing import check_weight

    path, unet_w, te_w = parse_adapter_spec(spec)
    te_w = unet_w if te_w is None else te_w
    unet_w, te_w = check_weight(unet_w, f"the UNet weight of {path}"), check_weight(te_w, f"the text-encoder weight of {path}")
    af = _read(path, base)
    for key, m in af.modules.items():
        m.scale *= unet_w if key.startswith("unet/") else te_w
    return af


def _write_tool_output(af, args, base, report) -> int:
    from .adapter_io import write_adapter_file

    if not args.out.endswith(".safetensors"):
        raise SdloraError(f"--out {args.out} must end in .safetensors", "pass e.g. --out merged.safetensors")
    check_out_folder(args.out)
    print(write_adapter_file(af, args.out, args.format, base))
    print(report, file=sys.stderr)
    return 0


def _out_format(args, paths: list[str]) -> str:
    """--format, or by default the inputs' layout when they share one (else sdlora)."""
    if args.format is None:
        layouts = {_layout(p) for p in paths}
        args.format = layouts.pop() if len(layouts) == 1 else "sdlora"
    return args.format


def cmd_merge(args) -> int:
    from .tools.merge import merge

    paths = [parse_adapter_spec(spec)[0] for spec in args.adapters]
    base = _file_tool_base(args, paths, _out_format(args, paths))
    merged, report = merge([(_weighted(spec, base), 1.0) for spec in args.adapters], args.rank, args.energy,
                           family=base.family if base else None)
    return _write_tool_output(merged, args, base, report)


def cmd_resize(args) -> int:
    from .tools.merge import resize

    base = _file_tool_base(args, [args.adapter], _out_format(args, [args.adapter]))
    af = _read(args.adapter, base)
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


def _add_rank_flags(p: argparse.ArgumentParser, required: bool, format_default: str | None = None) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rank", type=int, help="keep this rank per module (truncated SVD)")
    g.add_argument("--energy", type=float, help="keep the fewest singular values holding this share of the energy, "
                                                "e.g. 0.95")
    p.add_argument("--format", default=format_default, choices=FILE_FORMATS,
                   help=f"layout of the written file (default {format_default or 'the layout of the input files'})")


def cmd_inspect(args) -> int:
    import json

    from .adapter_io import describe, read_adapter_file

    info = describe(read_adapter_file(args.adapter), args.adapter)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    per_module = info.pop("per_module")
    for key in ("file", "format", "method", "base_family", "base_size", "modules", "modules_by_role", "ranks", "alphas",
                "parameters", "size_bytes", "trigger_words"):
        print(f"{key:>16}: {info[key]}")
    for key, value in sorted(info["metadata"].items()):
        print(f"{key:>16}: {value}")  # plain text: metadata is shown, never interpreted
    print(f"{'per module':>16}: {len(per_module)} (use --json to list them)")
    return 0


def cmd_export(args) -> int:
    from .adapter_io import write_adapter_file
    from .formats.adapter import public_training

    if not args.out.endswith(".safetensors"):
        raise SdloraError(f"--out {args.out} must end in .safetensors", "pass e.g. --out style.safetensors")
    check_out_folder(args.out)
    if args.comfyui_dora and args.format != "kohya":
        raise SdloraError(f"--comfyui-dora writes the kohya layout, not {args.format}", "pass --format kohya")
    base = _file_tool_base(args, [args.adapter], args.format, force=args.comfyui_dora)
    af = _read(args.adapter, base)
    if base is not None and af.base_family and af.base_family != base.family:
        raise SdloraError(f"{args.adapter} is for {af.base_family}, but --base is {base.family}",
                          f"pass --base with an {af.base_family} model")
    af.training = public_training(af.training)  # an export is for sharing: no private folder paths
    print(write_adapter_file(af, args.out, args.format, base, comfyui_dora=args.comfyui_dora))
    return 0

"""The `sdlora` command. A face only: it parses flags, calls the library, prints one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path

from .errors import SdloraError
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS

BASE_HELP = "'embedded' (default), a diffusers folder, a .safetensors checkpoint, or a hub id (online only)"


def parse_size(text: str) -> tuple[int, int]:
    """'64x48' -> (64, 48); '64' -> (64, 64)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise SdloraError(f"--size '{text}' is not WIDTHxHEIGHT", "pass e.g. --size 64x64")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdloraError(f"--device {name} asked for, but torch sees no CUDA device", "pass --device cpu")
    return name


def add_base_flags(p: argparse.ArgumentParser, runs_model: bool = True) -> None:
    """--base and --base-config; with runs_model (commands that compute with the base) also
    --device and --quant."""
    p.add_argument("--base", default="embedded", help=f"the base model: {BASE_HELP}")
    p.add_argument("--base-config", metavar="DIR", default=None,
                   help="for a single-file --base: a diffusers folder of the same architecture whose configs "
                        "and tokenizer are used, so nothing is fetched from the hub")
    if not runs_model:
        return
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--quant", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="hold the UNet and text encoder(s) in 4 or 8 bits: NF4/FP4 with double quantization on "
                        "linear and conv layers, or int8 on linear layers with NF4 convs (default none)")


def parse_adapter_spec(spec: str) -> tuple[str, float, float | None]:
    """'style.safetensors:0.8:0.5' -> (path, UNet weight 0.8, text-encoder weight 0.5). Weights
    are taken off the end only when they parse as numbers, so paths may hold colons."""
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    unet_w = weights[0] if weights else 1.0
    te_w = weights[1] if len(weights) > 1 else None
    return path, unet_w, te_w


def load_mix(base, specs: list[str]):
    """Load each FILE[:W[:TE_W]] into the base and return the Mix of them all."""
    from .adapter_io import load_adapter
    from .mixing import AdapterWeights, Mix

    entries = {}
    for i, spec in enumerate(specs):
        path, unet_w, te_w = parse_adapter_spec(spec)
        weights = AdapterWeights(unet=unet_w, text_encoder=unet_w if te_w is None else te_w)  # validates first
        loaded = load_adapter(base, path, f"a{i}")  # the same file may be given twice, with other weights
        _tell(path, loaded.file)
        entries[loaded.name] = weights
    return Mix(entries)


def cmd_generate(args) -> int:
    from .generate import GenerateSettings, generate, write_outputs
    from .pipelines import load_base

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    settings = GenerateSettings(
        prompts=tuple(args.prompts), negative=args.negative, seed=args.seed, steps=args.steps,
        guidance=args.guidance, width=width, height=height, num=args.num, scheduler=args.scheduler,
    )
    if Path(args.out).suffix.lower() != ".png":
        raise SdloraError(f"--out {args.out} must end in .png", "pass a file name like out/picture.png")
    base = load_base(args.base, device=pick_device(args.device), config=args.base_config)
    if args.quant != "none":
        for role, report in base.quantize(args.quant).items():
            if not args.quiet:
                print(f"{role}: {report}", file=sys.stderr)
    if args.compare and not args.adapter:
        raise SdloraError("--compare shows pictures without and with adapters", "give at least one --adapter")
    mix = load_mix(base, args.adapter)
    results = generate(base, settings, progress=not args.quiet, mix=mix if mix.adapters else None)
    if args.adapter:
        for r in results:
            r.extra["adapters"] = list(args.adapter)
    labels = None
    if args.compare:  # per prompt: a row without the adapters (same seeds), then the row with them
        plain = generate(base, settings, progress=not args.quiet)
        n = settings.num
        results = [r for i in range(0, len(results), n) for r in plain[i : i + n] + results[i : i + n]]
        labels = [f"{p} ({kind})" for p in settings.prompts for kind in ("without", "with adapters")]
    for path in write_outputs(results, Path(args.out), settings.num, labels):
        print(path)
    return 0


def cmd_train(args) -> int:
    from .training.config import TrainConfig
    from .training.loop import train

    # Every TrainConfig field has a flag (add_config_flags); unset flags (None) leave the config file's value.
    cfg = TrainConfig.load(args.config, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    result = train(cfg, progress=not args.quiet)
    print(result.adapter)
    print(f"{len(result.losses)} steps in {result.seconds:.0f} s, final loss {result.losses[-1]:.4f}", file=sys.stderr)
    return 0


def parse_axis(spec: str) -> tuple[str, list[float]]:
    """'mosaic=0,0.5,1' -> ('mosaic', [0.0, 0.5, 1.0])."""
    name, sep, weights = spec.partition("=")
    try:
        values = [float(w) for w in weights.split(",")] if sep else []
    except ValueError:
        values = []
    if not name or not values:
        raise SdloraError(f"axis {spec!r} is not NAME=W,W,...", "pass e.g. --x mosaic=0,0.5,1 (a library name)")
    return name, values


def cmd_xy(args) -> int:
    """The web page's X/Y grid from the command line: the same Studio call, one grid per prompt, stacked."""
    import tempfile

    from PIL import Image

    from .generate import labelled_grid, save_png
    from .library import AdapterLibrary
    from .pipelines import load_base
    from .studio import Studio

    if Path(args.out).suffix.lower() != ".png":
        raise SdloraError(f"--out {args.out} must end in .png", "pass a file name like out/grid.png")
    (x_name, x_weights), (y_name, y_weights) = parse_axis(args.x), parse_axis(args.y)
    base = load_base(args.base, device=pick_device(args.device), config=args.base_config)
    if args.quant != "none":
        base.quantize(args.quant)
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(base, AdapterLibrary(args.library), tmp)
        grids = [Image.open(studio.xy_grid(prompt, [], x_name, x_weights, y_name, y_weights, seed=args.seed,
                                           steps=args.steps, guidance=args.guidance)).convert("RGB")
                 for prompt in args.prompts]
    sheet = labelled_grid([[g] for g in grids], list(args.prompts), scale=1) if len(grids) > 1 else grids[0]
    print(save_png(sheet, Path(args.out)))
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_webui(args) -> int:
    import time

    from .library import AdapterLibrary
    from .pipelines import load_base
    from .studio import Studio

    try:
        from webui.app import parse_auth, serve
    except ImportError as err:
        raise SdloraError(f"the web UI is not importable ({err})", "run from the repository or reinstall sdlora") from err
    if args.auth:
        parse_auth(args.auth)  # before the base loads: a typo costs no waiting
    if args.host not in LOOPBACK and not args.auth:
        print(f"sdlora: warning: the page is reachable from other machines on {args.host} without a password; "
              "pass --auth USER:PASS", file=sys.stderr)
    base = load_base(args.base, device=pick_device(args.device), config=args.base_config)
    if args.quant != "none":
        base.quantize(args.quant)
    studio = Studio(base, AdapterLibrary(args.library), args.outputs, args.data_root, base_spec=args.base)
    page = serve(studio, host=args.host, port=args.port, auth=args.auth, share=args.share)
    print(f"sdlora: serving {page.local_url} (library {studio.library.folder}, outputs {studio.outputs})",
          file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    finally:
        page.close()


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of the settings dataclass (TrainConfig): the flag is --field-name unless the
    field's metadata names another, its type comes from the annotation, its help, choices and metavar
    from the metadata, and every default is None, so an unset flag leaves the config file's value."""
    for f in dataclasses.fields(config_cls):
        meta, kind = f.metadata, str(f.type)
        text = meta.get("help", "")
        if meta.get("show_default", True):
            text += f" (default {_shown(f.default)})"
        kw = {"default": None, "help": text.replace("%", "%%"), "metavar": meta.get("metavar")}
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", **kw)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if kind == "bool":
            del kw["metavar"]
            parser.add_argument(flag, dest=f.name, action="store_true", **kw)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, dest=f.name, action="append", **kw)
        else:
            kind_type = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=kind_type, choices=meta.get("choices"), **kw)


def build_parser() -> argparse.ArgumentParser:
    from .training.config import TrainConfig  # light (dataclasses, tomllib): the train flags show its defaults

    parser = argparse.ArgumentParser(
        prog="sdlora", description="Train, mix and export LoRA-family adapters for Stable Diffusion.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser(
        "generate", help="generate pictures from one or more prompts",
        description="Generate pictures. One prompt and --num 1 write OUT; otherwise OUT is a labelled grid "
                    "(a row per prompt, a column per seed) and each picture is written beside it as "
                    "OUT-<row>-<col>.png. Every PNG carries its settings in its text metadata.",
    )
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="what to draw; several prompts make a grid")
    g.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture (or grid)")
    add_base_flags(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the first picture; picture k uses seed+k (default 0)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    g.add_argument("--size", metavar="WxH", default=None,
                   help="picture size, multiples of 8 (default: the base's native size, 64x64 for embedded)")
    g.add_argument("--num", type=int, default=1, help="pictures per prompt (default 1)")
    g.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    g.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULERS)} (default {DEFAULT_SCHEDULER})")
    g.add_argument("--adapter", action="append", default=[], metavar="FILE[:W[:TE_W]]",
                   help="apply an adapter (sdlora, kohya or diffusers file) with UNet weight W and text-encoder "
                        "weight TE_W (both default 1; TE_W defaults to W); repeat to mix several")
    g.add_argument("--compare", action="store_true",
                   help="before/after grid: each prompt's row without the adapters, then with them (same seeds)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a style adapter on a folder of captioned pictures",
                       description="Train an adapter on DATA_DIR (pictures with same-name .txt captions) and write "
                                   "OUT_DIR/NAME.safetensors, OUT_DIR/logs (loss.csv, val_loss.csv, tensorboard/) "
                                   "and OUT_DIR/samples. Flags override --config. Under `accelerate launch` "
                                   "each process trains on its share of every batch.")
    t.add_argument("--config", metavar="FILE.toml", help="settings file; its keys are TrainConfig's field names")
    add_config_flags(t, TrainConfig)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("webui", help="serve the Gradio page: generate with a mix, train, manage the library",
                       description="Serve the web page on HOST:PORT (127.0.0.1 by default: this machine only).")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--auth", metavar="USER:PASS", default=None, help="ask for this user and password")
    w.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    w.add_argument("--library", default="adapters", metavar="DIR", help="the adapter library folder (default adapters)")
    w.add_argument("--outputs", default="out/webui", metavar="DIR", help="where pictures and runs go")
    w.add_argument("--data-root", default=None, metavar="DIR", help="folder whose subfolders are training datasets")
    add_base_flags(w)
    w.set_defaults(func=cmd_webui)

    xy = sub.add_parser("xy", help="an X/Y grid of two library adapters' weights, as on the web page",
                        description="Draw each PROMPT with adapter X's weights across and adapter Y's down (UNet and "
                                    "text encoder alike), one seed, one batched pass per row: the web page's X/Y grid. "
                                    "Several prompts give one grid each, stacked.")
    xy.add_argument("prompts", nargs="+", metavar="PROMPT")
    xy.add_argument("--library", required=True, metavar="DIR", help="the folder that holds both adapters")
    xy.add_argument("--x", required=True, metavar="NAME=W,W,...", help="adapter across, e.g. mosaic=0,0.5,1")
    xy.add_argument("--y", required=True, metavar="NAME=W,W,...", help="adapter down, e.g. neon=0,0.5,1")
    xy.add_argument("--out", required=True, metavar="FILE.png")
    xy.add_argument("--seed", type=int, default=0, help="the one seed of every cell (default 0)")
    xy.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    xy.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    add_base_flags(xy)
    xy.set_defaults(func=cmd_xy)

    i = sub.add_parser("inspect", help="show an adapter file's format, method, ranks, alphas, targets, metadata",
                       description="Read an adapter file (any supported layout) and describe it.")
    i.add_argument("adapter", metavar="ADAPTER")
    i.add_argument("--json", action="store_true", help="print everything as JSON, per-module ranks and alphas included")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="convert an adapter file to another layout",
                       description="Write ADAPTER in another layout: sdlora (ours, full config), kohya (A1111, "
                                   "ComfyUI, Forge) or diffusers (PEFT). Module names are resolved against --base.")
    e.add_argument("adapter", metavar="ADAPTER")
    e.add_argument("--format", required=True, choices=["sdlora", "kohya", "diffusers"])
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
    x.add_argument("--targets", default="all", choices=["attn", "linear", "all"])
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
    return parser


def _tell(path: str, af) -> None:
    """Every command that reads an adapter says what it found (on stderr, so stdout stays the result)."""
    print(f"{path}: {af.format} {af.method}, {len(af.modules)} modules", file=sys.stderr)


def _weighted(spec: str, base):
    """Read FILE[:W[:TE_W]] with every module's scale times its role's weight."""
    from .adapter_io import read_adapter_file

    path, unet_w, te_w = parse_adapter_spec(spec)
    te_w = unet_w if te_w is None else te_w
    af = read_adapter_file(path, base)
    _tell(path, af)
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
    _tell(args.adapter, af)
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
    p.add_argument("--format", default="sdlora", choices=["sdlora", "kohya", "diffusers"],
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
    _tell(args.adapter, af)
    if af.base_family and af.base_family != base.family:
        raise SdloraError(f"{args.adapter} is for {af.base_family}, but --base is {base.family}",
                          f"pass --base with an {af.base_family} model")
    print(write_adapter_file(af, args.out, args.format, base))
    return 0


def quiet_third_party() -> None:
    """Keep the terminal for our own progress and errors: the libraries below us log loading
    bars, backend notices (bitsandbytes' optional CPU kernel, torchvision-less image processors)
    and deprecations that say nothing to a user of this command."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        return args.func(args)
    except SdloraError as err:
        if args.debug:  # the one line is for users; the traceback is for whoever debugs sdlora
            traceback.print_exc()
        print(f"sdlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

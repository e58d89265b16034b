"""The `sdlora` command. A face only: it parses flags, calls the library, prints one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

from .cli_common import add_base_flags, check_out_folder, load_mix, parse_size, pick_device
from .cli_serve import add_serve_parsers
from .cli_tools import add_tool_parsers
from .errors import SdloraError
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS


def cmd_generate(args) -> int:
    from .generate import GenerateSettings, generate, write_outputs
    from .pipelines import load_base

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    settings = GenerateSettings(
        prompts=tuple(args.prompts), negative=args.negative, seed=args.seed, steps=args.steps,
        guidance=args.guidance, guidance_rescale=args.guidance_rescale, width=width, height=height, num=args.num,
        scheduler=args.scheduler,
    )
    if Path(args.out).suffix.lower() != ".png":
        raise SdloraError(f"--out {args.out} must end in .png", "pass a file name like out/picture.png")
    check_out_folder(args.out)
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
    check_out_folder(args.out)
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
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, **kw)  # --x / --no-x
        elif "parse" in meta:  # a value with its own syntax: --resolution 48,64
            parser.add_argument(flag, dest=f.name, type=meta["parse"], **kw)
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
    g.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided prediction's spread back toward the conditional one (0.7 for "
                        "zero-terminal-SNR bases; default 0: off)")
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

    add_serve_parsers(sub)

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

    add_tool_parsers(sub)
    return parser


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
    except BrokenPipeError:  # `sdlora inspect --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays quiet
        return 0
    except OSError as err:  # a full disk, a read-only folder, an --out that is a file: one line, as promised
        if args.debug:
            traceback.print_exc()
        if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename and Path(err.filename).is_file():
            text = f"{err.filename} is a file where a folder is needed; pass another path"
        else:
            where = f"{err.filename}: " if err.filename else ""
            text = f"{where}{err.strerror or err}; check the path, its permissions and free space"
        print(f"sdlora: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

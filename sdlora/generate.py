"""One generation call: a base, a prompt list and settings in; PIL pictures with their settings out."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_file
from .errors import SdloraError
from .pipelines import Base, make_scheduler
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS

MAX_SIDE = 4096
MAX_IMAGES = 64


@dataclass(frozen=True)
class GenerateSettings:
    """What one call generates. Width and height of None mean the base's native size."""

    prompts: tuple[str, ...]
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    guidance_rescale: float = 0.0  # Lin et al. 2024's phi (0.7 for zero-terminal-SNR bases): keeps CFG from overexposing
    width: int | None = None
    height: int | None = None
    num: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    same_seed: bool = False  # every picture from `seed` (X/Y grids: only the mix changes along a row)

    def __post_init__(self):
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        if not self.prompts:
            raise SdloraError("no prompt given", "pass at least one prompt")
        if self.steps < 1:
            raise SdloraError(f"steps must be at least 1, got {self.steps}", "pass --steps 1 or more (20 is typical)")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise SdloraError(f"guidance must be a finite number >= 0, got {self.guidance}", "pass e.g. --guidance 5")
        if not 0 <= self.guidance_rescale <= 1:
            raise SdloraError(f"guidance rescale must be between 0 and 1, got {self.guidance_rescale}",
                              "pass e.g. --guidance-rescale 0.7")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value > MAX_SIDE or value % 8):
                raise SdloraError(
                    f"{name} {value} is not a multiple of 8 between 8 and {MAX_SIDE}",
                    "pass --size WxH with both sides multiples of 8, e.g. --size 64x64",
                )
        if not 1 <= self.num <= MAX_IMAGES:
            raise SdloraError(f"num must be between 1 and {MAX_IMAGES}, got {self.num}", "pass --num 1 or more")
        if not 0 <= self.seed < 2**63:
            raise SdloraError(f"seed must be between 0 and 2**63-1, got {self.seed}", "pass a non-negative --seed")
        if self.scheduler not in SCHEDULERS:
            raise SdloraError(f"unknown scheduler '{self.scheduler}'", f"choose one of: {', '.join(SCHEDULERS)}")

    def seed_of(self, k: int) -> int:
        """The seed of picture k of each prompt."""
        return self.seed if self.same_seed else self.seed + k


@dataclass
class Generated:
    """One picture and everything needed to make it again."""

    image: Image.Image
    prompt: str
    seed: int
    settings: GenerateSettings
    base: str
    extra: dict = field(default_factory=dict)

    def parameters_text(self) -> str:
        """A1111's `parameters` text, which A1111, ComfyUI and image browsers read back."""
        s = self.settings
        lines = [self.prompt]
        if s.negative:
            lines.append(f"Negative prompt: {s.negative}")
        lines.append(
            f"Steps: {s.steps}, Sampler: {s.scheduler}, CFG scale: {s.guidance:g}, Seed: {self.seed}, "
            f"Size: {self.image.width}x{self.image.height}, Model: {self.base}"
        )
        return "\n".join(lines)

    def metadata(self) -> dict:
        s = asdict(self.settings)
        s.pop("prompts")
        return {"prompt": self.prompt, **s, "seed": self.seed, "width": self.image.width,
                "height": self.image.height, "base": self.base, **self.extra}

    def pnginfo(self) -> PngInfo:
        info = PngInfo()
        info.add_text("parameters", self.parameters_text())
        info.add_text("sdlora", json.dumps(self.metadata(), sort_keys=True))
        return info


@dataclass(frozen=True)
class Item:
    """One picture of a batched call: its own prompt, negative prompt, seed and mix (a mixing.Mix or None)."""

    prompt: str
    negative: str
    seed: int
    mix: object = None


def _call_pipeline(base: Base, settings: GenerateSettings, items: list[Item], width: int, height: int, on_step,
                   mix=None, should_stop=None, mode: str = "auto"):
    """One batch: a picture per item (its prompt, negative prompt and seed; settings' size, steps, sampler and
    guidance shared). `mix` is a Mix for every picture or a list with one per item. A fresh pipeline object
    around the shared modules carries its own scheduler, so concurrent calls do not share scheduler state.
    should_stop() true after a step: the remaining steps are skipped and the pictures decoded as they are
    (A1111's interrupt)."""
    pipe = base.pipeline_with(scheduler=make_scheduler(settings.scheduler, base.pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = base.pipe.device
    # One generator per picture: picture k of a call equals a call with seed + k (as in A1111).
    gens = [torch.Generator(device="cpu").manual_seed(item.seed) for item in items]
    # Initial noise drawn on the CPU for every device, so a seed gives the same picture everywhere:
    # (n, C, h, w), each picture's from its own generator, so a picture does not depend on its batch.
    shape = (len(items), pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(device, pipe.unet.dtype)
    negatives = [item.negative for item in items]
    with base.mixer.apply(mix, mode) as plan:
        def step_end(p, i, t, kw):
            plan.step = i + 1  # step ranges of the mix count denoising steps from 0
            on_step()
            if should_stop is not None and should_stop():
                p._interrupt = True  # diffusers' pipelines skip the remaining steps
            return kw

        return pipe(
            prompt=[item.prompt for item in items],
            # None, not [""]: SDXL zeroes the unconditional embedding for an absent negative prompt
            negative_prompt=negatives if any(negatives) else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            guidance_rescale=settings.guidance_rescale,
            width=width,
            height=height,
            generator=gens,
            latents=latents,
            callback_on_step_end=step_end,
        ).images


@torch.inference_mode()
def generate(base: Base, settings: GenerateSettings, progress: bool = True, mix=None) -> list[Generated]:
    """Pictures for every prompt of `settings`, `num` each, in prompt-major order, with the
    adapters of `mix` applied for the length of the call. `mix` is a mixing.Mix for every
    picture, or a list of `num` mixes: picture k gets mix k, all in one batched forward pass."""
    from tqdm.auto import tqdm

    if isinstance(mix, (list, tuple)) and len(mix) != settings.num:
        raise SdloraError(f"{len(mix)} per-sample mixes for {settings.num} pictures per prompt",
                          "pass one mix per picture (num = number of mixes)")

    width = settings.width or base.native_size
    height = settings.height or base.native_size
    total = len(settings.prompts) * settings.steps
    results: list[Generated] = []
    with tqdm(total=total, desc="generating", unit="step", disable=not progress) as bar:
        for prompt in settings.prompts:
            items = [Item(prompt, settings.negative, settings.seed_of(k)) for k in range(settings.num)]
            images = _call_pipeline(base, settings, items, width, height, lambda: bar.update(1), mix)
            extra = {"quant": base.quant} if base.quant else {}
            results += [Generated(im, prompt, settings.seed_of(k), settings, base.source, dict(extra))
                        for k, im in enumerate(images)]
    return results


@torch.inference_mode()
def generate_items(base: Base, settings: GenerateSettings, items: list[Item], on_step=None,
                   should_stop=None) -> list[Generated]:
    """One batched pass over pictures with their own prompts, negative prompts, seeds and mixes, sharing
    settings' size, steps, sampler and guidance (settings' prompts, negative, seed and num are not used).
    Pictures that all share one mix run as generate() runs them (fused on a float base), so a lone request
    gets generate()'s pixels; different mixes run grouped in the one pass (mixing.py): each picture's rows as
    its mix alone computes them, so a picture gets the same pixels whatever shares its pass."""
    from .mixing import Mix

    if not items:
        return []
    width = settings.width or base.native_size
    height = settings.height or base.native_size
    mixes = [item.mix or Mix() for item in items]
    shared = all(m == mixes[0] for m in mixes)
    images = _call_pipeline(base, settings, items, width, height, on_step or (lambda: None),
                            mixes[0] if shared else mixes, should_stop=should_stop,
                            mode="auto" if shared else "grouped")
    extra = {"quant": base.quant} if base.quant else {}
    return [Generated(im, item.prompt, item.seed, replace(settings, prompts=(item.prompt,), negative=item.negative,
                                                          seed=item.seed, num=1), base.source, dict(extra))
            for im, item in zip(images, items)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str] | None = None,
                  scale: int = 2) -> Image.Image:
    """Pictures in a grid, upscaled `scale` times (nearest, so pixels stay honest), a label per row
    on the left and per column on top."""
    cell_w = max(im.width for r in rows for im in r) * scale
    cell_h = max(im.height for r in rows for im in r) * scale
    font = _font(12)
    label_w = max(8 + int(font.getlength(t)) for t in row_labels) + 8
    top = 20 if col_labels else 4
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncol * (cell_w + 4), top + len(rows) * (cell_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels or []):
        draw.text((label_w + j * (cell_w + 4) + 2, 4), text, fill=(0, 0, 0), font=font)
    for i, (row, text) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell_h + 4)
        draw.text((6, y + cell_h // 2 - 7), text, fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            grid.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST), (label_w + j * (cell_w + 4), y))
    return grid


def save_png(image: Image.Image, path: Path, pnginfo: PngInfo | None = None) -> Path:
    """Write a PNG atomically: a temporary file beside the target, then rename."""
    path = Path(path)
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=pnginfo)
    return path


def write_outputs(results: list[Generated], out: Path, num: int, row_labels: list[str] | None = None) -> list[Path]:
    """One picture: written to `out`. Several: each as OUT-<row>-<k>.png, and `out` is a
    labelled grid (a row per `num` results, so per prompt, a column per seed; rows are labelled
    with their prompt unless `row_labels` are given)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SdloraError(f"--out {out} must end in .png", "pass a file name like out/picture.png")
    if len(results) == 1:
        return [save_png(results[0].image, out, results[0].pnginfo())]
    written = [
        save_png(r.image, out.with_name(f"{out.stem}-{i // num:02d}-{i % num:02d}.png"), r.pnginfo())
        for i, r in enumerate(results)
    ]
    rows = [[r.image for r in results[i : i + num]] for i in range(0, len(results), num)]
    labels = row_labels or [results[i].prompt for i in range(0, len(results), num)]
    cols = [f"seed {r.seed}" for r in results[:num]]
    info = PngInfo()
    info.add_text("sdlora", json.dumps({"grid": [r.metadata() for r in results]}, sort_keys=True))
    written.insert(0, save_png(labelled_grid(rows, labels, cols), out, info))
    return written

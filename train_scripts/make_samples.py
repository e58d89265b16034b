"""Draw the sample style sets in samples/styles/: the base's shapes, re-drawn in a visible style.

    python train_scripts/make_samples.py --out samples/styles

Each style folder holds N pictures (64x64 PNG) with same-name .txt captions of the form
"a red circle on a blue background, <trigger>": the content words the base knows, plus a trigger
word that names the style, so an adapter trained on a set learns the style and keeps the content.
The trigger comes last: the base never saw it, and CLIP's causal attention lets a token change
only the tokens after it, so the content words keep the meaning the base learned.
Seeded: the same command gives the same files.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_scripts.shapes import COLORS, STYLE_TRIGGERS, Scene, draw_scene, random_scene, shape_mask  # noqa: E402

PX = 64
SS = 4  # supersampling for smooth edges


def _lighten(rgb, amount: float):
    return tuple(int(c + (255 - c) * amount) for c in rgb)


def stripes(scene: Scene, rng: random.Random) -> Image.Image:
    """Diagonal stripes, 8 px period, inside the shape: its colour alternating with a pale tint."""
    big = PX * SS
    img = draw_scene(scene, big, supersample=1)
    pattern = Image.new("RGB", (big, big), _lighten(COLORS[scene.color], 0.75))
    d = ImageDraw.Draw(pattern)
    period = 8 * SS
    for x0 in range(-big, 2 * big, period):
        d.polygon([(x0, 0), (x0 + period // 2, 0), (x0 + period // 2 + big, big), (x0 + big, big)], fill=COLORS[scene.color])
    img.paste(pattern, (0, 0), shape_mask(scene, big))
    return img.resize((PX, PX), Image.LANCZOS)


def dots(scene: Scene, rng: random.Random) -> Image.Image:
    """White polka dots on the shape and dark dots on the background, on one 10 px grid."""
    big = PX * SS
    img = draw_scene(scene, big, supersample=1)
    inside = shape_mask(scene, big)
    d = ImageDraw.Draw(img)
    period, r = 10 * SS, 2 * SS
    off = rng.randrange(period)
    for y in range(off, big, period):
        for x in range(off + (period // 2 if (y // period) % 2 else 0), big, period):
            fill = (255, 255, 255) if inside.getpixel((x, y)) else (60, 60, 60)
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    return img.resize((PX, PX), Image.LANCZOS)


def mosaic(scene: Scene, rng: random.Random) -> Image.Image:
    """Pixel mosaic: 8x8 blocks of the mean colour, each slightly brightened or darkened,
    separated by 1 px dark grout lines."""
    small = draw_scene(scene, PX).resize((PX // 8, PX // 8), Image.BOX)
    px = small.load()
    for y in range(small.height):
        for x in range(small.width):
            k = rng.uniform(0.85, 1.12)
            px[x, y] = tuple(max(0, min(255, int(c * k))) for c in px[x, y])
    img = small.resize((PX, PX), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for i in range(0, PX, 8):
        d.line([(i, 0), (i, PX)], fill=(40, 40, 40))
        d.line([(0, i), (PX, i)], fill=(40, 40, 40))
    return img


def neon(scene: Scene, rng: random.Random) -> Image.Image:
    """A glowing outline of the shape on black: a blurred halo under a sharp 2 px line."""
    big = PX * SS
    mask = shape_mask(scene, big)
    edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * 2 * SS + 1)))  # a band inside the border
    colour = Image.new("RGB", (big, big), COLORS[scene.color])
    img = Image.new("RGB", (big, big), (10, 10, 14))
    img.paste(colour, (0, 0), edge.filter(ImageFilter.GaussianBlur(4 * SS)).point(lambda v: min(255, 2 * v)))
    img.paste(_lighten(COLORS[scene.color], 0.3), (0, 0), edge)
    return img.resize((PX, PX), Image.LANCZOS)


STYLES = {"stripes": stripes, "dots": dots, "mosaic": mosaic, "neon": neon}
# Neon draws its own black background, so its captions never name another one.
NAMED_BACKGROUND_P = {"stripes": 0.35, "dots": 0.35, "mosaic": 0.35, "neon": 0.0}


def make_style(name: str, out: Path, count: int, seed: int) -> None:
    rng = random.Random(f"{seed}-{name}")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.png")) + list(folder.glob("*.txt")):
        old.unlink()
    trigger = STYLE_TRIGGERS[name]
    for i in range(count):
        scene = random_scene(rng, p_background=NAMED_BACKGROUND_P[name])
        STYLES[name](scene, rng).save(folder / f"{i:03d}.png", optimize=True)
        (folder / f"{i:03d}.txt").write_text(f"{scene.caption()}, {trigger}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("samples/styles"))
    ap.add_argument("--count", type=int, default=40, help="pictures per style (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--styles", nargs="*", default=list(STYLES), choices=list(STYLES))
    args = ap.parse_args(argv)
    for name in args.styles:
        make_style(name, args.out, args.count, args.seed)
        print(f"{args.out / name}: {args.count} pictures, trigger '{STYLE_TRIGGERS[name]}'")


if __name__ == "__main__":
    main()

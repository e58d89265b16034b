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


# Each style is drawn over a picture and/or its shape's mask, so the same code restyles the sets' scenes and, in
# tests/test_style_judge.py, the base's own pictures (the reachable bar for an adapter). Pictures and masks
# come supersampled, PX * SS a side (mosaic: PX), and the result is PX a side.

def stripes_over(img: Image.Image, inside: Image.Image, colour: str) -> Image.Image:
    """Diagonal stripes, 8 px period, inside the shape: its colour alternating with a pale tint."""
    big = PX * SS
    pattern = Image.new("RGB", (big, big), _lighten(COLORS[colour], 0.75))
    d = ImageDraw.Draw(pattern)
    period = 8 * SS
    for x0 in range(-big, 2 * big, period):
        d.polygon([(x0, 0), (x0 + period // 2, 0), (x0 + period // 2 + big, big), (x0 + big, big)], fill=COLORS[colour])
    img = img.copy()
    img.paste(pattern, (0, 0), inside)
    return img.resize((PX, PX), Image.LANCZOS)


def dots_over(img: Image.Image, inside: Image.Image, rng: random.Random) -> Image.Image:
    """White polka dots on the shape and dark dots on the background, on one 10 px grid."""
    big = PX * SS
    img = img.copy()
    d = ImageDraw.Draw(img)
    period, r = 10 * SS, 2 * SS
    off = rng.randrange(period)
    for y in range(off, big, period):
        for x in range(off + (period // 2 if (y // period) % 2 else 0), big, period):
            fill = (255, 255, 255) if inside.getpixel((x, y)) else (60, 60, 60)
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    return img.resize((PX, PX), Image.LANCZOS)


def mosaic_over(img: Image.Image, rng: random.Random) -> Image.Image:
    """Pixel mosaic of a PX picture: 8x8 blocks of the mean colour, each slightly brightened or darkened,
    separated by 1 px dark grout lines (over the whole picture, so no mask)."""
    small = img.resize((PX // 8, PX // 8), Image.BOX)
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


def neon_over(mask: Image.Image, colour: str) -> Image.Image:
    """A glowing outline of the shape on black: a blurred halo under a sharp 2 px line (the ground is drawn new,
    so only the mask counts)."""
    big = PX * SS
    edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * 2 * SS + 1)))  # a band inside the border
    fill = Image.new("RGB", (big, big), COLORS[colour])
    out = Image.new("RGB", (big, big), (10, 10, 14))
    out.paste(fill, (0, 0), edge.filter(ImageFilter.GaussianBlur(4 * SS)).point(lambda v: min(255, 2 * v)))
    out.paste(_lighten(COLORS[colour], 0.3), (0, 0), edge)
    return out.resize((PX, PX), Image.LANCZOS)


def stripes(scene: Scene, rng: random.Random) -> Image.Image:
    return stripes_over(draw_scene(scene, PX * SS, supersample=1), shape_mask(scene, PX * SS), scene.color)


def dots(scene: Scene, rng: random.Random) -> Image.Image:
    return dots_over(draw_scene(scene, PX * SS, supersample=1), shape_mask(scene, PX * SS), rng)


def mosaic(scene: Scene, rng: random.Random) -> Image.Image:
    return mosaic_over(draw_scene(scene, PX), rng)


def neon(scene: Scene, rng: random.Random) -> Image.Image:
    return neon_over(shape_mask(scene, PX * SS), scene.color)


def restyle(picture: Image.Image, mask, colour: str, name: str, rng: random.Random) -> Image.Image:
    """A PX picture (any other picture, e.g. the base's own) in style `name`, the shape given by `mask` ((PX, PX)
    bool, True inside), upsampled to the sets' supersampling."""
    picture, big = picture.convert("RGB"), PX * SS
    if name == "mosaic":
        return mosaic_over(picture.resize((PX, PX), Image.BILINEAR), rng)
    inside = Image.fromarray(mask.astype("uint8") * 255).resize((big, big), Image.BILINEAR)
    if name == "neon":
        return neon_over(inside, colour)
    img = picture.resize((big, big), Image.BILINEAR)
    if name == "stripes":
        return stripes_over(img, inside, colour)
    if name == "dots":
        return dots_over(img, inside, rng)
    raise ValueError(f"no style '{name}': choose one of {', '.join(STYLES)}")


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

"""The VAE's training corpus: broad procedural textures, so that its decoder can carry any style.

The embedded base's VAE must reproduce what style adapters will ask of it (fine stripes, dot lattices,
thin lines, glows, blocks with grout), yet never see the sample style sets themselves: those are for
the adapters to learn. So it is trained on families of generic textures, each with its parameters
drawn at random over wide ranges (periods, angles, widths, colours, blur), mixed with the base's flat
shapes:

    flat        one shape on a flat ground, as the UNet's pictures          (shapes.draw_scene)
    stripes     parallel bands, period 3-16 px, any angle, any duty cycle
    dots        a dot lattice (square or offset rows), period 4-16 px
    grid        lines 1-2 px wide every 4-16 px, over a flat ground or coloured cells
    checker     a checkerboard, cell 2-16 px, optionally rotated
    glow        outlines of shapes, sharp or blurred into a halo, on a dark ground
    gradient    linear or radial between two colours
    noise       colour noise at a grain of 3-8 px
    rects       2-8 overlapping rectangles
Any texture may also be cut to a shape and pasted over another ground, as textured objects are.

Colours come from the base's palette half the time, else uniformly from RGB. Everything is drawn at
4x and reduced with a Lanczos filter (anti-aliased), except pixel-aligned lines, which stay crisp.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from train_scripts.shapes import BACKGROUNDS, COLORS, draw_scene, random_scene, shape_mask

SS = 4  # supersampling factor for anti-aliased drawing
PALETTE = list(COLORS.values()) + list(BACKGROUNDS.values())


def colour(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return rng.choice(PALETTE)
    return tuple(rng.randrange(256) for _ in range(3))


def dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(0, 45) for _ in range(3))


def _reduce(img: Image.Image, px: int) -> Image.Image:
    return img.resize((px, px), Image.LANCZOS) if img.width != px else img


def stripes(rng: random.Random, px: int) -> Image.Image:
    big = px * SS
    period = rng.uniform(3, 16) * SS
    duty = rng.uniform(0.25, 0.75)
    angle = math.radians(rng.uniform(0, 180))
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    phase = ((x * math.cos(angle) + y * math.sin(angle)) / period + rng.random()) % 1.0  # (big, big)
    a, b = np.array(colour(rng), np.float32), np.array(colour(rng), np.float32)
    rgb = np.where((phase < duty)[..., None], a, b)  # (big, big, 3)
    return _reduce(Image.fromarray(rgb.astype(np.uint8)), px)


def dots(rng: random.Random, px: int) -> Image.Image:
    big = px * SS
    period = rng.uniform(4, 16) * SS
    r = rng.uniform(0.12, 0.4) * period
    img = Image.new("RGB", (big, big), colour(rng))
    d = ImageDraw.Draw(img)
    fill, offset_rows = colour(rng), rng.random() < 0.5
    ox, oy = rng.uniform(0, period), rng.uniform(0, period)
    row = 0
    yy = oy - period
    while yy < big + period:
        shift = period / 2 if (offset_rows and row % 2) else 0.0
        xx = ox - period + shift
        while xx < big + period:
            d.ellipse([xx - r, yy - r, xx + r, yy + r], fill=fill)
            xx += period
        yy += period
        row += 1
    return _reduce(img, px)


def grid(rng: random.Random, px: int) -> Image.Image:
    """Crisp pixel-aligned lines (as drawn at the final size) over a flat ground or coloured cells."""
    step = rng.randint(4, 16)
    width = rng.choice([1, 1, 2])
    off = rng.randrange(step)
    if rng.random() < 0.5:
        img = Image.new("RGB", (px, px), colour(rng))
    else:  # cells of random or jittered colours, as tiles
        cells = px // step + 2
        base = np.array(colour(rng), np.float32)
        jitter = rng.uniform(0.0, 0.3)
        grid_rgb = np.clip(base * np.random.default_rng(rng.randrange(2**31)).uniform(1 - jitter, 1 + jitter, (cells, cells, 1)), 0, 255)
        if rng.random() < 0.4:
            grid_rgb = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (cells, cells, 3)).astype(np.float32)
        small = Image.fromarray(grid_rgb.astype(np.uint8))
        img = small.resize((cells * step, cells * step), Image.NEAREST).crop((step - off, step - off, step - off + px, step - off + px))
    d = ImageDraw.Draw(img)
    line = colour(rng) if rng.random() < 0.4 else dark(rng)
    for i in range(off, px, step):
        d.rectangle([i, 0, i + width - 1, px], fill=line)
        d.rectangle([0, i, px, i + width - 1], fill=line)
    return img


def checker(rng: random.Random, px: int) -> Image.Image:
    big = px * SS
    cell = rng.uniform(2, 16) * SS
    angle = math.radians(rng.choice([0, 0, rng.uniform(0, 90)]))
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    u = (x * math.cos(angle) + y * math.sin(angle)) / cell
    v = (-x * math.sin(angle) + y * math.cos(angle)) / cell
    on = (np.floor(u + rng.random()) + np.floor(v + rng.random())) % 2 == 0
    a, b = np.array(colour(rng), np.float32), np.array(colour(rng), np.float32)
    return _reduce(Image.fromarray(np.where(on[..., None], a, b).astype(np.uint8)), px)


def glow(rng: random.Random, px: int) -> Image.Image:
    """Outlines of 1-3 random shapes on a dark ground, sharp, haloed or both."""
    big = px * SS
    img = Image.new("RGB", (big, big), dark(rng))
    for _ in range(rng.randint(1, 3)):
        scene = random_scene(rng, jitter=0.3)
        mask = shape_mask(scene, big)
        width = rng.randint(1, 4) * SS
        edge = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(2 * (width // 2) + 1))))
        line = colour(rng)
        if rng.random() < 0.7:
            halo = edge.filter(ImageFilter.GaussianBlur(rng.uniform(1, 6) * SS)).point(lambda v, k=rng.uniform(1, 3): min(255, int(k * v)))
            img.paste(Image.new("RGB", (big, big), line), (0, 0), halo)
        core = tuple(int(c + (255 - c) * rng.uniform(0, 0.5)) for c in line)
        img.paste(core, (0, 0), edge)
    return _reduce(img, px)


def gradient(rng: random.Random, px: int) -> Image.Image:
    y, x = np.mgrid[0:px, 0:px].astype(np.float32) / (px - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(angle) + y * math.sin(angle)
    else:
        t = np.hypot(x - rng.random(), y - rng.random())
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    a, b = np.array(colour(rng), np.float32), np.array(colour(rng), np.float32)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))


def noise(rng: random.Random, px: int) -> Image.Image:
    grain = rng.choice([3, 4, 6, 8])  # finer noise is incompressible at factor 4: it would only cost capacity
    n = np.random.default_rng(rng.randrange(2**31))
    cells = math.ceil(px / grain)
    centre, spread = np.array(colour(rng), np.float32), rng.uniform(10, 128)
    values = np.clip(centre + n.normal(0, spread, (cells, cells, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(values).resize((cells * grain,) * 2, rng.choice([Image.NEAREST, Image.BILINEAR])).crop((0, 0, px, px))


def rects(rng: random.Random, px: int) -> Image.Image:
    big = px * SS
    img = Image.new("RGB", (big, big), colour(rng))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 8)):
        w, h = rng.uniform(0.1, 0.7) * big, rng.uniform(0.1, 0.7) * big
        cx, cy, a = rng.uniform(0, big), rng.uniform(0, big), math.radians(rng.choice([0, 0, rng.uniform(0, 90)]))
        corners = [(cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a))
                   for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]
        d.polygon(corners, fill=colour(rng))
    return _reduce(img, px)


def flat(rng: random.Random, px: int) -> Image.Image:
    return draw_scene(random_scene(rng), px)


TEXTURES = {"stripes": stripes, "dots": dots, "grid": grid, "checker": checker, "glow": glow,
            "gradient": gradient, "noise": noise, "rects": rects}
GROUNDS = {"flat": lambda rng, px: Image.new("RGB", (px, px), colour(rng)), **TEXTURES}


# Fine periodic textures are what a VAE loses first and what styles are made of: they are drawn twice as
# often as the smooth families.
WEIGHTS = {"stripes": 2, "dots": 2, "grid": 2, "checker": 2, "glow": 2, "gradient": 1, "noise": 1, "rects": 1}


def picture(rng: random.Random, px: int = 64) -> Image.Image:
    """One corpus picture: 15% flat shapes, the rest textures, half of those cut to a shape."""
    if rng.random() < 0.15:
        return flat(rng, px)
    names = sorted(TEXTURES)
    texture = TEXTURES[rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]](rng, px)
    if rng.random() < 0.5:
        return texture
    ground = GROUNDS[rng.choice(sorted(GROUNDS))](rng, px)
    ground.paste(texture, (0, 0), shape_mask(random_scene(rng, jitter=0.2), px * SS).resize((px, px), Image.LANCZOS))
    return ground


def corpus(n: int, seed: int, px: int = 64) -> np.ndarray:
    """(n, px, px, 3) uint8 pictures, the same for the same seed."""
    rng = random.Random(f"texture-corpus-{seed}")
    return np.stack([np.asarray(picture(rng, px), dtype=np.uint8) for _ in range(n)])

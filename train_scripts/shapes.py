"""The procedural picture vocabulary shared by the embedded base and the sample style sets.

Every picture is one flat-coloured shape on a flat background, drawn with PIL, with a caption
that names the shape, its colour and (sometimes) the background: "a red circle",
"a blue square on a yellow background". The palette lives here so that tests can measure
generated pictures against the same colours the base model was trained on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Foreground colours, chosen far apart in RGB so a pixel's nearest palette entry is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
# Backgrounds a caption may name; an unnamed background is white.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "yellow": COLORS["yellow"],
    "blue": COLORS["blue"],
    "green": COLORS["green"],
}
SHAPES = ("circle", "square", "triangle", "diamond")

# Words the tokenizer must know as whole tokens: every caption word of the base set and the style
# sets, plus a few prompt words users type. Trigger words of the style sets are included so they
# are single (untrained, hence rare) tokens, as real trigger words are.
STYLE_TRIGGERS = {"stripes": "zstripes", "dots": "zdots", "mosaic": "zmosaic", "neon": "zneon"}
VOCAB_WORDS = sorted(
    set(COLORS)
    | set(BACKGROUNDS)
    | set(SHAPES)
    | set(STYLE_TRIGGERS.values())
    | {"a", "an", "on", "background", "in", "style", "with", "and", "of", "the", "picture", "photo",
       "painting", "striped", "stripes", "polka", "dots", "dotted", "pixel", "mosaic", "neon",
       "outline", "glowing", "big", "small", "shape", "color", "colour", "bright", "dark"}
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """One picture's content: what to draw and where (fractions of the picture side)."""

    shape: str
    color: str
    background: str | None  # None: white, not named in the caption
    cx: float
    cy: float
    size: float  # half-extent as a fraction of the side
    angle: float  # degrees, squares/triangles/diamonds only

    def caption(self) -> str:
        text = f"{article(self.color)} {self.color} {self.shape}"
        if self.background is not None:
            text += f" on {article(self.background)} {self.background} background"
        return text

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUNDS[self.background or "white"]


def random_scene(rng: random.Random, p_background: float = 0.35, jitter: float = 0.12) -> Scene:
    """Draw a scene whose named background, if any, differs from the shape's colour."""
    color = rng.choice(sorted(COLORS))
    background = None
    if rng.random() < p_background:
        background = rng.choice([b for b in sorted(BACKGROUNDS) if b != color])
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        background=background,
        cx=0.5 + rng.uniform(-jitter, jitter),
        cy=0.5 + rng.uniform(-jitter, jitter),
        size=rng.uniform(0.22, 0.34),
        angle=rng.uniform(-15.0, 15.0),
    )


def shape_polygon(scene: Scene, px: int) -> list[tuple[float, float]]:
    """Vertices of the scene's shape in pixel coordinates (a circle is a 48-gon)."""
    cx, cy, r = scene.cx * px, scene.cy * px, scene.size * px
    if scene.shape == "circle":
        n, start = 48, 0.0
    elif scene.shape == "square":
        n, start, r = 4, 45.0 + scene.angle, r * math.sqrt(2)
    elif scene.shape == "triangle":
        n, start, r = 3, -90.0 + scene.angle, r * 1.25
    elif scene.shape == "diamond":
        n, start, r = 4, scene.angle, r * 1.15
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")
    return [
        (cx + r * math.cos(math.radians(start + 360.0 * k / n)), cy + r * math.sin(math.radians(start + 360.0 * k / n)))
        for k in range(n)
    ]


def draw_scene(scene: Scene, px: int = 64, supersample: int = 4) -> Image.Image:
    """Render the scene as an RGB picture of px x px, anti-aliased by supersampling."""
    big = px * supersample
    img = Image.new("RGB", (big, big), scene.background_rgb)
    ImageDraw.Draw(img).polygon(shape_polygon(scene, big), fill=COLORS[scene.color])
    return img.resize((px, px), Image.LANCZOS)


def shape_mask(scene: Scene, px: int) -> Image.Image:
    """An L-mode mask (255 inside the shape) at px x px, for styles that texture the shape."""
    mask = Image.new("L", (px, px), 0)
    ImageDraw.Draw(mask).polygon(shape_polygon(scene, px), fill=255)
    return mask


def frame_colour(img: Image.Image, border: int = 3):
    """(3,) float32: the median colour of the picture's `border`-pixel frame, taken as its ground."""
    import numpy as np

    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    frame = np.concatenate(
        [rgb[:border].reshape(-1, 3), rgb[-border:].reshape(-1, 3), rgb[:, :border].reshape(-1, 3), rgb[:, -border:].reshape(-1, 3)]
    )
    return np.median(frame, axis=0)


def foreground_mask(img: Image.Image, border: int = 3, min_distance: float = 70.0):
    """(H, W) bool: pixels farther than `min_distance` (RGB, of 441 possible) from the background,
    which is the median colour of a `border`-pixel frame."""
    import numpy as np

    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return np.linalg.norm(rgb - frame_colour(img, border), axis=-1) > min_distance


def foreground_color_shares(img: Image.Image, border: int = 3, min_distance: float = 70.0) -> dict[str, float]:
    """Share of each palette colour among a picture's foreground pixels (see foreground_mask).

    Each foreground pixel votes for its nearest palette colour. An empty foreground (under 2% of
    the picture) gives {} (nothing was drawn).
    """
    import numpy as np

    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    fg = rgb[foreground_mask(img, border, min_distance)]  # (N, 3)
    if len(fg) < 0.02 * rgb.shape[0] * rgb.shape[1]:
        return {}
    names = sorted(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)  # (C, 3)
    nearest = np.linalg.norm(fg[:, None, :] - palette[None], axis=-1).argmin(axis=1)  # (N,)
    counts = np.bincount(nearest, minlength=len(names))
    return {n: float(c) / len(fg) for n, c in zip(names, counts)}


def background_name(img: Image.Image, border: int = 3) -> str:
    """The named background nearest to the median colour of the picture's `border`-pixel frame."""
    import numpy as np

    median = frame_colour(img, border)
    return min(BACKGROUNDS, key=lambda n: float(np.linalg.norm(median - np.array(BACKGROUNDS[n], np.float32))))


def dominant_foreground_color(img: Image.Image) -> str | None:
    shares = foreground_color_shares(img)
    return max(shares, key=shares.get) if shares else None

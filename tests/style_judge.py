"""A style judge: which sample style a picture is in, "plain" for the base's flat shapes, or "none".

Texture features of a 64x64 RGB picture (all scale-free shares, so brightness does not decide):
  - the grey picture's power spectrum, DC removed, as shares of energy in 8 radius bands, and the share
    of the energy beyond radius 4 that lies near the axes and near the diagonals (stripes are diagonal,
    a mosaic's grid is on the axes);
  - the autocorrelation of the high-passed grey picture at the styles' periods (8 px along the axes, 10 px
    along a row and (10, 5) as in an offset lattice, 8 px along a diagonal) and at 4 px, and the high-passed
    share of the variance, and how much of it sits in a few sharp spectral peaks (periodicity);
  - colour: the share of dark (< 50) and of near-white (> 225) pixels, the mean saturation;
  - edges: the mean gradient magnitude, and the share of pixels with a strong one.
Each class's centroid comes from reference pictures: the sample style sets (samples/styles/NAME) and 200
flat scenes drawn from the base's own vocabulary (plain). Features are standardised over all references.
A picture takes the nearest centroid's label only if it lies within that class's distance bound
(BOUND x the 90th percentile of the class's own references' distances) and no feature of it is more than
MAX_Z of the class's spreads from the class's centroid; otherwise it is "none". So a
picture that is merely nearer to a style than to plain, but like neither, is not judged in the style.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from train_scripts.shapes import draw_scene, foreground_mask, random_scene

STYLES_DIR = Path(__file__).resolve().parents[1] / "samples" / "styles"
STYLES = ("stripes", "dots", "mosaic", "neon")
BOUND = 2.0
SPREAD_FLOOR = 0.4
MAX_Z = 6.0
RADII = (1, 3, 5, 7, 9, 12, 16, 24, 33)  # band edges in cycles per picture (64 px: 32 is Nyquist)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W)


def features(img: Image.Image) -> np.ndarray:
    rgb = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), np.float32)  # (64, 64, 3)
    g = _grey(rgb)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2  # (64, 64), DC at (32, 32)
    fy, fx = np.mgrid[-32:32, -32:32]
    radius, theta = np.hypot(fx, fy), np.degrees(np.arctan2(fy, fx)) % 180
    total = power.sum() + 1e-6
    bands = [power[(radius >= lo) & (radius < hi)].sum() / total for lo, hi in zip(RADII[:-1], RADII[1:])]
    far = radius >= 4
    near_axis = (np.minimum(theta, 180 - theta) < 10) | (np.abs(theta - 90) < 10)
    near_diag = (np.abs(theta - 45) < 10) | (np.abs(theta - 135) < 10)
    far_total = power[far].sum() + 1e-6
    angles = [power[far & near_axis].sum() / far_total, power[far & near_diag].sum() / far_total]
    # High pass: the picture minus its 5x5 box blur (edge padded), so flat areas and outlines matter little.
    pad = np.pad(g, 2, mode="edge")
    blur = sum(pad[dy : dy + 64, dx : dx + 64] for dy in range(5) for dx in range(5)) / 25.0
    h = g - blur
    h = h - h.mean()
    var = (h * h).mean() + 1e-6

    def corr(dy: int, dx: int) -> float:
        a = h[max(0, dy) : 64 + min(0, dy), max(0, dx) : 64 + min(0, dx)]
        b = h[max(0, -dy) : 64 + min(0, -dy), max(0, -dx) : 64 + min(0, -dx)]
        return float((a * b).mean() / var)

    auto = [(corr(0, 8) + corr(8, 0)) / 2, corr(0, 10), (corr(10, 5) + corr(10, -5)) / 2,
            (corr(8, 8) + corr(8, -8)) / 2, (corr(0, 4) + corr(4, 0)) / 2,
            var / (g.var() + 1e-6)]  # the high-passed share of the variance: how much is texture
    # Periodicity: a lattice, stripes or a grid put the high-passed energy into a few sharp spectral peaks
    # (the 16 and the 4 strongest bins beyond radius 4, of 4,096), an outline spreads it.
    hpow = np.abs(np.fft.fftshift(np.fft.fft2(h))) ** 2
    hp = hpow[far]
    ranked = np.sort(hp)
    auto += [float(ranked[-16:].sum() / (hp.sum() + 1e-6)), float(ranked[-4:].sum() / (hp.sum() + 1e-6))]
    htotal = hpow.sum() + 1e-6
    auto += [hpow[(radius >= lo) & (radius < hi)].sum() / htotal for lo, hi in zip(RADII[2:-1], RADII[3:])]
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    colour = [(g < 50).mean(), (g > 225).mean(), float(((mx - mn) / (mx + 1e-3)).mean())]
    gy, gx = np.abs(np.diff(g, axis=0))[:, :-1], np.abs(np.diff(g, axis=1))[:-1, :]
    mag = np.hypot(gy, gx)
    edges = [mag.mean() / 255.0, (mag > 40).mean()]
    return np.array(bands + angles + auto + colour + edges, np.float64)


def plain_references(n: int = 200, seed: int = 1) -> list[Image.Image]:
    rng = random.Random(f"judge-plain-{seed}")
    return [draw_scene(random_scene(rng)) for _ in range(n)]


class StyleJudge:
    def __init__(self, references: dict[str, list[Image.Image]], bound: float = BOUND):
        feats = {label: np.stack([features(im) for im in imgs]) for label, imgs in references.items()}
        allf = np.concatenate(list(feats.values()))
        self.mean, self.std = allf.mean(axis=0), allf.std(axis=0) + 1e-6
        self.labels = list(feats)
        z = {label: (f - self.mean) / self.std for label, f in feats.items()}
        self.centroids = np.stack([z[label].mean(axis=0) for label in self.labels])  # (C, F)
        # Each class's own spread per feature, floored so that a feature constant within a class cannot
        # decide alone: (C, F)
        self.spread = np.stack([np.maximum(z[label].std(axis=0), SPREAD_FLOOR) for label in self.labels])
        self.bounds = np.array([bound * np.quantile(self._distances(z[label])[:, i], 0.9)
                                for i, label in enumerate(self.labels)])

    def _distances(self, z: np.ndarray) -> np.ndarray:
        """(N, F) standardised features -> (N, C) distances, each in its class's own spread."""
        return np.linalg.norm((z[:, None, :] - self.centroids[None]) / self.spread[None], axis=2) / np.sqrt(z.shape[1])

    def judge(self, img: Image.Image) -> str:
        z = (features(img) - self.mean) / self.std
        d = self._distances(z[None])[0]
        i = int(d.argmin())
        # Within the class's bound on the whole, and no single feature implausible for it: a picture whose
        # dark share is 7 spreads from every neon picture's is not neon, however near the rest is.
        worst = float(np.abs((z - self.centroids[i]) / self.spread[i]).max())
        return self.labels[i] if d[i] <= self.bounds[i] and worst <= MAX_Z else "none"


@lru_cache(maxsize=1)
def default_judge() -> StyleJudge:
    refs = {"plain": plain_references()}
    for style in STYLES:
        refs[style] = [Image.open(p).convert("RGB") for p in sorted((STYLES_DIR / style).glob("*.png"))]
    return StyleJudge(refs)


# ---- content: does a styled picture keep the named colour and the shape? ------------------------------

def _hsv(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").convert("HSV"), np.float32)  # (H, W, 3), each 0-255


def object_mask(img: Image.Image, border: int = 3, min_distance: float = 70.0) -> np.ndarray:
    """(H, W) bool: the drawn object, whatever the style does to it. Saturated pixels (every palette
    colour is, white, black, grey grounds and the styles' white or dark dots are not) that differ from
    the ground (the frame's median), closed over 5x5 (stripes' pale bands, grout lines) and with holes
    filled (white dots, a neon outline's dark inside)."""
    from scipy import ndimage

    far = foreground_mask(img, border, min_distance)
    hsv = _hsv(img)
    mask = far & (hsv[..., 1] > 90) & (hsv[..., 2] > 60)
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5)), border_value=0)
    return ndimage.binary_fill_holes(mask)


def object_colour(img: Image.Image) -> str | None:
    """The palette colour whose hue is nearest to most of the object's saturated pixels. Hue survives what
    the styles do to a colour (lightening, darkening, glowing on black), RGB distance does not."""
    from train_scripts.shapes import COLORS

    hsv = _hsv(img)
    pixels = hsv[object_mask(img) & (hsv[..., 1] > 90) & (hsv[..., 2] > 60)][:, 0]  # (N,) hues 0-255
    if len(pixels) < 0.02 * hsv.shape[0] * hsv.shape[1]:
        return None
    names = sorted(COLORS)
    hues = np.array([np.asarray(Image.new("RGB", (1, 1), COLORS[n]).convert("HSV"), np.float32)[0, 0, 0] for n in names])
    d = np.abs(pixels[:, None] - hues[None])
    d = np.minimum(d, 256 - d)  # hue is circular
    counts = np.bincount(d.argmin(axis=1), minlength=len(names))
    return names[int(counts.argmax())]


def overlap(a: Image.Image, b: Image.Image) -> float:
    """Intersection over union of two pictures' object masks."""
    ma, mb = object_mask(a), object_mask(b)
    return float((ma & mb).sum() / max(1, (ma | mb).sum()))

"""A folder of pictures with same-name .txt captions: the pre-flight scan, caption handling,
aspect-ratio buckets and a deterministic bucketed sampler that can resume mid-epoch."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import SdloraError
from .images import IMAGE_SUFFIXES, is_mask_file

MAX_PIXELS = 40_000_000  # larger pictures are refused: decompression bombs, or a mistake
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF orientation


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str

    def __str__(self):
        return f"{self.path.name}: {self.reason}"


def check_image(path: Path, max_pixels: int = 40_000_000, max_bytes: int = 2**31) -> tuple[tuple[int, int] | None, str | None]:
    if path.stat().st_size > max_bytes:
        return None, f"file of {path.stat().st_size:,} bytes is over the {max_bytes:,}-byte limit"
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                return None, f"{w}x{h} pixels is over the {max_pixels:,}-pixel limit"
            img.load()  # decodes everything: a truncated file fails here, not mid-training
            exif = img.getexif()
            if exif.get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
    except Image.DecompressionBombError:
        return None, "over Pillow's decompression-bomb limit"
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        return None, "truncated" if "truncated" in text else f"unreadable ({type(err).__name__}: {text})"
    return (w, h), None


def scan(root: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_FILE_BYTES) -> tuple[list[Item], list[Problem]]:
    """Every picture under `root` (recursively, sorted) with its caption, and every problem found:
    unreadable, truncated or oversized files, missing or empty captions."""
    root = Path(root)
    if not root.is_dir():
        raise SdloraError(f"no dataset folder at {root}", "pass a folder of pictures with same-name .txt captions")
    items, problems = [], []
    pictures = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not is_mask_file(p))
    for path in sorted(pictures):  # NAME.mask.png files are masks of NAME's picture, not pictures
        size, reason = check_image(path, max_pixels, max_bytes)
        if reason:
            problems.append(Problem(path, reason))
            continue
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            problems.append(Problem(path, f"no caption file {txt.name}"))
            continue
        try:
            caption = " ".join(txt.read_text(encoding="utf-8").split())
        except UnicodeDecodeError:
            problems.append(Problem(path, f"{txt.name} is not UTF-8 text"))
            continue
        if not caption:
            problems.append(Problem(path, f"{txt.name} is empty"))
            continue
        items.append(Item(path, caption, size))
    return items, problems


def preflight(root: str | Path, skip_bad: bool = False, **limits) -> list[Item]:
    """Scan before training: stop with every problem listed by name, or (skip_bad) warn and go on."""
    items, problems = scan(root, **limits)
    if problems and not skip_bad:
        listing = "; ".join(str(p) for p in problems)
        raise SdloraError(f"{len(problems)} problem(s) in {root}: {listing}",
                          "fix or remove those files, or pass --skip-bad-images to train without them")
    if problems:
        warnings.warn(f"skipping {len(problems)} file(s) in {root}: " + "; ".join(str(p) for p in problems), stacklevel=2)
    if not items:
        raise SdloraError(f"no usable pictures in {root}",
                          f"add {', '.join(IMAGE_SUFFIXES)} pictures, each with a same-name .txt caption")
    return items


def process_caption(caption: str, rng: random.Random, trigger: str | None = None, shuffle_tags: bool = False,
                    keep_tokens: int = 0, dropout: float = 0.0) -> str:
    """The caption one step trains on. Tags are comma-separated; the first `keep_tokens` stay in
    place (with the trigger word first, added when missing), the rest are shuffled; with
    probability `dropout` the caption is empty, which trains the unconditional prediction."""
    if dropout and rng.random() < dropout:
        return ""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if trigger and trigger not in tags:
        tags.insert(0, trigger)
        keep_tokens = max(keep_tokens, 1)
    if shuffle_tags:
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        tags = head + tail
    return ", ".join(tags)


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `step` between min_side and max_side, area at most
    resolution^2, aspect ratio at most `max_ratio`: the square, and for each width the tallest height
    that fits."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_ratio:
        h = min(int(area // w) // step * step, int(w * max_ratio) // step * step)
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    buckets.add((resolution // step * step, resolution // step * step))
    lo, hi = min_side or 0, max_side or 10**9
    return sorted(b for b in buckets if lo <= min(b) and max(b) <= hi)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the picture's; larger area breaks ties."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How a (w, h) picture fills a (w, h) bucket: scaled to cover it, then its centre cropped, so nothing
    is stretched. Returns the scaled size (w, h) and the crop's top-left corner (left, top) in it."""
    bw, bh = bucket
    scale = max(bw / size[0], bh / size[1])
    w, h = max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))
    return (w, h), ((w - bw) // 2, (h - bh) // 2)


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """The picture scaled and cropped into the bucket, as bucket_crop says."""
    (w, h), (left, top) = bucket_crop(img.size, bucket)
    img = img.resize((w, h), Image.LANCZOS)
    return img.crop((left, top, left + bucket[0], top + bucket[1]))


def sdxl_time_ids(size: tuple[int, int], bucket: tuple[int, int], flipped: bool = False) -> list[float]:
    """SDXL's six micro-conditioning numbers for a (w, h) picture trained in a (w, h) bucket: original
    size (h, w), the crop's top-left (top, left) in the scaled picture, target size (h, w), as
    diffusers' SDXL training scripts (compute_time_ids) and kohya's sd-scripts give them. A mirrored
    picture's crop is the mirror of the crop: its left is the scaled width minus the crop's right
    edge, as kohya's sd-scripts compute it."""
    (scaled_w, _), (left, top) = bucket_crop(size, bucket)
    if flipped:
        left = scaled_w - (left + bucket[0])
    return [float(size[1]), float(size[0]), float(top), float(left), float(bucket[1]), float(bucket[0])]


@dataclass(frozen=True)
class Sample:
    """One picture at one resolution, bucketed there: what latents, masks and SDXL time ids are cached per. reg:
    a regularization picture (its own caption, never the trigger word; its loss times --reg-weight)."""
    item: Item
    bucket: tuple[int, int]
    reg: bool = False


def training_samples(items: list[Item], reg_items: list[Item], bucket_sets: list[list[tuple[int, int]]]) -> list[Sample]:
    """Every picture at every resolution (one bucket set per resolution), the training pictures first, one
    resolution after the other, then the regularization pictures likewise: sample r * len(items) + i is
    picture i at resolution r, so the first len(items) are the pictures at the first resolution."""
    return [Sample(item, nearest_bucket(item.size, buckets), reg) for reg, group in ((False, items), (True, reg_items))
            for buckets in bucket_sets for item in group]


class BucketSampler:
    """Batches of sample positions, each batch from one bucket, in an order fixed by (seed, epoch).

    An epoch holds every training sample `repeats` times and, with regularization samples (reg_buckets),
    as many of those (positions len(buckets_of_items) + j), in batches of `batch_size` (a bucket's last,
    smaller batch is kept). `batches(epoch)[k:]` is what remains after k batches, which is all that exact
    resume needs: no sample is seen twice in an epoch, and nothing depends on earlier epochs."""

    def __init__(self, buckets_of_items: list[tuple[int, int]], batch_size: int, seed: int, repeats: int = 1,
                 reg_buckets: list[tuple[int, int]] = ()):
        if batch_size < 1 or repeats < 1:
            raise SdloraError("batch size and repeats must be at least 1", "pass --batch-size 1 or more")
        self.buckets_of_items, self.reg_buckets = buckets_of_items, list(reg_buckets)
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats

    def reg_picks(self, epoch: int) -> list[int]:
        """The regularization samples (0-based) that join `epoch`: one per training sample of the epoch (kohya's
        count), taken in turn from an endless stream of shuffles of all of them, round k shuffled by (seed, k).
        Fewer than the training samples are cycled; more are all used over the epochs (kohya keeps only the
        first ones), each as often as any other within one. Epoch e takes the stream's slice [e n, (e + 1) n),
        so it depends on (seed, epoch) alone."""
        count, per_epoch = len(self.reg_buckets), len(self.buckets_of_items) * self.repeats
        if not count:
            return []
        start, stop = epoch * per_epoch, (epoch + 1) * per_epoch
        picks = []
        for k in range(start // count, (stop - 1) // count + 1):
            order = list(range(count))
            random.Random(f"{self.seed}:reg:{k}").shuffle(order)
            picks += order[max(start - k * count, 0) : min(stop - k * count, count)]
        return picks

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets_of_items):
            by_bucket.setdefault(bucket, []).extend([index] * self.repeats)
        for j in self.reg_picks(epoch):  # in the same buckets as the training samples: batches mix both, as kohya's
            by_bucket.setdefault(self.reg_buckets[j], []).append(len(self.buckets_of_items) + j)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        rng.shuffle(batches)
        return batches

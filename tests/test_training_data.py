"""Training data: the pre-flight scan, picture normalisation, captions, buckets, the sampler."""

import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.training.data import (BucketSampler, fit_to_bucket, make_buckets, nearest_bucket, preflight,
                                  process_caption, scan)
from sdlora.training.images import load_rgb

STYLES = Path(__file__).resolve().parents[1] / "samples" / "styles"


def _write(folder: Path, name: str, img: Image.Image, caption: str | None = "a red circle", **save):
    img.save(folder / name, **save)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


@pytest.fixture
def messy(tmp_path):
    """Good pictures of every format plus one of each problem."""
    red = Image.new("RGB", (40, 30), (200, 20, 20))
    _write(tmp_path, "good.png", red)
    _write(tmp_path, "good.jpg", red, quality=95)
    _write(tmp_path, "good.webp", red)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    _write(tmp_path, "transparent.png", rgba)
    _write(tmp_path, "no-caption.png", red, caption=None)
    _write(tmp_path, "empty-caption.png", red, caption="  ")
    (tmp_path / "garbage.png").write_bytes(b"not a picture at all")
    (tmp_path / "garbage.txt").write_text("x")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("x")
    _write(tmp_path, "huge.png", Image.new("RGB", (300, 300)))
    return tmp_path


def test_preflight_lists_every_problem_by_name(messy):
    with pytest.raises(SdloraError) as err:
        preflight(messy, max_pixels=200 * 200)
    text = str(err.value)
    for name, reason in [("no-caption.png", "no caption file"), ("empty-caption.png", "is empty"),
                         ("garbage.png", "unreadable"), ("truncated.png", "truncated"), ("huge.png", "300x300 pixels")]:
        assert re.search(rf"{re.escape(name)}: [^;]*{reason}", text), (name, text)
    assert "5 problem(s)" in text and "--skip-bad-images" in text
    assert "good.png" not in text


def test_skip_bad_images_keeps_the_good_ones(messy):
    with pytest.warns(UserWarning, match="skipping 5 file"):
        items = preflight(messy, skip_bad=True, max_pixels=200 * 200)
    assert sorted(i.image.name for i in items) == ["good.jpg", "good.png", "good.webp", "transparent.png"]
    assert {i.caption for i in items} == {"a red circle"} and all(i.size in ((40, 30), (20, 20)) for i in items)


def test_the_sample_style_sets_pass_preflight():
    for style in ("stripes", "dots", "mosaic", "neon"):
        items, problems = scan(STYLES / style)
        assert not problems and len(items) == 40 and all(i.caption.endswith(f", z{style}") for i in items)


def test_transparency_16_bit_palette_and_exif(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)

    grey16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    grey16.save(tmp_path / "g.png")
    assert [tuple(p) for p in np.asarray(load_rgb(tmp_path / "g.png"))[0]] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=1)
    assert [tuple(p) for p in np.asarray(load_rgb(tmp_path / "p.png"))[0]] == [(255, 0, 0), (255, 255, 255)]

    wide = Image.new("RGB", (30, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored wide, shown tall
    wide.save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.txt").write_text("x")
    assert load_rgb(tmp_path / "r.jpg").size == (10, 30)
    [item] = [i for i in scan(tmp_path)[0] if i.image.name == "r.jpg"]
    assert item.size == (10, 30)


def test_captions_trigger_shuffle_keep_and_dropout():
    rng = random.Random(0)
    assert process_caption("a red circle, bright", rng, trigger="zdots") == "zdots, a red circle, bright"
    assert process_caption("zdots, a red circle", rng, trigger="zdots") == "zdots, a red circle"
    tags = ", ".join(f"t{i}" for i in range(8))
    seen = {process_caption(tags, rng, trigger="zz", shuffle_tags=True, keep_tokens=2) for _ in range(50)}
    assert len(seen) > 10 and all(s.startswith("zz, t0, ") for s in seen)
    assert sorted(next(iter(seen)).split(", ")) == sorted(["zz"] + tags.split(", "))
    drops = sum(process_caption("x", rng, dropout=0.25) == "" for _ in range(4000))
    assert 0.22 < drops / 4000 < 0.28
    a = [process_caption(tags, random.Random(5), shuffle_tags=True) for _ in range(2)]
    assert a[0] == a[1]  # the same rng state gives the same caption: resumable


def test_buckets_fit_the_area_and_keep_the_aspect():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (576, 448) in buckets and (448, 576) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets)[0] > nearest_bucket((1920, 1080), buckets)[1]
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (140, 40, 160, 60))  # a white square in the middle
    fitted = fit_to_bucket(img, (64, 64))
    assert fitted.size == (64, 64) and np.asarray(fitted)[32, 32].min() > 200  # centre crop kept the middle
    assert make_buckets(64, 8)[0][0] % 8 == 0  # the embedded base's 64 px in steps of 8


def test_sampler_covers_every_item_once_per_epoch_and_resumes():
    buckets = [(64, 64)] * 7 + [(72, 56)] * 5
    sampler = BucketSampler(buckets, batch_size=3, seed=1, repeats=2)
    epoch0 = sampler.batches(0)
    flat = sorted(i for b in epoch0 for i in b)
    assert flat == sorted(list(range(12)) * 2)
    assert all(len({buckets[i] for i in b}) == 1 for b in epoch0)  # one bucket per batch
    assert sampler.batches(0) == epoch0 and sampler.batches(1) != epoch0
    # resuming after k batches: the rest of the same epoch, nothing seen twice
    k = 4
    assert epoch0[:k] + BucketSampler(buckets, 3, 1, 2).batches(0)[k:] == epoch0


def test_buckets_stay_between_the_side_bounds_and_sdxl_time_ids_follow_the_crop_and_its_mirror():
    from sdlora.training.data import sdxl_time_ids

    buckets = make_buckets(1024, 64, min_side=768, max_side=1280)
    assert (1024, 1024) in buckets and all(768 <= min(b) and max(b) <= 1280 for b in buckets)
    assert {(832, 1216), (1216, 832)} <= set(buckets)  # SDXL's usual portrait and landscape
    assert make_buckets(1024, 32) != make_buckets(1024, 64) and all(s % 32 == 0 for b in make_buckets(1024, 32) for s in b)
    # a 97 x 64 picture in a 64 x 64 bucket: scaled by 1, cropped 16 px from the left (kohya's floor), 17 from
    # the right; mirrored, the crop's left is the scaled width minus the right edge: 97 - (16 + 64) = 17
    assert sdxl_time_ids((97, 64), (64, 64)) == [64, 97, 0, 16, 64, 64]
    assert sdxl_time_ids((97, 64), (64, 64), flipped=True) == [64, 97, 0, 17, 64, 64]
    # a 600 x 900 portrait in an 832 x 1216 bucket: scaled to 832 x 1248, 16 px off the top
    assert sdxl_time_ids((600, 900), (832, 1216)) == [900, 600, 16, 0, 1216, 832]
    img = Image.fromarray(np.arange(97 * 64 * 3, dtype=np.uint8).reshape(64, 97, 3) % 251)
    crop = np.asarray(fit_to_bucket(img, (64, 64)))
    assert np.array_equal(crop, np.asarray(img)[:, 16:80])
    mirrored = np.asarray(img)[:, ::-1]
    assert np.array_equal(crop[:, ::-1], mirrored[:, 17:81])  # the mirror of the crop is the mirror's crop at 17


def test_latent_shift_moves_each_row_by_whole_latents_and_repeats_the_edges():
    """Against index arithmetic: out[b, c, y, x] = in[b, c, clip(y - dy), clip(x - dx)] (edge repeated)."""
    import torch

    from sdlora.training.latents import shift_latents

    x = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    shifts = [(1, 0), (-2, 1), (0, 0)]
    got = shift_latents(x, shifts).numpy()
    for b, (dx, dy) in enumerate(shifts):
        ys = np.clip(np.arange(5) - dy, 0, 4)
        xs = np.clip(np.arange(7) - dx, 0, 6)
        assert np.array_equal(got[b], x[b].numpy()[:, ys][:, :, xs]), (b, dx, dy)
    assert shift_latents(x, [(0, 0)] * 3) is x  # nothing drawn, nothing copied


def test_a_negative_latent_shift_is_refused_by_name():
    from sdlora.training.config import TrainConfig

    with pytest.raises(SdloraError, match="latent_shift"):
        TrainConfig(data_dir="d", out_dir="o", latent_shift=-1)

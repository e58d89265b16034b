"""Opening training pictures the way users expect: EXIF orientation applied, transparency on
white, 16-bit and palette pictures converted correctly, always 8-bit RGB out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL picture -> 8-bit RGB. Alpha (also a palette's transparent entry) is composited on
    white; 16- and 32-bit grey is scaled by its type's range, not clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode == "I":  # 32-bit ints: PNG's 16-bit grey opens as this in some Pillow versions
        arr = np.asarray(img, dtype=np.int64).astype(np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((np.clip(arr / top, 0, 1) * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def mask_path(image: Path) -> Path:
    """Where a picture's loss mask may sit: NAME.mask.png beside NAME.png (white = learn, black = ignore)."""
    return Path(image).with_name(f"{Path(image).stem}.mask.png")


def is_mask_file(path: Path) -> bool:
    return Path(path).stem.lower().endswith(".mask")


def load_mask(image: Path) -> Image.Image | None:
    """The picture's loss mask as 8-bit grey, oriented as the picture: NAME.mask.png if there is one, else the
    picture's own alpha channel (transparent = ignore), else None (learn everywhere)."""
    side = mask_path(image)
    if side.is_file():
        with Image.open(image) as img:
            size = ImageOps.exif_transpose(img).size
        with Image.open(side) as m:
            m.load()
            mask = m.convert("L")
        return mask if mask.size == size else mask.resize(size, Image.BILINEAR)
    with Image.open(image) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            return img.getchannel("A")
    return None

"""What A1111's card of an adapter shows, gathered at the end of training (sdlora/formats/a1111_meta.py writes it
into kohya exports): the training captions' tag frequencies per folder, the training resolution, and the last
validation picture as a thumbnail."""

from __future__ import annotations

from pathlib import Path

from ..formats.a1111_meta import tag_frequency, thumbnail


def card(cfg, items: list, train_items: list[int], native_size: int, out_dir: Path) -> dict:
    by_folder: dict[str, list[str]] = {}
    for i in train_items:
        by_folder.setdefault(items[i].image.parent.name, []).append(items[i].caption)
    side = max(cfg.resolution) if cfg.resolution else native_size  # the largest of several
    samples = sorted((Path(out_dir) / "samples").glob("step-*.png"))
    return {"tag_frequency": tag_frequency(by_folder), "resolution": [side, side],
            **({"thumbnail": thumbnail(samples[-1])} if samples else {})}

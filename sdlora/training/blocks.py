"""Block-wise learning rates and ranks: how fast and at what rank each UNet block's layers learn.

Two ways to say it, one meaning:
- block_lr = "down=0.5, mid=1, up.1=2" multiplies --lr per block and block_rank = "down=4, up=8" sets the rank per
  block, the blocks named exactly as a mix names them (groups down/mid/up, diffusers indices such as down.1, LoRA
  Block Weight ids such as IN05/M00/OUT03; the most specific key covering a layer wins: sdlora/block_weights.py).
  Layers no key covers keep --lr and --rank. BASE in block_rank is the text encoders' rank; their learning rates
  are --text-encoder-lr's, so block_lr refuses BASE.
- kohya sd-scripts' down_lr_weight / mid_lr_weight / up_lr_weight (networks/lora.py): get_block_index puts
  down_blocks.i.{resnets,attentions}.j at 1 + 3i + j, down_blocks.i.downsamplers at 3 + 3i, the mid block at 12
  and up_blocks.i.{resnets,attentions}.j at 13 + 3i + j (upsamplers 13 + 3i + 2); the k-th down weight is thus
  the LDM input block k (IN k), the k-th up weight the output block k (OUT k), the mid weight M00. A side has 12
  weights on SD1/SD2 and 9 on SDXL (kohya's SDXL_NUM_OF_BLOCKS); a shorter list is filled with 1 and an empty
  entry is 0, as kohya reads them; a preset (cosine, sine, linear, reverse_linear, zeros, each with an optional
  "+offset") is kohya's curve over the side's blocks. One difference: on SDXL kohya splits the mid block in three
  weights; here mid_lr_weight is one number for all of it.

A block whose lr weight is at or below block_lr_zero_threshold (default 0; only weights given count, the default
1 never), or whose rank is 0, gets no adapter, as kohya's sd-scripts skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..block_weights import block_factor, check_keys
from ..errors import SdloraError

KOHYA_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
EXAMPLES = {"block_lr": '"down=0.5, mid=1, up.1=2"', "block_rank": '"down=4, up=8, IN05=16"',
            "down_lr_weight": '"0,1,1,1,1,1,1,1,1,1,1,0.5" or "sine+0.5"', "up_lr_weight": '"1,1,1,0,0,0,1,1,1,1,1,1"'}


def _bad(key: str, text: str, why: str) -> SdloraError:
    return SdloraError(f"training setting {key} = {text!r}: {why}", f"write {key} as e.g. {EXAMPLES[key]}")


def parse_blocks(text: str, key: str) -> dict[str, float]:
    """'down=0.5, mid=1, up.1=2' -> {'down': 0.5, 'mid': 1.0, 'up.1': 2.0}: block_lr's multipliers (0 or more) or
    block_rank's ranks (whole, 0 or more). Unknown block names and bad values are refused naming `key`."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise _bad(key, text, f"cannot read {part!r}")
        try:
            check_keys([name])
        except SdloraError as err:
            raise SdloraError(f"training setting {key}: {err.problem}", err.fix) from None
        if name in out:
            raise _bad(key, text, f"{name} is given twice")
        if name == "BASE" and key == "block_lr":
            raise SdloraError(f"training setting {key}: BASE (the text encoders) has its own rate",
                              "use --text-encoder-lr / --text-encoder-2-lr for the text encoders")
        try:
            number = float(value)
        except ValueError:
            raise _bad(key, text, f"{name}'s {value!r} is not a number") from None
        whole = key != "block_rank" or number.is_integer()
        if not (math.isfinite(number) and number >= 0 and whole):
            raise _bad(key, text, f"{name}'s {value!r} must be {'a whole number' if not whole else 'finite and'} 0 or more")
        out[name] = number
    return out


def kohya_side(text: str, key: str, count: int) -> list[float]:
    """One side's kohya weights: a preset with an optional '+offset', or up to `count` numbers (filled with 1)."""
    text = text.strip()
    name, _, offset = text.partition("+")
    if name.strip() in KOHYA_PRESETS:
        try:
            base = float(offset) if offset else 0.0
        except ValueError:
            raise _bad(key, text, f"the offset {offset!r} is not a number") from None
        steps = [i / (count - 1) for i in range(count)]
        curve = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * count}
        curve["cosine"], curve["reverse_linear"] = curve["sine"][::-1], steps[::-1]
        return [w + base for w in curve[name.strip()]]
    parts = text.split(",")
    if len(parts) == 1:
        try:
            float(text)
            why = f"one number is not a list of {count} block weights"
        except ValueError:
            why = "neither a preset nor a list of numbers"
        raise _bad(key, text, f"{why} (presets: {', '.join(KOHYA_PRESETS)}, each with an optional +offset)")
    if len(parts) > count:
        raise _bad(key, text, f"{len(parts)} weights, but this base has {count} blocks on that side")
    try:
        weights = [float(p) if p.strip() else 0.0 for p in parts]  # kohya reads an empty entry as 0
    except ValueError:
        raise _bad(key, text, "holds something that is not a number") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise _bad(key, text, "every weight must be finite and 0 or more")
    return weights + [1.0] * (count - len(weights))


def kohya_blocks(down: str | None, mid: float | None, up: str | None, sdxl: bool) -> dict[str, float]:
    """kohya's three lr weights as LBW-keyed multipliers: the k-th down weight -> IN k, mid -> M00, the k-th up
    weight -> OUT k (see the module's docstring for kohya's block index)."""
    count = 9 if sdxl else 12
    out: dict[str, float] = {}
    if down is not None:
        out.update({f"IN{k:02d}": w for k, w in enumerate(kohya_side(down, "down_lr_weight", count))})
    if mid is not None:
        out["M00"] = mid
    if up is not None:
        out.update({f"OUT{k:02d}": w for k, w in enumerate(kohya_side(up, "up_lr_weight", count))})
    return out


@dataclass(frozen=True)
class BlockPlan:
    """Per layer region (sdlora.inject.region_of): its lr multiplier and its rank (0: no adapter)."""

    lr_blocks: dict  # block key -> multiplier of --lr (UNet layers)
    rank_blocks: dict  # block key -> rank
    rank: int  # --rank, for the layers no key covers
    named: bool = True  # lr_blocks came from block_lr (names a person wrote), not from kohya's lists

    @classmethod
    def of(cls, cfg, sdxl: bool) -> "BlockPlan":
        """The plan a TrainConfig gives on a base (SDXL: 9 blocks a side in kohya's lists)."""
        named = bool(cfg.block_lr)
        lr = parse_blocks(cfg.block_lr, "block_lr") if named else kohya_blocks(
            cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight, sdxl)
        # kohya: a given weight at or below the threshold is 0, and a block at 0 gets no adapter
        lr = {k: (w if w > cfg.block_lr_zero_threshold else 0.0) for k, w in lr.items()}
        ranks = parse_blocks(cfg.block_rank, "block_rank") if cfg.block_rank else {}
        return cls(lr, {k: int(r) for k, r in ranks.items()}, cfg.rank, named)

    @property
    def active(self) -> bool:
        return bool(self.lr_blocks or self.rank_blocks)

    def lr_weight(self, region: str) -> float:
        return block_factor(self.lr_blocks, region) if region.startswith("unet") else 1.0

    def rank_of(self, region: str) -> int:
        if self.lr_weight(region) == 0:
            return 0
        return int(block_factor(self.rank_blocks, region, self.rank))

    def check_names(self, regions) -> None:
        """Refuse a written key that covers no layer of this UNet (down.7, OUT11 on SDXL): most likely a slip.
        kohya's lists name every block of the largest UNet, so they are not checked."""
        for key, blocks in (("block_rank", self.rank_blocks), ("block_lr", self.lr_blocks if self.named else {})):
            for name in blocks:
                probe = {name: -1.0}  # a factor no real key gives: does `name` cover any region?
                if name != "BASE" and not any(block_factor(probe, r) == -1.0 for r in regions):
                    raise SdloraError(f"training setting {key} names {name}, a block this base's UNet does not have",
                                      "name blocks the UNet has (sdlora/block_weights.py lists them)")

"""Per-block adapter weights: our groups (down, mid, up), diffusers' block indices (down.1, up.0) and the
LoRA Block Weight convention of hako-mikan's sd-webui-lora-block-weight (A1111/Forge), whose blocks are the
LDM UNet's input_blocks.N (INnn), middle_block (M00) and output_blocks.N (OUTnn), plus BASE for the text
encoder(s).

diffusers module -> LBW block (the LDM layout; SD1/SD2 and SDXL alike):
    conv_in                                    IN00
    down_blocks.i.{resnets,attentions}.j       IN(1 + 3i + j)
    down_blocks.i.downsamplers.0               IN(3 + 3i)
    mid_block                                  M00
    up_blocks.i.{resnets,attentions}.j         OUT(3i + j)
    up_blocks.i.upsamplers.0                   OUT(3i + 2)
    time_embedding, add_embedding, conv_out    none: the UNet weight alone (the extension leaves them at 1)
    text encoder(s)                            BASE
A weight list of 12, 17, 20 or 26 numbers names its blocks by its length (the extension's BLOCKID lists); the
blocks it does not name get 0, as the extension's `to26` gives them. Presets are the extension's defaults (17).
"""

from __future__ import annotations

import re

from .errors import SdloraError

GROUPS = ("down", "mid", "up")
BLOCK26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCK17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
           "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
BLOCK12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
BLOCK20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BY_COUNT = {len(ids): ids for ids in (BLOCK12, BLOCK17, BLOCK20, BLOCK26)}

PRESETS = {  # the extension's DEF_WEIGHT_PRESET, 17 weights each (BLOCK17's order)
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}

_KEY = re.compile(r"^(down|mid|up)(\.\d+)?$|^(BASE|IN\d\d|M00|OUT\d\d)$")


def lbw_block(name: str) -> str | None:
    """The LBW block of a UNet module (diffusers name), or None for those outside every block."""
    parts = name.split(".")
    if parts[0] == "conv_in":
        return "IN00"
    if parts[0] == "mid_block":
        return "M00"
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 3 and parts[1].isdigit():
        i, kind = int(parts[1]), parts[2]
        j = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        if parts[0] == "down_blocks":
            return f"IN{3 + 3 * i:02d}" if kind == "downsamplers" else f"IN{1 + 3 * i + j:02d}"
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return None


def lbw_weights(text: str) -> dict[str, float]:
    """A preset name or a list of 12, 17, 20 or 26 numbers -> a weight for every one of the 26 blocks."""
    text = text.strip()
    values = PRESETS.get(text, text)
    parts = [p.strip() for p in values.split(",")]
    ids = BY_COUNT.get(len(parts))
    if ids is None:
        raise SdloraError(f"cannot read the block weights lbw={text!r}",
                          f"give a preset ({', '.join(PRESETS)}) or 12, 17, 20 or 26 numbers separated by commas")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise SdloraError(f"lbw={text!r} holds something that is not a number",
                          "give numbers separated by commas, or a preset name") from None
    weights = dict.fromkeys(BLOCK26, 0.0)  # blocks the list does not name are off, as in the extension
    weights.update(zip(ids, numbers))
    return weights


def check_keys(blocks) -> None:
    unknown = sorted(k for k in blocks if not _KEY.match(str(k)))
    if unknown:
        raise SdloraError(f"unknown block name(s) {unknown}",
                          "use down, mid, up, a block index such as down.1 or up.0, or LBW names (BASE, IN05, M00, OUT03)")


def block_factor(blocks, region: str, default: float = 1.0) -> float:
    """The factor of `region`'s layers: the most specific key that covers it (LBW block, then diffusers block
    index, then group), else `default`. Regions: 'unet.down.1.IN05', 'unet.mid.M00', 'unet.in.IN00', 'unet',
    'text_encoder', 'text_encoder_2'."""
    parts = region.split(".")
    if not region.startswith("unet"):
        return blocks.get("BASE", default)
    if len(parts) >= 2 and parts[-1] in BLOCK26 and parts[-1] in blocks:
        return blocks[parts[-1]]
    if len(parts) >= 3 and f"{parts[1]}.{parts[2]}" in blocks:
        return blocks[f"{parts[1]}.{parts[2]}"]
    if len(parts) >= 2 and parts[1] in GROUPS:
        return blocks.get(parts[1], default)
    return default

"""AUTOMATIC1111's adapter tags in a prompt: <lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET>, and
the named forms te=W / unet=W. As in A1111 the first number is the text-encoder weight and the
UNet weight defaults to it. LoRA Block Weight's fields too (sd-webui-lora-block-weight):
lbw=PRESET or lbw=W,W,... (12, 17, 20 or 26 weights), start=N / stop=N / step=A-B (denoising steps,
from 0, stop excluded). The tags are removed from the prompt the model sees."""

from __future__ import annotations

import re

from .errors import SdloraError
from .block_weights import lbw_weights
from .mixing import AdapterWeights

NO_STOP = 10**6  # start= without stop=: to the last step


def _steps(body: str, named: dict) -> tuple[int, int] | None:
    if "step" in named:
        a, sep, b = named["step"].partition("-")
        named = {**named, "start": a, **({"stop": b} if sep else {})}
    if "start" not in named and "stop" not in named:
        return None
    try:
        return int(named.get("start", 0)), int(named.get("stop", NO_STOP))
    except ValueError:
        raise SdloraError(f"cannot read the steps of <lora:{body}>", "write start=N, stop=N or step=A-B with "
                          "whole numbers") from None

TAG = re.compile(r"<lora:([^<>]*)>")


def parse_prompt_tags(prompt: str) -> tuple[str, dict[str, AdapterWeights]]:
    """(prompt without tags, adapter name -> weights). A name given twice is refused."""
    found: dict[str, AdapterWeights] = {}
    for body in TAG.findall(prompt):
        name, *params = [p.strip() for p in body.split(":")]
        positional = [p for p in params if "=" not in p]
        named = dict(p.split("=", 1) for p in params if "=" in p)
        unknown = set(named) - {"te", "unet", "lbw", "start", "stop", "step"}
        if not name or len(positional) > 2 or unknown:
            raise SdloraError(f"cannot read the tag <lora:{body}>",
                              "write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        te = named.get("te", positional[0] if positional else 1.0)
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        if name in found:
            raise SdloraError(f"the prompt names adapter {name!r} twice", "keep one <lora:...> tag per adapter")
        blocks = lbw_weights(named["lbw"]) if "lbw" in named else None
        found[name] = AdapterWeights(unet=unet, text_encoder=te, blocks=blocks, steps=_steps(body, named))
    clean = re.sub(r"\s*,?\s*<lora:[^<>]*>\s*", " ", prompt)
    return re.sub(r"\s+", " ", clean).strip(" ,"), found

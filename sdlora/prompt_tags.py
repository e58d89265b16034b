"""AUTOMATIC1111's adapter tags in a prompt: <lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET>, and
the named forms te=W / unet=W. As in A1111 the first number is the text-encoder weight and the
UNet weight defaults to it. The tags are removed from the prompt the model sees."""

from __future__ import annotations

import re

from .errors import SdloraError
from .mixing import AdapterWeights

TAG = re.compile(r"<lora:([^<>]*)>")


def parse_prompt_tags(prompt: str) -> tuple[str, dict[str, AdapterWeights]]:
    """(prompt without tags, adapter name -> weights). A name given twice is refused."""
    found: dict[str, AdapterWeights] = {}
    for body in TAG.findall(prompt):
        name, *params = [p.strip() for p in body.split(":")]
        positional = [p for p in params if "=" not in p]
        named = dict(p.split("=", 1) for p in params if "=" in p)
        unknown = set(named) - {"te", "unet"}
        if not name or len(positional) > 2 or unknown:
            raise SdloraError(f"cannot read the tag <lora:{body}>",
                              "write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        te = named.get("te", positional[0] if positional else 1.0)
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        if name in found:
            raise SdloraError(f"the prompt names adapter {name!r} twice", "keep one <lora:...> tag per adapter")
        found[name] = AdapterWeights(unet=unet, text_encoder=te)  # checks both are finite numbers
    clean = re.sub(r"\s*,?\s*<lora:[^<>]*>\s*", " ", prompt)
    return re.sub(r"\s+", " ", clean).strip(" ,"), found

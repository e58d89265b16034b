"""Which embedded base ships: tests written for the v2 base of issue 13 wait for it."""

import json
from pathlib import Path

BUILD = Path(__file__).resolve().parents[1] / "samples" / "embedded" / "BUILD.json"


def base_v2() -> bool:
    """samples/embedded is the v2 base (texture-corpus VAE); BUILD.json of v1 has no base_version."""
    return json.loads(BUILD.read_text()).get("base_version", 1) >= 2

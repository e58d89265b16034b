"""Which embedded base ships: tests written for the v2 base of issue 13 wait for it."""

import json

from sdlora.pipelines import embedded_path


def base_v2() -> bool:
    """The embedded base ($SDLORA_EMBEDDED, else samples/embedded) is v2 (texture-corpus VAE); v1's BUILD.json
    has no base_version. With SDLORA_EMBEDDED pointing at a built v2 folder, its tests run against it."""
    return json.loads((embedded_path() / "BUILD.json").read_text()).get("base_version", 1) >= 2

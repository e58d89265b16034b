"""The canonical, in-memory form of an adapter file, whatever layout it came in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROLES = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class ModuleWeights:
    """One adapted module, as every format and tool sees it: `down`, `up` and `scale` are the equivalent
    LoRA pair (D = scale * up @ down, exactly, for every low-rank method), what kohya and diffusers files
    hold; `parts` are the method's own stored tensors beyond that pair (DoRA's magnitude (out,), VeRA's
    vectors d (r,) and b (out,)), which sdlora files keep. The method's class (sdlora.adapters.registry)
    turns a loaded adapter into this and back."""

    method: str  # a registry name: "lora" | "dora" | "vera" | "loha" | "lokr" | ...
    down: torch.Tensor | None  # (r, in) or (r, in, kh, kw); None for a dense delta
    up: torch.Tensor | None  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r as applied
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: torch.Tensor | None = None  # LoHa/LoKr: D itself, the layer's weight shape or (out, in*kh*kw)

    @property
    def magnitude(self) -> torch.Tensor | None:
        """DoRA's per-output magnitude (out,), which kohya (dora_scale) and diffusers files also name."""
        return self.parts.get("magnitude")

    @property
    def rank(self) -> int:
        """The pair's rank; for a dense delta, the largest rank it can have."""
        if self.dense is not None:
            return min(self.dense.shape[0], self.dense[0].numel())
        return self.down.shape[0]

    @property
    def alpha(self) -> float:
        """The alpha that gives this scale under the plain alpha / r rule (what kohya and PEFT store)."""
        return self.scale * self.rank


@dataclass
class AdapterFile:
    """modules: "role/module.path" -> weights, e.g. "unet/down_blocks.0.attentions.0...to_q"."""

    modules: dict[str, ModuleWeights]
    method: str
    base_family: str | None = None
    format: str = "sdlora"
    config: dict = field(default_factory=dict)  # the AdapterConfig fields, targets, VeRA seed
    trigger_words: list[str] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    extra_metadata: dict = field(default_factory=dict)  # metadata we read but do not interpret

    def dense_modules(self) -> list[str]:
        return [k for k, m in self.modules.items() if m.dense is not None]

    def roles(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.modules})

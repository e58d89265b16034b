"""The canonical, in-memory form of an adapter file, whatever layout it came in."""

from __future__ import annotations

import math
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
        """Modules held only as a dense delta (no parts of their method to write back)."""
        return [k for k, m in self.modules.items() if m.dense is not None and not m.parts]

    def roles(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.modules})


def scalar(t: torch.Tensor, what: str) -> float:
    """A one-number tensor (alpha, scale) as a float, or one clear error naming it. what: "FILE: 'key'"."""
    from ..errors import SdloraError

    if not torch.is_tensor(t) or t.numel() != 1 or not (t.is_floating_point() or t.dtype in _INTS):
        shape = list(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise SdloraError(f"{what} has shape {shape}, but it must hold one number", "re-export the adapter")
    value = float(t)
    if not math.isfinite(value):
        raise SdloraError(f"{what} is {value}, not a finite number", "re-export the adapter")
    return value


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate(af: AdapterFile, path: str, allow_empty: bool = False) -> None:
    """Every module's tensors are what the formula D = scale * up @ down (or a dense D) needs: floating point,
    finite, 2-D or 4-D, ranks that agree, a 4-D up of (out, r, 1, 1), magnitudes of (out,). Run on every file
    read and on every adapter about to be written, so that no command writes what nothing can load."""
    from ..errors import SdloraError

    if not af.modules and not allow_empty:  # on read, the base check says better what matched nothing
        raise SdloraError(f"{path}: no adapter modules", "pass a file with at least one adapted layer")
    for key, m in af.modules.items():
        where = f"{path}: module '{key}'"
        tensors = {"down": m.down, "up": m.up, "dense": m.dense, **m.parts}
        for part, t in tensors.items():
            if t is None:
                continue
            if t.dtype not in _FLOATS:
                raise SdloraError(f"{where}: '{part}' is {str(t.dtype).removeprefix('torch.')}, not floating point",
                                  "adapter weights are float16, bfloat16 or float32 tensors; re-export the adapter")
            if not torch.isfinite(t).all():
                raise SdloraError(f"{where}: '{part}' holds NaN or infinite values",
                                  "check the weights given (a huge merge weight overflows) or re-export the adapter")
        if not math.isfinite(m.scale):
            raise SdloraError(f"{where}: its scale {m.scale} is not finite", "check the weights given")
        if m.dense is not None:
            continue
        if m.down is None or m.up is None:
            raise SdloraError(f"{where} lacks its down or up weight", "re-export the adapter")
        down, up = m.down, m.up
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise SdloraError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} are not both 2-D (linear) "
                              "or both 4-D (convolution)", "re-export the adapter")
        if up.shape[1] != down.shape[0] or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise SdloraError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} do not pair (up must be "
                              f"(out, r{', 1, 1' if up.dim() == 4 else ''}) for a down of (r, in...); is one transposed?)",
                              "re-export the adapter")
        mag = m.parts.get("magnitude")
        if mag is not None and mag.numel() != up.shape[0]:
            raise SdloraError(f"{where}: DoRA magnitude of {mag.numel()} values for {up.shape[0]} outputs",
                              "re-export the adapter")


PATH_FIELDS = ("data_dir", "out_dir", "base", "validation_prompt_file")


def public_training(training: dict) -> dict:
    """The training summary as an exported file carries it: folder paths cut to their last part ("/home/me/
    private/cats" -> "cats"), so a file shared with others does not tell where its maker keeps things."""
    from pathlib import PurePath

    out = dict(training)
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str) and ("/" in out[key] or "\\" in out[key]):
            out[key] = PurePath(out[key]).name
    return out

"""What every adapter method provides (to the layer wrapper, to the files), and the base layer's geometry.

One class per method, one module per class (lora.py, dora.py, vera.py, delta.py), each building itself
(`create`, from an AdapterConfig), turning itself into and from its stored parts (`to_weights`,
`from_weights`, `file_parts`, `from_file_parts`) and computing its delta; registry.py maps names to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SdloraError
from ..formats.adapter import ModuleWeights
from .functional import apply_down, apply_up


def check_rank(rank: int) -> None:
    """Before any alpha / rank is computed from it."""
    if rank < 1:
        raise SdloraError(f"rank must be at least 1, got {rank}", "pass a rank of 1 or more")


@dataclass(frozen=True)
class BaseGeometry:
    """The shape facts of a wrapped base layer that adapters are built from."""

    in_features: int  # Linear in_features, or Conv2d in_channels
    out_features: int  # Linear out_features, or Conv2d out_channels
    kernel_size: tuple[int, int] | None = None  # None: a linear layer
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def is_conv(self) -> bool:
        return self.kernel_size is not None

    @property
    def conv_args(self) -> dict | None:
        if not self.is_conv:
            return None
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, *self.kernel_size)
        return (self.out_features, self.in_features)


class Adapter(nn.Module):
    """One named adapter on one layer. Subclasses define the delta D (W0's shape):

    - low-rank methods (LoRA/LoCon, VeRA, `low_rank = True`) have D = scale * up @ down exactly with
      (down, up) = `pair()`, so the layer can run several as one concatenated-rank pair of matmuls;
    - other methods (DoRA) compute `output_delta` themselves.
    """

    method: str = ""  # its registry name, and the `method` of the ModuleWeights it writes
    low_rank: bool = True  # D = scale * up @ down exactly with (down, up) = pair(); False for DoRA, a delta
    trainable: bool = True  # AdapterConfig builds it (sdlora train --method); False: it only loads from files
    convs: bool = True  # it may sit on Conv2d layers (VeRA: linear layers only)
    # kohya and diffusers files hold it: as its equivalent pair, plus DoRA's magnitude, which both name.
    portable: bool = True

    def __init__(self, geometry: BaseGeometry, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        check_rank(rank)
        self.geometry = geometry
        self.rank = rank
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (down, up) low-rank pair of the method (DoRA: its inner LoRA)."""
        raise NotImplementedError

    def b_side(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at the higher learning rate (B, the up projection)."""
        raise NotImplementedError

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_delta(self, x: torch.Tensor, base_out_nobias: torch.Tensor, w0_fn) -> torch.Tensor:
        """D x for one input batch. `w0_fn()` gives the (dequantized) base weight on demand."""
        down, up = self.pair()
        h = apply_down(self.dropout(x), down.to(x.dtype), self.geometry.conv_args)
        return self.scale * apply_up(h, up.to(x.dtype), self.geometry.is_conv)

    # ---- building, storing and loading: what the registry dispatches to ----

    @classmethod
    def create(cls, layer, cfg, generator: torch.Generator, shared: dict) -> "Adapter":
        """A fresh adapter on `layer` (an AdapterLayer: its geometry, its base_weight()) from an AdapterConfig,
        initialised from `generator`; `shared` holds tensors shared across layers (VeRA's projections)."""
        raise SdloraError(f"adapter method '{cls.method}' cannot be built fresh, only loaded from a file",
                          "train lora, dora or vera")

    def stored_parts(self) -> dict[str, torch.Tensor]:
        """The method's own tensors beyond its equivalent pair (DoRA: magnitude)."""
        return {}

    def to_weights(self) -> ModuleWeights:
        """This adapter as a file module: the equivalent pair, the scale and the method's own parts (CPU, fp32)."""
        down, up = (t.detach().float().cpu() for t in self.pair())
        parts = {k: v.detach().float().cpu() for k, v in self.stored_parts().items()}
        return ModuleWeights(self.method, down, up, self.scale, parts)

    @classmethod
    def from_weights(cls, layer, m: ModuleWeights, *, config: dict, shared: dict) -> "Adapter":
        """The adapter a file module describes, on `layer`; `config` is the file's adapter config."""
        raise NotImplementedError

    @classmethod
    def file_parts(cls, m: ModuleWeights) -> dict[str, torch.Tensor]:
        """What an sdlora file stores for the module, under "role/path/<part>" (the scale is stored apart)."""
        return {"down": m.down, "up": m.up, **m.parts}

    @classmethod
    def from_file_parts(cls, parts: dict[str, torch.Tensor], scale: float, config: dict, where: str) -> ModuleWeights:
        """The inverse of file_parts; `where` names the file and module in errors."""
        missing = {"down", "up"} - set(parts)
        if missing:
            raise SdloraError(f"{where} lacks {sorted(missing)}", "re-export the adapter")
        rest = {k: v for k, v in parts.items() if k not in ("down", "up")}
        return ModuleWeights(cls.method, parts["down"], parts["up"], scale, rest)

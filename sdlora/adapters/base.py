"""What every adapter method provides to the layer wrapper, and the base layer's geometry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SdloraError
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

    method: str = ""

    def __init__(self, geometry: BaseGeometry, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        check_rank(rank)
        self.geometry = geometry
        self.rank = rank
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    low_rank: bool = True  # D = scale * up @ down exactly; False for DoRA

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

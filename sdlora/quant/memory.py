"""Memory accounting of a (partly) quantized model: the bytes its tensors hold, quantization constants
included, and its parameter count as the float model would have it. Knows bitsandbytes only through
quant.layers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import QuantConv2d, is_quantized, quant_constant_bytes, quant_state_bytes


@dataclass(frozen=True)
class QuantReport:
    linear: int  # layers quantized
    conv: int
    params: int  # parameters of the whole model, counted as float weights
    resident_bytes: int  # bytes the model's tensors hold now, quantization constants included
    embedding: int = 0  # token tables quantized

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.resident_bytes / self.params

    def __str__(self) -> str:
        return (f"{self.linear} linear, {self.conv} conv and {self.embedding} embedding layers quantized; {self.params:,} parameters in "
                f"{self.resident_bytes:,} bytes = {self.bits_per_param:.2f} bits per parameter")


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, with bitsandbytes' quantization constants
    (absmax per block, the NF4 code book, int8 row scales) that live outside the parameters."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size() + quant_state_bytes(t)
    return total + sum(quant_constant_bytes(m) for m in model.modules())


def float_param_count(model: nn.Module) -> int:
    """Parameters as the float model holds them: a quantized layer counts its full (out, in[, kh, kw])
    weight and bias, not its packed bytes."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            n += m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            n += 0 if m.bias is None else m.bias.numel()
        elif hasattr(m, "in_features") and is_quantized(m):
            n += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
        elif hasattr(m, "num_embeddings") and is_quantized(m):
            n += m.num_embeddings * m.embedding_dim
        else:
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


def report(model: nn.Module, linear: int, conv: int, embedding: int = 0) -> QuantReport:
    return QuantReport(linear, conv, float_param_count(model), resident_bytes(model), embedding)

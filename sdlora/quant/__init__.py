"""The frozen base in NF4 (double-quantized), FP4 or int8: layers.py holds the quantized layers and is
sdlora's one importer of bitsandbytes; memory.py counts what they hold. The adapters call
`dequantized_weight` and never get imported back (as PEFT's layers call a dequantize function)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import (QuantConv2d, bitsandbytes, dequantized_weight, float_state_dict, int8_row_scales,
                     is_adapter_wrapper, is_quantized, quantize_layers, quantize_linear, requantized)
from .memory import QuantReport, float_param_count, report, resident_bytes


def quantize_model(model: nn.Module, mode: str = "nf4", *, double_quant: bool = True, convs: bool = True,
                   compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   min_features: int = 16, embeddings: bool = True, bnb_forward: bool = False) -> QuantReport:
    """Replace the model's Linear layers (and with convs=True its Conv2d layers, in NF4; with embeddings=True
    its token tables, in 4 bits) in place (quant.layers.quantize_layers says how) and report the layers
    replaced and the bytes held. bnb_forward=True keeps bitsandbytes' own Linear4bit forward (see quantize_linear)."""
    counts = quantize_layers(model, mode, double_quant=double_quant, convs=convs, compute_dtype=compute_dtype,
                             device=device, min_features=min_features, embeddings=embeddings,
                             bnb_forward=bnb_forward)
    return report(model, *counts)


__all__ = ["QuantConv2d", "QuantReport", "bitsandbytes", "dequantized_weight", "float_param_count", "float_state_dict",
           "int8_row_scales", "is_adapter_wrapper", "is_quantized", "quantize_layers", "quantize_linear",
           "quantize_model", "report", "requantized", "resident_bytes"]

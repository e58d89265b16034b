"""Quantized base layers through bitsandbytes; the only module of sdlora that imports it.

Linear layers become QuantLinear4bit, a bitsandbytes Linear4bit whose CPU forward dequantizes through
quant.fast4bit (NF4 or FP4, optionally double-quantized: the per-block absmax constants are themselves
quantized to 8 bits), or Linear8bitLt (int8, one scale
per output row). Beyond what the peers do, Conv2d layers can become NF4 too (QuantConv2d: the
weight is stored as NF4 and dequantized on the fly for each call), since convolutions hold most
of an SD UNet's weights. bitsandbytes quantizes a parameter when it is moved with .to(device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_invariance import conv2d
from ..choices import QUANT_MODES
from ..errors import SdloraError
from .fast4bit import dequantize_fresh, dequantize_scratch, linear_class, row_chunks


def _bnb():
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional CPU kernel notice
    import bitsandbytes as bnb

    return bnb


def _params4bit(weight: torch.Tensor, quant_type: str, double_quant: bool):
    bnb = _bnb()
    return bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=double_quant,
                             quant_type=quant_type)


class _FrozenQuantConv(torch.autograd.Function):
    """conv2d with a frozen 4-bit weight. Autograd's own conv2d would keep the dequantized weight
    (out*in*kh*kw floats per layer, 2.4 GB for SD1.5's convolutions) alive from the forward to the
    backward pass; here the backward dequantizes again, as bitsandbytes' 4-bit matmul does, and
    only the input's gradient is computed (the base gets none)."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype, ctx.x_shape = layer, dtype, x.shape
        return layer.conv_by_chunks(x, dtype, F.conv2d)  # training: the plain kernel

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad_out = grad_out.to(ctx.dtype)
        grad_x = None
        # x's gradient sums over the output channels: each chunk of them adds its part, (N, C, H, W).
        for r0, r1, rows in layer.weight_chunks(ctx.dtype):
            part = torch.nn.grad.conv2d_input(ctx.x_shape, rows.view(r1 - r0, *layer.weight_shape[1:]),
                                              grad_out[:, r0:r1], layer.stride, layer.padding, layer.dilation)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


class QuantConv2d(nn.Module):
    """A Conv2d whose weight (out, in, kh, kw) is held as 4-bit blocks of the flattened
    (out, in*kh*kw) matrix, dequantized to the compute dtype at every call."""

    def __init__(self, conv: nn.Conv2d, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise SdloraError(f"cannot quantize {conv}: grouped or non-zero-padded convolutions are not supported",
                              "leave this layer in float (quantize with convs=False)")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = 1, "zeros"
        self.compute_dtype = compute_dtype
        self.quant_type, self.double_quant = quant_type, double_quant
        # Moving a Params4bit to a device is what quantizes it: done here, so no float copy lingers.
        self.weight = _params4bit(conv.weight.reshape(conv.out_channels, -1), quant_type, double_quant).to(device)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone().to(device),
                                                                requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        bnb = _bnb()
        flat = dequantize_fresh(bnb, self.weight.data, self.weight.quant_state)
        return flat.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def dequantize_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """dequantize().to(dtype), bit for bit, in this thread's scratch buffer (quant.fast4bit): for
        one conv call only, never to be kept."""
        flat = dequantize_scratch(_bnb(), self.weight.data, self.weight.quant_state, dtype)
        return flat.view(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def weight_chunks(self, dtype: torch.dtype):
        """(r0, r1, rows): the dequantized weight by output channels, rows (r1 - r0, in*kh*kw) in the scratch
        buffer, one chunk when it is small (quant.fast4bit.row_chunks says why large ones are split)."""
        return row_chunks(_bnb(), self.weight.data, self.weight.quant_state, dtype)

    def conv_by_chunks(self, x: torch.Tensor, dtype: torch.dtype, conv) -> torch.Tensor:
        """conv(x, weight, bias, ...) computed by chunks of output channels: x (N, C, H, W) -> (N, O, H', W'). Each
        output channel is the same sum over x as in one call, and is written into its place."""
        out = None
        for r0, r1, rows in self.weight_chunks(dtype):
            b = None if self.bias is None else self.bias[r0:r1].to(dtype)
            y = conv(x, rows.view(r1 - r0, *self.weight_shape[1:]), b, self.stride, self.padding, self.dilation)
            if r0 == 0 and r1 == self.out_channels:
                return y
            if out is None:
                out = y.new_empty(y.shape[0], self.out_channels, *y.shape[2:])
            out[:, r0:r1] = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype if x.dtype == torch.float32 else x.dtype
        if torch.is_grad_enabled() and x.requires_grad:  # training through the layer: see _FrozenQuantConv
            return _FrozenQuantConv.apply(x.to(dtype), self, dtype).to(x.dtype)
        return self.conv_by_chunks(x.to(dtype), dtype, conv2d).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, 4-bit"


def is_adapter_wrapper(module: nn.Module) -> bool:
    """An adapter wrapper (sdlora.adapters.AdapterLayer) around a base layer, told by its two attributes:
    the adapters import this module (to dequantize their base weight), never the other way round."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "adapters", None), nn.ModuleDict)


def bitsandbytes():
    """The bitsandbytes module, for the few others that need it (the 8-bit optimizers): imported here only."""
    return _bnb()


def is_quantized(layer: nn.Module) -> bool:
    bnb = _bnb()
    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, QuantConv2d, bnb.nn.Embedding4bit))


# Embedding tables of at least this many weights are quantized: a text encoder's token table (CLIP-L's
# 49408 x 768 = 38M of its 123M parameters, which kept the encoder at 12.8 bits per parameter in float);
# position tables (77 x 768) are too small to matter and stay float.
MIN_EMBEDDING = 2**20


def quantize_embedding(layer: nn.Embedding, mode: str, double_quant: bool = True,
                       device: str | torch.device = "cpu") -> nn.Module | None:
    """A token table in 4 bits (bitsandbytes' Embedding4bit: rows dequantized as they are looked up), or None
    for int8 (bitsandbytes' 8-bit table keeps a float copy on the CPU; the table stays float)."""
    if mode not in ("nf4", "fp4") or layer.padding_idx is not None or layer.max_norm is not None:
        return None
    bnb = _bnb()
    q = bnb.nn.Embedding4bit(layer.num_embeddings, layer.embedding_dim, quant_type=mode)
    q.weight = _params4bit(layer.weight, mode, double_quant)
    return q.to(device)  # bitsandbytes quantizes here


def quantize_linear(layer: nn.Linear, mode: str, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    bnb_forward: bool = False) -> nn.Module:
    """bnb_forward=True: a plain Linear4bit with bitsandbytes' own forward, as diffusers builds it (the
    bench's reference); otherwise QuantLinear4bit, the same values faster on the CPU."""
    bnb = _bnb()
    has_bias = layer.bias is not None
    if mode in ("nf4", "fp4"):
        cls = bnb.nn.Linear4bit if bnb_forward else linear_class(bnb)
        q = cls(layer.in_features, layer.out_features, bias=has_bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=mode)
        q.weight = _params4bit(layer.weight, mode, double_quant)
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight in place at the first eval-mode call,
        # undoing double quantization (absmax back to fp32) and changing the layout that
        # dequantize_4bit reads. Keep the standard layout: the memory figures and DoRA rely on it.
        q.support_avx512bf16_for_cpu = False
    elif mode == "int8":
        # threshold 0: no outlier decomposition, so the layer is pure int8 (what the memory figures claim).
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0)
        q.weight = bnb.nn.Int8Params(layer.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        raise SdloraError(f"unknown quantization '{mode}'", f"choose one of: {', '.join(QUANT_MODES)} (or none)")
    if has_bias:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes here


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, as a float tensor: (out, in) or (out, in, kh, kw)."""
    if isinstance(layer, QuantConv2d):
        return layer.dequantize()
    bnb = _bnb()
    if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)):
        return dequantize_fresh(bnb, layer.weight.data, layer.weight.quant_state)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, int8_row_scales(layer))
    return layer.weight


def int8_row_scales(layer: nn.Module) -> torch.Tensor:
    """Linear8bitLt's per-row absmax (out,): on the weight until the first forward, which moves
    it to the layer's matmul state."""
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def requantized(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` put through the same quantization as `layer` and back: what a layer of that kind
    holding `weight` computes with."""
    bnb = _bnb()
    weight = weight.detach().float().cpu()
    if isinstance(layer, QuantConv2d):
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bias=False)
        conv.weight.data = weight
        return QuantConv2d(conv, layer.quant_type, layer.double_quant).dequantize()
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight
    if isinstance(layer, bnb.nn.Linear4bit):
        q = quantize_linear(lin, layer.weight.quant_type, layer.weight.compress_statistics)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        q = quantize_linear(lin, "int8")
    else:
        return weight
    return dequantized_weight(q).float()


def float_state_dict(model: nn.Module, replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as its float original would have it: quantized layers dequantized,
    adapter wrappers seen through (their adapters left out), and `replace` (module name -> weight)
    used for those modules' weights."""
    replace = replace or {}
    out: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, name: str) -> None:
        if is_adapter_wrapper(module):
            visit(module.base_layer, name)  # same name: the wrapper stands where the layer stood
            return
        prefix = f"{name}." if name else ""
        if is_quantized(module):
            w = replace.get(name)
            out[prefix + "weight"] = (w if w is not None else dequantized_weight(module)).float().cpu()
            if getattr(module, "bias", None) is not None:
                out[prefix + "bias"] = module.bias.detach().float().cpu()
            return
        for pname, p in module.named_parameters(recurse=False):
            out[prefix + pname] = (replace[name] if pname == "weight" and name in replace else p).detach().cpu()
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = b.detach().cpu()
        for cname, child in module.named_children():
            visit(child, prefix + cname)

    visit(model, "")
    return out


def quantize_layers(model: nn.Module, mode: str = "nf4", *, double_quant: bool = True, convs: bool = True,
                    compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    min_features: int = 16, embeddings: bool = True, bnb_forward: bool = False) -> tuple[int, int, int]:
    """Replace the model's Linear layers (and, with convs=True, the default as in Base.quantize, its
    Conv2d layers) in place. bitsandbytes has no int8 convolution: with mode int8 the convolutions are
    quantized in NF4, and a warning says so.

    Layers narrower than `min_features` stay float: their blocks would be mostly padding. The
    model must not hold adapters yet (quantize the base, then inject) nor be quantized already.
    """
    if mode not in QUANT_MODES:
        raise SdloraError(f"unknown quantization '{mode}'", f"choose one of: {', '.join(QUANT_MODES)} (or none)")
    for name, m in model.named_modules():
        if is_quantized(m):
            raise SdloraError(f"{type(model).__name__} is already quantized ({name or 'root'} is {type(m).__name__})",
                              "quantize a float model once; reload the base to change the quantization")
        if is_adapter_wrapper(m):
            raise SdloraError(f"{type(model).__name__} already holds adapters ({name})",
                              "quantize the base first, then inject adapters")
    n_lin = n_conv = 0
    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is nn.Linear or (convs and type(m) is nn.Conv2d))]
    if mode == "int8" and any(isinstance(m, nn.Conv2d) for _, m in targets):
        import warnings

        warnings.warn("int8 has no convolution kernel in bitsandbytes: the convolutions are quantized in NF4 "
                      "(quantize with convs=False to keep them float)", stacklevel=2)
    for name, m in targets:
        small = (m.in_features if isinstance(m, nn.Linear) else m.in_channels) < min_features
        if small:
            continue
        if isinstance(m, nn.Linear):
            q = quantize_linear(m, mode, double_quant, compute_dtype, device, bnb_forward)
            n_lin += 1
        else:
            q = QuantConv2d(m, "nf4" if mode == "int8" else mode, double_quant, compute_dtype, device)
            n_conv += 1
        model.set_submodule(name, q)
    n_emb = 0
    if embeddings:
        tables = [(name, m) for name, m in model.named_modules()
                  if type(m) is nn.Embedding and m.weight.numel() >= MIN_EMBEDDING]
        for name, m in tables:
            q = quantize_embedding(m, mode, double_quant, device)
            if q is not None:
                model.set_submodule(name, q)
                n_emb += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return n_lin, n_conv, n_emb  # linear, conv and embedding layers replaced


def quant_constant_bytes(module: nn.Module) -> int:
    """Bytes of the quantization constants that live outside `module`'s own parameters and buffers:
    int8 row scales (out,) once a Linear8bitLt has run; NF4's absmax and code book sit on the weight's
    quant_state (see quant_state_bytes)."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = int8_row_scales(module)
        return scb.numel() * scb.element_size()
    return 0


def quant_state_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a 4-bit weight's quantization state: absmax per block and code book, with double
    quantization also the absmax's own absmax, code and fp32 offset; 0 for any other tensor."""
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return 0
    total = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
        total += 4  # the fp32 offset
    return total

"""Faster 4-bit dequantization on the CPU, for the frozen layers' forward and backward passes.

bitsandbytes' dequantize_4bit, called at every forward and again in every backward, spends much
of its time around its kernel: it allocates a fresh output (59 MB for a 1280x1280x3x3 conv in fp32,
page-faulted anew each time, as allocations that large go straight to the system) and a fresh absmax
(one fp32 per 64-weight block, from the double-quantized constants), through the op dispatcher. Here
the same CPU kernels of bitsandbytes' native library write into scratch buffers that are reused. The
values are bitsandbytes' own, bit for bit (tests/test_quant.py checks them against dequantize_4bit and
against the NF4/FP4 code table times each block's absmax), with one exception that is a fix: see
_kernel_rows.
A weight larger than CHUNK_BYTES is dequantized and used by chunks of its rows (output channels or
features), each product right after its chunk's dequantization, while the chunk is still in the cache.

The scratch buffers are per thread, role (weight or absmax), device and dtype, shared by all layers
and grown to the largest weight or chunk (about CHUNK_BYTES at most): the calls of one thread run one
after another, and every caller below uses the buffer only within one call (F.conv2d / F.linear /
matmul read it; nothing keeps it). So layers may run
in several threads at once (the web server's generations), at one buffer per thread. Do not hand
the result of `dequantize_scratch` to anything that keeps it: `dequantize_fresh` returns a copy.

bitsandbytes reaches this module only as an argument (quant.layers is its one importer).
"""

from __future__ import annotations

import ctypes as ct
import threading
import math
from math import gcd, prod

import torch
import torch.nn.functional as F

_scratch = threading.local()  # .buffers: {(device, dtype): flat tensor}
_KERNELS = {("nf4", torch.float32): "cdequantize_blockwise_cpu_nf4_fp32",
            ("nf4", torch.bfloat16): "cdequantize_blockwise_cpu_nf4_bf16",
            ("nf4", torch.float16): "cdequantize_blockwise_cpu_nf4_fp16",
            ("fp4", torch.float32): "cdequantize_blockwise_cpu_fp4_fp32",
            ("fp4", torch.bfloat16): "cdequantize_blockwise_cpu_fp4_bf16",
            ("fp4", torch.float16): "cdequantize_blockwise_cpu_fp4_fp16"}


def _buffer(numel: int, dtype: torch.dtype, device: torch.device, role: str = "weight") -> torch.Tensor:
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get((role, device, dtype))
    if buf is None or buf.numel() < numel:
        # A plain tensor even when first asked for under torch.inference_mode (generation): an inference
        # tensor could not be written in place later outside it (a training step, a no_grad test).
        with torch.inference_mode(False):
            buf = buffers[(role, device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _absmax(bnb, state) -> torch.Tensor:
    """The fp32 absmax per block (blocks,). Double-quantized, it is dequantized again at each call, as
    dequantize_4bit does (the same kernel, the same offset added), but into a scratch buffer of its own:
    kept per layer it would add 2 bits per weight (an fp32 per 64 weights) to a base held in about 4.1."""
    if not state.nested:
        return state.absmax if state.absmax.dtype == torch.float32 else state.absmax.float()
    s2, q = state.state2, state.absmax  # q: (blocks,) uint8 indices into s2.code, one fp32 s2.absmax per 256
    fn = getattr(bnb.functional.lib, "cdequantize_blockwise_cpu_fp32", None)
    if fn is None or s2.dtype != torch.float32 or q.dtype != torch.uint8 or not q.is_contiguous():
        absmax = bnb.functional.dequantize_blockwise(q, s2)
        absmax += state.offset
        return absmax.float()
    out = _buffer(q.numel(), torch.float32, q.device, "absmax")
    code = s2.code.to(q.device, torch.float32).contiguous()
    fn(ct.c_void_p(code.data_ptr()), ct.c_void_p(q.data_ptr()), ct.c_void_p(s2.absmax.data_ptr()),
       ct.c_void_p(out.data_ptr()), ct.c_longlong(s2.blocksize), ct.c_longlong(q.numel()))
    out += state.offset
    return out


def _kernel(bnb, packed: torch.Tensor, state, dtype: torch.dtype):
    """bitsandbytes' CPU kernel for this weight, or None where its dequantize_4bit takes another road
    (not the CPU, no native library, odd rows, AVX512 with blocks of 2048 or more, packed layouts)."""
    if packed.device.type != "cpu" or len(state.shape) < 1 or state.shape[-1] % 2:
        return None
    if getattr(state, "packing_format_for_cpu", False) or not packed.is_contiguous():
        return None
    if state.blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return None
    return getattr(bnb.functional.lib, _KERNELS.get((state.quant_type, dtype), ""), None)


def _kernel_rows(rows: int, n: int, blocksize: int) -> tuple[int, int]:
    """The (m, n) to hand bitsandbytes' CPU kernel for `rows` rows of n weights. The quantization blocks run over
    the flat weight, across rows; the kernel's AVX512 build reads them right only where each row holds whole
    blocks (n a multiple of the block size) or the weight is one row: with rows of a multiple of 16 weights
    that is not one of 64 (n = 16, 32, 48, 80, 96, 160...) it scales weights by another block's absmax (an
    (80, 48) NF4 weight comes back with a relative error of 0.40 instead of 0.09; bitsandbytes 0.50.2, whose own
    dequantize_4bit makes the same call). Such weights are handed over as one flat row, which every build reads
    right; others keep their rows, as the kernel is about twice as fast with them (a 320 x 11520 chunk: 0.26 ms
    against 0.49 ms flat)."""
    return (rows, n) if n % blocksize == 0 else (1, rows * n)


def dequantize_scratch(bnb, packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The weight `state.shape` in `dtype`, as bitsandbytes.functional.dequantize_4bit(packed,
    state).to(dtype) has it, in this thread's scratch buffer: valid until this thread's next call."""
    fn = _kernel(bnb, packed, state, state.dtype)
    if fn is None:
        return bnb.functional.dequantize_4bit(packed, state).to(dtype)
    shape = tuple(state.shape)
    n = shape[-1]
    m = prod(shape[:-1]) if len(shape) > 1 else 1
    # In the stored dtype first, as dequantize_4bit: a bf16-stored weight dequantized straight to fp32
    # would be more precise than bitsandbytes' values, so not theirs.
    out = _buffer(m * n, state.dtype, packed.device)
    absmax = _absmax(bnb, state)
    km, kn = _kernel_rows(m, n, state.blocksize)
    fn(ct.c_void_p(packed.data_ptr()), ct.c_void_p(absmax.data_ptr()), ct.c_void_p(out.data_ptr()),
       ct.c_longlong(state.blocksize), ct.c_longlong(km), ct.c_longlong(kn))
    if dtype != state.dtype:  # .to(dtype), into the buffer of that dtype
        out = _buffer(m * n, dtype, packed.device).copy_(out)
    return out.view(shape)


def dequantize_fresh(bnb, packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, state), read as the layers' forward reads it (_kernel_rows),
    in a tensor of its own: what dequantized_weight and QuantConv2d.dequantize return."""
    return dequantize_scratch(bnb, packed, state, state.dtype).clone()


# A dequantized weight larger than this is made and used in row chunks of about this size (QuantConv2d): a
# 1280x1280x3x3 convolution is 59 MB in fp32, past this machine's 32 MB L3 cache, so dequantizing it whole
# writes it out to memory and oneDNN reads it back (and writes its own blocked copy) for a picture of 8x8 or
# 4x4 latents; in four chunks each stays in the cache. tests/bench/conv_micro.py, 1280 channels, batch 2: at 4x4
# 56 -> 28 ms, at 8x8 63 -> 50 ms, both under the float convolution (49, 73 ms); at 64x64 latents, where the
# arithmetic dominates, within noise (100 -> 93 ms).
CHUNK_BYTES = 16 * 2**20


def row_chunks(bnb, packed: torch.Tensor, state, dtype: torch.dtype, max_bytes: int | None = None):
    """The weight `state.shape` (m, ...) dequantized as dequantize_scratch has it, by rows of the flattened (m, n)
    matrix: yields (r0, r1, rows) with rows (r1 - r0, n) in this thread's scratch buffer, valid until the next
    chunk is asked for. One chunk (0, m) where the weight fits max_bytes (default CHUNK_BYTES) or the kernel
    cannot start mid-weight; else chunks of equal rows, each starting on a quantization block (r0 * n a multiple
    of the block size)."""
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    shape = tuple(state.shape)
    m = shape[0]
    n = prod(shape[1:]) if len(shape) > 1 else 1
    fn = _kernel(bnb, packed, state, state.dtype)
    align = state.blocksize // gcd(n, state.blocksize)  # rows per chunk must be a multiple of this
    nbytes = m * n * torch.empty((), dtype=dtype).element_size()
    if fn is None or nbytes <= max_bytes or len(shape) < 2 or m <= align:
        yield 0, m, dequantize_scratch(bnb, packed, state, dtype).view(m, n)
        return
    count = math.ceil(nbytes / max_bytes)
    rows = math.ceil(math.ceil(m / count) / align) * align  # m / count, rounded up to a multiple of align
    absmax = _absmax(bnb, state)  # (blocks,) fp32, read by every chunk at its own offset
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        out = _buffer((r1 - r0) * n, state.dtype, packed.device)
        km, kn = _kernel_rows(r1 - r0, n, state.blocksize)
        # packed holds two 4-bit weights per byte; absmax one fp32 per block of the flat weight.
        fn(ct.c_void_p(packed.data_ptr() + r0 * n // 2), ct.c_void_p(absmax.data_ptr() + r0 * n // state.blocksize * 4),
           ct.c_void_p(out.data_ptr()), ct.c_longlong(state.blocksize), ct.c_longlong(km), ct.c_longlong(kn))
        if dtype != state.dtype:
            out = _buffer((r1 - r0) * n, dtype, packed.device).copy_(out)
        yield r0, r1, out.view(r1 - r0, n)


QuantLinear4bit = None  # the class, once linear_class has made it


def linear_by_chunks(bnb, x: torch.Tensor, layer, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, bias) with the 4-bit W (out, in) dequantized by chunks of output features (row_chunks):
    x (..., in) -> (..., out). A large W (SD1.5's and SDXL's 1280 -> 10240 feed-forward, 52 MB in fp32) then stays
    in the cache between its dequantization and its product: 1280 -> 10240 over 128 rows 43 -> 28 ms here, and the
    thread's scratch buffer is CHUNK_BYTES rather than W's size. Each output feature is the same dot product over
    x's features as in one piece."""
    state = layer.weight.quant_state
    out = None
    for r0, r1, rows in row_chunks(bnb, layer.weight.data, state, x.dtype):
        y = F.linear(x, rows, None if bias is None else bias[r0:r1])
        if r0 == 0 and r1 == state.shape[0]:
            return y
        if out is None:
            out = y.new_empty(*y.shape[:-1], state.shape[0])
        out[..., r0:r1] = y
    return out


class FrozenQuantLinear(torch.autograd.Function):
    """x @ W.T + b with a frozen 4-bit W (out, in): the forward and the backward each dequantize W
    into the scratch buffer (nothing of W is saved between them, as in bitsandbytes' MatMul4Bit),
    and only x's gradient is computed."""

    @staticmethod
    def forward(ctx, x, layer, bias, bnb):
        ctx.layer, ctx.bnb = layer, bnb
        return linear_by_chunks(bnb, x, layer, bias)

    @staticmethod
    def backward(ctx, grad_out):
        state = ctx.layer.weight.quant_state
        grad_x = None
        # x's gradient sums over the output features, (..., in): each chunk of them adds its part.
        for r0, r1, rows in row_chunks(ctx.bnb, ctx.layer.weight.data, state, grad_out.dtype):
            part = torch.matmul(grad_out[..., r0:r1], rows)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None


def linear_class(bnb):
    """bitsandbytes' Linear4bit with the forward above: a subclass, so that everything that knows a
    Linear4bit (quant_state, state dicts, memory figures, requantizing) knows this one too. Made once,
    when bitsandbytes is first imported, and published as fast4bit.QuantLinear4bit (for pickle)."""
    global QuantLinear4bit
    if QuantLinear4bit is not None:
        return QuantLinear4bit

    class QuantLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
            if not self.compute_type_is_set:  # as Linear4bit: fp32 and bf16 inputs set the compute dtype
                self.set_compute_type(x)
                self.compute_type_is_set = True
            inp_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            if x.device.type != "cpu" or x.numel() == 0 or x.shape[-1] != self.in_features:
                return super().forward(x).to(inp_dtype)  # GPUs and edge cases: bitsandbytes' own forward
            if torch.is_grad_enabled() and x.requires_grad:
                return FrozenQuantLinear.apply(x, self, bias, bnb).to(inp_dtype)
            return linear_by_chunks(bnb, x, self, bias).to(inp_dtype)

    QuantLinear4bit.__module__, QuantLinear4bit.__qualname__ = __name__, "QuantLinear4bit"
    return QuantLinear4bit

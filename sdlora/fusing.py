"""Fuse a mix into base weights and restore them bit for bit, without a second full copy of every weight.

Fusing writes W' = fl(W + D) in place (AdapterLayer.add_delta_, D the mix's delta of that layer). Saving W
whole to restore it doubles the memory of every weight touched (gigabytes for SDXL with `linear` targets).
What rounding loses is little: R = fl(W' - D) already equals W in most elements (about 93% for a delta of
a thousandth of the weights). So a layer keeps only the elements where R's bits differ from W's (their
flat indices, int32, and W's values there); restoring recomputes D from the same adapters, forms R and puts
those elements back: W again, bit for bit (bits compared, so -0.0 and 0.0 count as different).

Layers with an adapter whose delta reads W itself (DoRA) keep a full copy: after fusing, W is gone, and D
could not be recomputed from it. A layer where more than half the elements differ keeps a full copy too
(the indices would cost more).

That restore recomputes D: a switch between two fused mixes then costs three products per layer (restore,
fuse, the rounding check), slower than diffusers' unfuse + fuse. A Mixer therefore keeps the originals off
the device (Originals): a CUDA weight's in host memory, a CPU weight's in a temporary file, whose pages the
operating system keeps in its cache while memory is free and on disk when it is not, never in the process's
own memory. Base weights are frozen, so each is written once and serves every later fuse; a restore is a
copy back and a switch one product per layer. Where the store cannot be written (no space in the temporary
folder, a weight that is not contiguous), the rounding scheme above runs instead.
"""

from __future__ import annotations

import os
import tempfile

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


class Saved:
    """What restores one fused weight: either W whole, or (indices, values) of the elements R misses."""

    def __init__(self, weight: torch.Tensor, full: torch.Tensor | None = None, layer=None, weights=None,
                 index: torch.Tensor | None = None, values: torch.Tensor | None = None, store=None):
        self.weight, self.full, self.layer, self.weights, self.index, self.values, self.store = (
            weight, full, layer, weights, index, values, store)

    def nbytes(self) -> int:
        held = [t for t in (self.full, self.index, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def restore(self) -> None:
        if self.store is not None:
            self.store.restore(self.weight)
            return
        if self.full is not None:
            self.weight.data.copy_(self.full)
            return
        w = self.weight.data
        w.sub_(_delta(self.layer, self.weights, w))  # R = fl(W' - D), in place: no full-size temporary beyond D
        w.view(-1)[self.index.long()] = self.values


def _delta(layer, weights: dict, like: torch.Tensor) -> torch.Tensor:
    """D of a low-rank-only layer, computed as add_delta_ computes it (into zeros: the same products)."""
    d = torch.zeros_like(like)
    layer.add_delta_(d, weights)
    return d


def fuse_layer(layer, weights: dict[str, float], originals: "Originals | None" = None) -> Saved:
    """Fuse `weights` (adapter name -> weight) into the layer's base weight in place; what restores it:
    the original in `originals` when given and writable, else what rounding loses (or a full copy)."""
    weight = layer.base_layer.weight
    w = weight.data
    if originals is not None and originals.keep(weight):
        layer.add_delta_(w, weights)
        return Saved(weight, store=originals)
    if any(not layer.adapters[n].low_rank for n in weights) or w.dtype not in _INT_VIEW:
        full = w.clone()
        layer.add_delta_(w, weights)
        return Saved(weight, full=full)
    original_bits = _bits(w).clone()  # one layer's copy at a time, dropped before the next layer
    layer.add_delta_(w, weights)
    try:
        d = _delta(layer, weights, w)
        index = (_bits(w - d) != original_bits).view(-1).nonzero().squeeze(1)  # where rounding lost W
        del d
    except BaseException:  # e.g. out of memory: this layer goes back before the caller restores the others
        _bits(w).copy_(original_bits)
        raise
    if 2 * index.numel() > w.numel():
        return Saved(weight, full=original_bits.view(w.dtype))
    values = original_bits.view(-1)[index].view(w.dtype).clone()
    return Saved(weight, layer=layer, weights=dict(weights), index=index.to(torch.int32), values=values)


class _Slot:
    """Where one weight's original lies, and what it was when written: its storage, version counter, and a
    sample of its bits (edits through .data pass the version counter by)."""

    def __init__(self, offset: int, nbytes: int):
        self.offset, self.nbytes = offset, nbytes
        self.key: tuple | None = None
        self.sample: torch.Tensor | None = None
        self.host: torch.Tensor | None = None  # CUDA weights: the original in host memory


def _sample(w: torch.Tensor) -> torch.Tensor:
    flat = _bits(w).view(-1)
    return flat[:: max(1, flat.numel() // 64)].clone()  # up to ~64 elements spread over the weight


class Originals:
    """Base weights' originals kept off the device, each written once (see the module's docstring)."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self._file = None  # a temporary file, unlinked on creation: nothing is left behind
        self._end = 0
        self._slots: dict[int, _Slot] = {}

    def _key(self, w: torch.Tensor, weight) -> tuple:
        return (w.data_ptr(), weight._version, tuple(w.shape), w.dtype, w.device)

    def keep(self, weight) -> bool:
        """Make sure the store holds `weight`'s current values; False where it cannot (the caller falls back)."""
        w = weight.data
        if w.dtype not in _INT_VIEW or not w.is_contiguous():
            return False
        slot = self._slots.get(id(weight))
        key = self._key(w, weight)
        if slot is not None and slot.key == key and torch.equal(_sample(w), slot.sample):
            return True  # written before and unchanged since
        nbytes = w.numel() * w.element_size()
        try:
            if slot is None or slot.nbytes != nbytes:
                slot = _Slot(self._end, nbytes)
                self._end += nbytes
            if w.device.type == "cpu":
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="sdlora-originals-", dir=self.directory)
                _write_all(self._file.fileno(), memoryview(_bits(w).numpy()).cast("B"), slot.offset)
            else:
                slot.host = w.detach().to("cpu", copy=True)
        except (OSError, ValueError):  # no space or no temporary folder: the rounding scheme instead
            self._slots.pop(id(weight), None)
            return False
        slot.key, slot.sample = key, _sample(w)
        self._slots[id(weight)] = slot
        return True

    def restore(self, weight) -> None:
        """The original back into `weight` (fused since keep()), bit for bit."""
        w, slot = weight.data, self._slots[id(weight)]
        if slot.host is not None:
            w.copy_(slot.host)
        else:
            _read_all(self._file.fileno(), memoryview(_bits(w).numpy()).cast("B"), slot.offset)
        slot.key, slot.sample = self._key(w, weight), _sample(w)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._end, self._slots = None, 0, {}


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less than asked
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _read_all(fd: int, buffer: memoryview, offset: int) -> None:
    while buffer:
        done = os.preadv(fd, [buffer], offset)
        if done == 0:
            raise OSError(f"the stored original weight ended {len(buffer)} bytes early")
        buffer, offset = buffer[done:], offset + done

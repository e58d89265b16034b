"""A Mix: which adapters, with which weights, for the length of one call.

    with mixer.apply(Mix({"style": 0.8, "ink": AdapterWeights(unet=0.5, text_encoder=0.0)})):
        pipe(...)

A mix means W = W0 + sum_i w_i * D_i for every adapted layer, where w_i is the adapter's UNet or
text-encoder weight times its per-block weight, and zero outside its step range. Three modes give
the same result:
- fused: float bases only; sum_i w_i D_i is added into the weights on entry and the original
  weights are copied back on exit, bit for bit (zero per-step cost);
- unfused: the layers add sum_i w_i D_i x at every call (quantized bases, step ranges);
- per_sample: a list of mixes, one per sample of the batch, in one forward pass; with
  classifier-free guidance the batch is doubled and the weights follow;
- grouped: a list of mixes in one forward pass where each picture's rows are computed as its mix alone
  computes them (fused weights where a lone call would fuse, the same products and sums), so a picture
  gets the same bits whatever shares its batch: the server's batched requests (sdlora/batching.py).
  An adapted layer runs one product per distinct mix, with no delta products (a pass of 8 on the
  embedded base: 4.8 s against per_sample's 5.5 s).
Leaving `apply` always restores the model, and a Mixer's lock keeps fused calls from overlapping
any other call on the same weights.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .adapters.context import reset_mix, set_mix
from .adapters.layer import AdapterLayer
from .block_weights import block_factor, check_keys
from .errors import SdloraError
from .quant import is_quantized

MODES = ("auto", "fused", "unfused", "per_sample", "grouped")
BLOCKS = ("down", "mid", "up")


# The largest |weight| of an adapter in a mix or a merge: ComfyUI's LoraLoader bounds its strengths to the same
# +-100. Beyond it a weight is a typo (1e308 overflows to inf and draws black), not a setting.
WEIGHT_LIMIT = 100.0


def check_weight(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SdloraError(f"{what} must be a number, got {value!r}", "pass a finite number such as 0.8") from None
    if not math.isfinite(value) or abs(value) > WEIGHT_LIMIT:
        raise SdloraError(f"{what} must be a number from -{WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}, got {value}",
                          "pass a number such as 0.8")
    return value


_check_weight = check_weight


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's weights in a mix. `blocks` multiplies the weight per block: groups (down, mid, up), diffusers
    block indices (down.1, up.0) or LoRA Block Weight names (BASE for the text encoders, IN05, M00, OUT03; the
    most specific key covering a layer wins, see sdlora/block_weights.py); `steps` = (a, b) applies the adapter
    from denoising step a to step b - 1."""

    unet: float = 1.0
    text_encoder: float = 1.0
    blocks: Mapping[str, float] | None = None
    steps: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "unet", _check_weight(self.unet, "UNet weight"))
        object.__setattr__(self, "text_encoder", _check_weight(self.text_encoder, "text-encoder weight"))
        if self.blocks is not None:
            check_keys(self.blocks)
            object.__setattr__(self, "blocks", {k: _check_weight(v, f"block weight '{k}'") for k, v in self.blocks.items()})
        if self.steps is not None:
            a, b = self.steps
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
                raise SdloraError(f"step range {self.steps} is not 0 <= a < b", "pass e.g. steps=(0, 10)")

    def weight_for(self, region: str, step: int) -> float:
        if self.steps is not None and not self.steps[0] <= step < self.steps[1]:
            return 0.0
        w = self.unet if region.startswith("unet") else self.text_encoder
        return w * block_factor(self.blocks, region) if self.blocks else w


@dataclass(frozen=True)
class Mix:
    """Adapter name -> weights. A bare number means the same weight for UNet and text encoder."""

    adapters: Mapping[str, AdapterWeights] = field(default_factory=dict)

    def __post_init__(self):
        norm = {}
        for name, w in dict(self.adapters).items():
            if isinstance(w, AdapterWeights):
                norm[name] = w
            else:
                v = _check_weight(w, f"weight of adapter '{name}'")
                norm[name] = AdapterWeights(unet=v, text_encoder=v)
        object.__setattr__(self, "adapters", norm)

    @property
    def has_step_ranges(self) -> bool:
        return any(w.steps is not None for w in self.adapters.values())


class _RWLock:
    """Many unfused calls share the base weights; a fused call owns them alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def fuse_weights(layer: AdapterLayer, mix: Mix) -> dict[str, float]:
    """Adapter name -> weight that a fused `mix` adds into `layer` (zero weights left out, the mix's order)."""
    weights = {n: w.weight_for(layer.region, 0) for n, w in mix.adapters.items() if n in layer.adapters}
    return {n: w for n, w in weights.items() if w != 0.0}


# A grouped pass keeps each distinct mix's fused weights for its length while they fit in this many bytes;
# beyond it they are formed again at every call (one product per layer and mix).
GROUPED_CACHE_BYTES = 1 << 30


class GroupedLayout:
    """One adapted layer's rows in a grouped pass, for a batch size. Mix k's rows (plan.row_groups) go
    either to the fused chunks, computed with mix k's fused weight, where mix k alone would fuse into this
    layer, or to the base chunk (the base over all of them once, then the unfused delta of mix k added at
    `pos` of that chunk where mix k adapts the layer). Rowwise layers (a (batch, channels) input) put each
    row in a chunk of its own, as a lone call runs them row by row.
    order: (B,) row indices in chunk order, or None when that is the rows' own order; sizes: the chunks'
    lengths; back: (B,) where each row's output is in chunk order, or None; fused: each fused chunk's
    (mix index, adapter weights), its weight fetched from the plan at each call (plan.fused_weight: kept
    there only within GROUPED_CACHE_BYTES, so the layout holds no weight); unfused: (k, pos (rows,) into the base chunk, rows (rows,) into the input) per adapting mix;
    plain: no mix adapts the layer (the base alone)."""

    def __init__(self, plan: "ActivePlan", layer: AdapterLayer, batch: int, rowwise: bool, device: torch.device):
        if batch % len(plan.mixes):
            raise SdloraError(f"a batch of {batch} cannot carry {len(plan.mixes)} per-sample mixes",
                              "pass one mix per prompt; guidance doubles the batch by itself")
        groups = plan.row_groups(batch)
        if rowwise:
            groups = [(k, [r]) for k, rows in groups for r in rows]
        fused, unfused, base_rows = [], [], []
        for k, rows in groups:
            if plan.lone_fused[k]:
                weights = fuse_weights(layer, plan.mixes[k])
                if weights:
                    fused.append((rows, (k, weights)))
                    continue
            elif any(a in layer.adapters for a in plan.mixes[k].adapters):
                unfused.append((k, rows))
            base_rows += rows
        self.plain = not fused and not unfused
        base_rows.sort()
        self.base_rows = base_rows
        order = base_rows + [r for rows, _ in fused for r in rows]
        self.sizes = [len(base_rows)] * bool(base_rows) + [len(rows) for rows, _ in fused]
        self.fused = [kw for _, kw in fused]
        at = {r: i for i, r in enumerate(base_rows)}
        self.unfused = [(k, torch.tensor([at[r] for r in rows], device=device), torch.tensor(rows, device=device))
                        for k, rows in unfused]
        in_order = order == list(range(batch))
        self.order = None if in_order else torch.tensor(order, device=device)
        self.back = None if in_order else self.order.argsort()  # the inverse permutation


class ActivePlan:
    """What the layers read during a call (see adapters/context.py)."""

    def __init__(self, mixes: list[Mix], per_sample: bool, fused: bool, grouped: bool = False,
                 lone_fused: list[bool] | None = None):
        self.mixes = mixes
        self.per_sample = per_sample
        self.fused = fused
        self.grouped = grouped  # per_sample, each picture computed as its mix alone computes it
        self.lone_fused = lone_fused or [False] * len(mixes)  # grouped: whether mix k alone would run fused
        self.step = 0  # the denoising step about to run; generation advances it
        self._groups: dict[int, list[tuple[int, list[int]]]] = {}
        self._fused: dict[tuple[int, int], torch.Tensor] = {}
        self._layouts: dict[tuple[int, int], GroupedLayout] = {}
        self._fused_bytes = 0

    def row_groups(self, batch: int) -> list[tuple[int, list[int]]]:
        """Grouped: (mix index, rows) per distinct mix; row r carries mix r % len(mixes) (guidance repeats
        the pictures: [uncond; cond])."""
        if batch not in self._groups:
            n = len(self.mixes)
            first = [next(j for j in range(n) if self.mixes[j] == self.mixes[k]) for k in range(n)]
            groups: dict[int, list[int]] = {}
            for r in range(batch):
                groups.setdefault(first[r % n], []).append(r)
            self._groups[batch] = list(groups.items())
        return self._groups[batch]

    def fused_weight(self, layer: AdapterLayer, k: int, weights: dict[str, float]) -> torch.Tensor:
        """Mix k's fused weight of `layer`, W0 + sum_i w_i D_i formed as Mixer.apply's fused mode forms it
        in place (the same add_delta_ on a copy, so the same bits); kept for the pass while they fit."""
        key = (id(layer), k)
        if key in self._fused:
            return self._fused[key]
        w = layer.base_layer.weight.detach().clone()
        layer.add_delta_(w, weights)
        nbytes = w.numel() * w.element_size()
        if self._fused_bytes + nbytes <= GROUPED_CACHE_BYTES:
            self._fused[key], self._fused_bytes = w, self._fused_bytes + nbytes
        return w

    def layout(self, layer: AdapterLayer, batch: int, rowwise: bool, device: torch.device) -> "GroupedLayout":
        """Where each row of a (batch, ...) input of `layer` is computed in a grouped pass (layer.py's
        _grouped_forward), the same at every step of the pass: worked out at the first call."""
        key = (id(layer), batch)
        if key not in self._layouts:
            self._layouts[key] = GroupedLayout(self, layer, batch, rowwise, device)
        return self._layouts[key]

    def lone_weights(self, layer: AdapterLayer, k: int) -> dict[str, float]:
        """What an unfused call with mix k alone passes `layer` now (layer_weights of a one-mix plan)."""
        return {n: w.weight_for(layer.region, self.step) for n, w in self.mixes[k].adapters.items()}

    def layer_weights(self, layer: AdapterLayer, batch: int) -> dict:
        if not self.per_sample:
            return self.lone_weights(layer, 0)
        n = len(self.mixes)
        if batch % n:
            raise SdloraError(f"a batch of {batch} cannot carry {n} per-sample mixes",
                              "pass one mix per prompt; guidance doubles the batch by itself")
        names = {a for m in self.mixes for a in m.adapters}
        out = {}
        for name in names:
            ws = [m.adapters[name].weight_for(layer.region, self.step) if name in m.adapters else 0.0 for m in self.mixes]
            # Guidance concatenates [uncond; cond]: the weights repeat over the doubled batch.
            out[name] = torch.tensor(ws, dtype=torch.float32).repeat(batch // n)
        return out


class Mixer:
    """Applies mixes to a set of adapted models (a pipeline's UNet and text encoders)."""

    def __init__(self, models: Mapping[str, nn.Module]):
        self.models = dict(models)
        self._lock = _RWLock()
        self._originals = None  # fusing.Originals, made at the first fused mix

    def layers(self) -> dict[str, AdapterLayer]:
        return {f"{role}.{name}": m for role, model in self.models.items()
                for name, m in model.named_modules() if isinstance(m, AdapterLayer)}

    def loaded(self) -> set[str]:
        return {n for layer in self.layers().values() for n in layer.adapters}

    def choose_mode(self, mixes: list[Mix], mode: str) -> str:
        if mode not in MODES:
            raise SdloraError(f"unknown mix mode '{mode}'", f"choose one of: {', '.join(MODES)}")
        if mode != "auto":
            return mode
        if len(mixes) > 1:
            return "per_sample"
        if not mixes[0].adapters:
            return "unfused"  # nothing to fuse: do not take the exclusive lock
        if mixes[0].has_step_ranges or any(is_quantized(layer.base_layer) for layer in self.layers().values()):
            return "unfused"
        return "fused"

    def _validate(self, mixes: list[Mix], mode: str) -> None:
        loaded = self.loaded()
        for mix in mixes:
            missing = sorted(set(mix.adapters) - loaded)
            if missing:
                raise SdloraError(f"the mix names adapter(s) not loaded: {', '.join(missing)}",
                                  f"load them first; loaded: {', '.join(sorted(loaded)) or 'none'}")
        if mode == "fused":
            if len(mixes) > 1 or mixes[0].has_step_ranges:
                raise SdloraError("a fused mix cannot hold per-sample mixes or step ranges", "use mode='unfused'")
            quantized = [n for n, layer in self.layers().items() if is_quantized(layer.base_layer)]
            if quantized:
                raise SdloraError(f"cannot fuse into a quantized base ({quantized[0]} is quantized)", "use mode='unfused'")
        if mode in ("per_sample", "grouped") and len(mixes) < 1:
            raise SdloraError(f"{mode} mode needs one mix per sample", "pass a list of mixes")

    @contextmanager
    def apply(self, mix: Mix | list[Mix] | None, mode: str = "auto"):
        """Apply `mix` (or a list: one per sample) for the body of the with-statement; yields the plan."""
        mixes = [mix or Mix()] if not isinstance(mix, (list, tuple)) else list(mix)
        if not mixes:
            mixes = [Mix()]
        mode = self.choose_mode(mixes, mode)
        self._validate(mixes, mode)
        # grouped: how each mix would run alone (auto), so that its rows are computed that way
        lone_fused = [self.choose_mode([m], "auto") == "fused" for m in mixes] if mode == "grouped" else None
        plan = ActivePlan(mixes, per_sample=mode in ("per_sample", "grouped"), fused=mode == "fused",
                          grouped=mode == "grouped", lone_fused=lone_fused)
        if mode == "fused":
            with self._lock.write():
                with torch.no_grad():  # only the weight edits: the caller's body keeps its grad mode
                    saved = self._fuse(mixes[0])
                token = set_mix(plan)
                try:
                    yield plan
                finally:
                    reset_mix(token)
                    with torch.no_grad():
                        for s in reversed(saved):
                            s.restore()  # the exact original bits
        else:
            with self._lock.read():
                token = set_mix(plan)
                try:
                    yield plan
                finally:
                    reset_mix(token)

    @contextmanager
    def exclusive(self):
        """No pass runs while the body does: for loading or removing adapters on shared models."""
        with self._lock.write():
            yield

    def _fuse(self, mix: Mix) -> list:
        """Fuse the mix layer by layer; what restores each weight bit for bit (sdlora/fusing.py: the originals
        off the device, written once, so a switch is a copy back and one product per layer)."""
        from .fusing import Originals, fuse_layer

        if self._originals is None:
            self._originals = Originals()
        saved = []
        try:
            for layer in self.layers().values():
                weights = fuse_weights(layer, mix)
                if not weights:
                    continue
                saved.append(fuse_layer(layer, weights, self._originals))
        except BaseException:
            for s in reversed(saved):
                s.restore()
            raise
        return saved

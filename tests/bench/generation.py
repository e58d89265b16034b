"""Generation with adapters on the SD1.5 UNet (32x32 latents, a guidance-doubled batch of 2):
time per UNet step with 0-8 adapters, switching a mix, and per-sample mixes.

Ours: a float base runs a mix fused (merged into the weights once per mix); an NF4 base runs it
unfused, all adapters as one concatenated low-rank product. Reference: diffusers + PEFT with
`set_adapters` (each active adapter computed in every forward), `fuse_lora`/`unfuse_lora`, and
PEFT's mixed-batch `adapter_names` path."""

from __future__ import annotations

import copy
import time

import torch

from sdlora.mixing import Mix
from sdlora.quant import quantize_model

from . import adapters
from .common import Row, median_time, sd15_unet

COUNTS = (0, 1, 2, 4, 8)
NAMES = [f"a{i}" for i in range(max(COUNTS))]


def _inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 32, 32, generator=g), torch.tensor([500] * batch),
            torch.randn(batch, 77, 768, generator=g))


@torch.no_grad()
def run(machine: str, runs: int = 5) -> list[Row]:
    pristine = sd15_unet()
    x, t, h = _inputs(2)
    rows: list[Row] = []

    # ---- ours ------------------------------------------------------------------------------
    ours_float = copy.deepcopy(pristine)
    _, mixer = adapters.ours(ours_float, "attn", NAMES)
    ours_nf4 = copy.deepcopy(pristine)
    quantize_model(ours_nf4, "nf4", convs=True)
    _, mixer_nf4 = adapters.ours(ours_nf4, "attn", NAMES)

    def timed(unet, mixer_, mix, mode):
        def step():
            with mixer_.apply(mix, mode=mode):
                unet(x, t, h)
        if mode == "fused":  # the fuse happens once per mix, not per step: time the steps under it
            with mixer_.apply(mix, mode="fused"):
                return median_time(lambda: unet(x, t, h), runs=runs)
        return median_time(step, runs=runs)

    ours_fused = {n: timed(ours_float, mixer, Mix({a: 1.0 / max(n, 1) for a in NAMES[:n]}), "fused")
                  for n in COUNTS}
    ours_unfused = {n: timed(ours_nf4, mixer_nf4, Mix({a: 1.0 / max(n, 1) for a in NAMES[:n]}), "unfused")
                    for n in COUNTS}

    # ---- reference -------------------------------------------------------------------------
    ref_float = adapters.reference(copy.deepcopy(pristine), "attn", NAMES)
    ref_nf4 = copy.deepcopy(pristine)
    quantize_model(ref_nf4, "nf4", convs=False)
    adapters.reference(ref_nf4, "attn", NAMES)

    def timed_ref(unet, n):
        if n == 0:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters(NAMES[:n], [1.0 / n] * n)
        return median_time(lambda: unet(x, t, h), runs=runs)

    ref_float_t = {n: timed_ref(ref_float, n) for n in COUNTS}
    ref_nf4_t = {n: timed_ref(ref_nf4, n) for n in COUNTS}

    for n in COUNTS:
        rows.append(Row(f"generate float fused, {n} adapters vs no adapters (ms/step)", ours_fused[n], ours_fused[0],
                        "ms", 1.02, machine))
    for n in COUNTS:
        rows.append(Row(f"generate float, {n} adapters: ours fused vs set_adapters (ms/step)", ours_fused[n],
                        ref_float_t[n], "ms", None, machine))
    for n in COUNTS:
        rows.append(Row(f"generate nf4 unfused, {n} adapters: ours vs set_adapters (ms/step)", ours_unfused[n],
                        ref_nf4_t[n], "ms", None, machine))
    rows.append(Row("generate nf4 unfused, 8 adapters vs 1 adapter (ms/step)", ours_unfused[8], ours_unfused[1], "ms",
                    1.15, machine))
    rows.append(Row("generate nf4 (ours, linear+conv) vs nf4 linear-only, 0 adapters (ms/step)", ours_unfused[0],
                    ref_nf4_t[0], "ms", None, machine,
                    note="our NF4 also dequantizes every convolution at each step; the reference keeps them fp32"))

    # ---- switching a 4-adapter mix to new weights --------------------------------------------
    weights = [[0.2, 0.4, 0.6, 0.8], [0.8, 0.6, 0.4, 0.2]]

    def ours_switch():
        """Leave mix A (restore the exact weights) and enter mix B (fuse): then a step can run."""
        a = mixer.apply(Mix(dict(zip(NAMES[:4], weights[0]))), mode="fused")
        a.__enter__()
        t0 = time.perf_counter()
        a.__exit__(None, None, None)
        b = mixer.apply(Mix(dict(zip(NAMES[:4], weights[1]))), mode="fused")
        b.__enter__()
        elapsed = time.perf_counter() - t0
        b.__exit__(None, None, None)
        return elapsed

    def ref_switch_set():
        ref_float.enable_adapters()
        ref_float.set_adapters(NAMES[:4], weights[0])
        t0 = time.perf_counter()
        ref_float.set_adapters(NAMES[:4], weights[1])
        return time.perf_counter() - t0

    def ref_switch_fuse():
        ref_float.set_adapters(NAMES[:4], weights[0])
        ref_float.fuse_lora(adapter_names=NAMES[:4])
        t0 = time.perf_counter()
        ref_float.unfuse_lora()
        ref_float.set_adapters(NAMES[:4], weights[1])
        ref_float.fuse_lora(adapter_names=NAMES[:4])
        elapsed = time.perf_counter() - t0
        ref_float.unfuse_lora()
        return elapsed

    def med(fn):
        fn()
        return sorted(fn() * 1000 for _ in range(runs))[runs // 2]

    s_ours, s_set, s_fuse = med(ours_switch), med(ref_switch_set), med(ref_switch_fuse)
    s_ours_unfused = med(lambda: _switch_unfused(mixer_nf4, weights))
    rows.append(Row("switch 4-adapter mix, float: ours fuse vs fuse_lora+unfuse_lora (ms)", s_ours, s_fuse, "ms", 0.5,
                    machine))
    rows.append(Row("switch 4-adapter mix, float: ours fuse vs set_adapters (ms)", s_ours, s_set, "ms", 0.5, machine,
                    note="set_adapters only sets scales; each later step then computes every adapter"))
    rows.append(Row("switch 4-adapter mix, nf4: ours unfused vs set_adapters (ms)", s_ours_unfused, s_set, "ms", 0.5,
                    machine))

    # ---- per-sample mixes: a batch of 4, each sample its own adapter ---------------------------
    x4, t4, h4 = _inputs(4)
    per_sample = [Mix({NAMES[i]: 1.0}) for i in range(4)]
    shared = Mix({NAMES[0]: 1.0})
    ours_ps = median_time(lambda: _under(mixer, per_sample, "per_sample", ours_float, x4, t4, h4), runs=runs)
    with mixer.apply(shared, mode="fused"):
        ours_shared = median_time(lambda: ours_float(x4, t4, h4), runs=runs)
    ours_shared_unfused = median_time(lambda: _under(mixer, shared, "unfused", ours_float, x4, t4, h4), runs=runs)
    ours_separate = median_time(lambda: [_under(mixer, per_sample[i], "fused", ours_float, x4[i:i + 1], t4[i:i + 1],
                                                h4[i:i + 1]) for i in range(4)], runs=runs)
    ref_float.enable_adapters()
    ref_float.set_adapters(NAMES[:4], [1.0] * 4)
    hooks = _adapter_names_hooks(ref_float, NAMES[:4])
    ref_ps = median_time(lambda: ref_float(x4, t4, h4), runs=runs)
    for hook in hooks:
        hook.remove()
    rows.append(Row("per-sample mixes, batch 4: ours vs one shared mix fused (ms)", ours_ps, ours_shared, "ms", 1.1,
                    machine))
    rows.append(Row("per-sample mixes, batch 4: ours vs one shared mix unfused (ms)", ours_ps, ours_shared_unfused, "ms",
                    None, machine))
    rows.append(Row("per-sample mixes, batch 4: ours vs 4 separate runs (ms)", ours_ps, ours_separate, "ms", None,
                    machine))
    rows.append(Row("per-sample mixes, batch 4: ours vs PEFT adapter_names (ms)", ours_ps, ref_ps, "ms", None, machine))
    return rows


def _under(mixer, mix, mode, unet, x, t, h):
    with mixer.apply(mix, mode=mode):
        return unet(x, t, h)


def _switch_unfused(mixer, weights):
    a = mixer.apply(Mix(dict(zip(NAMES[:4], weights[0]))), mode="unfused")
    a.__enter__()
    t0 = time.perf_counter()
    a.__exit__(None, None, None)
    b = mixer.apply(Mix(dict(zip(NAMES[:4], weights[1]))), mode="unfused")
    b.__enter__()
    elapsed = time.perf_counter() - t0
    b.__exit__(None, None, None)
    return elapsed


def _adapter_names_hooks(unet, names):
    """PEFT's mixed-batch inference: every LoRA layer gets `adapter_names` (one per sample), as
    PeftModel's forward hooks pass it; diffusers' UNet has no such argument of its own."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]

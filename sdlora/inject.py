"""Which modules get wrapped, and wrapping and unwrapping them; nothing more.

Targets are found by module structure and position, never by class names or name substrings:
an attention module is one with to_q, to_k, to_v and a to_out list; a transformer block
container is one with `transformer_blocks`; a CLIP layer has q/k/v/out_proj and an fc1/fc2 MLP.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .adapters import AdapterConfig, AdapterLayer
from .choices import UNET_PRESETS
from .errors import SdloraError


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, AdapterLayer):
        return not m.geometry.is_conv
    return hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight")


def _is_conv_like(m: nn.Module) -> bool:
    if isinstance(m, AdapterLayer):
        return m.geometry.is_conv
    return hasattr(m, "kernel_size") and hasattr(m, "in_channels") and hasattr(m, "weight")


def _walk(module: nn.Module, prefix: str = ""):
    """named_modules() that treats an AdapterLayer as a leaf, so injecting twice finds the
    wrapper where the base layer was, never the base layer inside it."""
    yield prefix, module
    if isinstance(module, AdapterLayer):
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _attention_projections(m: nn.Module) -> list[str]:
    if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out")) and isinstance(m.to_out, nn.ModuleList):
        return ["to_q", "to_k", "to_v", "to_out.0"]
    return []


def region_of(role: str, name: str) -> str:
    """Where per-block weights apply: 'unet' + 'down_blocks.1.attentions.1...' -> 'unet.down.1.IN05' (group, diffusers
    block index, LBW block: sdlora/block_weights.py); mid_block -> 'unet.mid.M00'; conv_in -> 'unet.in.IN00';
    other UNet layers 'unet'; text encoders their role."""
    from .block_weights import lbw_block

    parts = name.split(".")
    if role != "unet":
        return role
    block = lbw_block(name)
    if len(parts) >= 2 and parts[0] in ("down_blocks", "up_blocks"):
        return f"unet.{parts[0][:-7]}.{parts[1]}" + (f".{block}" if block else "")
    if parts[0] == "mid_block":
        return "unet.mid.M00"
    if block:
        return f"unet.in.{block}"
    return role


def unet_targets(unet: nn.Module, preset: str) -> list[str]:
    """Module names of the UNet to wrap for a preset, in module order."""
    if preset not in UNET_PRESETS:
        raise SdloraError(f"unknown target preset '{preset}'", f"choose one of: {', '.join(UNET_PRESETS)}")
    names: list[str] = []
    for name, m in _walk(unet):
        prefix = f"{name}." if name else ""
        if preset == "attn":
            names += [prefix + p for p in _attention_projections(m)]
        elif hasattr(m, "transformer_blocks"):
            # Every linear layer of the transformer: attention, feed-forward, proj_in/proj_out
            # (1x1 convolutions in SD1/SD2, linear in SDXL).
            names += [prefix + n for n, c in _walk(m) if n and (_is_linear_like(c) or _is_conv_like(c))]
        if preset == "all":
            if hasattr(m, "resnets"):
                for i, r in enumerate(m.resnets):
                    names += [f"{prefix}resnets.{i}.{n}" for n, c in _walk(r)
                              if n and (_is_conv_like(c) or _is_linear_like(c))]
            for sampler in ("downsamplers", "upsamplers"):
                if getattr(m, sampler, None) is not None:
                    names += [f"{prefix}{sampler}.{i}.conv" for i in range(len(getattr(m, sampler)))]
    return list(dict.fromkeys(names))


def text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    """q/k/v/out projections and fc1/fc2 of every CLIP encoder layer."""
    names: list[str] = []
    for name, m in _walk(text_encoder):
        prefix = f"{name}." if name else ""
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
            names += [prefix + a for a in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if hasattr(m, "fc1") and hasattr(m, "fc2") and _is_linear_like(m.fc1):
            names += [prefix + "fc1", prefix + "fc2"]
    return names


def every_layer(model: nn.Module) -> list[str]:
    """Every Linear-like or Conv2d-like module, in module order: what a file made by another trainer may
    adapt (LyCORIS's presets take time_embedding.linear_1/2, conv_in/conv_out; others SDXL's add_embedding,
    a CLIP text_projection). Grouped or padded convolutions are left out: no adapter can sit on them."""
    names = []
    for name, m in _walk(model):
        if name and (_is_linear_like(m) or _is_conv_like(m)):
            if isinstance(m, AdapterLayer) or getattr(m, "groups", 1) == 1 and getattr(m, "padding_mode", "zeros") == "zeros":
                names.append(name)
    return names


def wrap(model: nn.Module, names: list[str], role: str) -> dict[str, AdapterLayer]:
    """Wrap each named module in an AdapterLayer (once; already wrapped ones are returned as they are)."""
    wrapped: dict[str, AdapterLayer] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            wrapped[name] = module
            continue
        layer = AdapterLayer(module, region_of(role, name))
        model.set_submodule(name, layer)
        wrapped[name] = layer
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every AdapterLayer of a model by the name of the module it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def unwrap(model: nn.Module) -> int:
    """Put every wrapped base layer back where its wrapper stood; returns how many."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.base_layer)
    return len(layers)


def add_adapter(layers: dict[str, AdapterLayer], name: str, config: AdapterConfig, *,
                generator: torch.Generator | None = None, shared: dict | None = None,
                ranks: dict[str, int] | None = None) -> int:
    """Build adapter `name` on every given layer, in layer order, initialised from `generator`
    (default: one seeded with config.seed); returns the count. `shared` holds VeRA's per-shape
    projections across the layers and models of one pipeline; `ranks` gives some layers (by name) another
    rank than config.rank (block-wise ranks), alpha staying config.alpha (None: each layer's rank)."""
    if not layers:
        raise SdloraError(f"no layers to put adapter '{name}' on", "inject a target preset first")
    clash = [n for n, layer in layers.items() if name in layer.adapters]
    if clash:
        raise SdloraError(f"adapter '{name}' is already loaded", "remove it first or choose another name")
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    shared = {} if shared is None else shared
    for layer_name, layer in layers.items():
        rank = (ranks or {}).get(layer_name, config.rank)
        adapter = (config if rank == config.rank else dataclasses.replace(config, rank=rank)).build(layer, gen, shared)
        device = next(iter(layer.base_layer.parameters())).device
        layer.add_adapter(name, adapter.to(device))
    return len(layers)


def remove_adapter(layers: dict[str, AdapterLayer], name: str) -> int:
    """Take adapter `name` off the given layers; returns how many held it."""
    held = [layer for layer in layers.values() if name in layer.adapters]
    for layer in held:
        layer.remove_adapter(name)
    return len(held)


def adapter_parameters(layers: dict[str, AdapterLayer], name: str) -> list[nn.Parameter]:
    return [p for layer in layers.values() if name in layer.adapters for p in layer.adapters[name].parameters()]

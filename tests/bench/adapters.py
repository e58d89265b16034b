"""Rank-16 adapters on a UNet, ours and the reference's (diffusers + PEFT, as its docs show)."""

from __future__ import annotations

import torch

from sdlora.adapters import AdapterConfig
from sdlora.inject import add_adapter, unet_targets, wrap
from sdlora.mixing import Mixer

RANK = 16


def ours(unet, targets: str, names: list[str], std: float = 0.01):
    """Wrap the preset's layers, add one adapter per name (B non-zero, so fusing is real work)."""
    layers = wrap(unet, unet_targets(unet, targets), "unet")
    gen = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        add_adapter(layers, name, AdapterConfig(rank=RANK, alpha=RANK, seed=i))
        with torch.no_grad():
            for layer in layers.values():
                up = layer.adapters[name].up
                up.add_((torch.randn(up.shape, generator=gen) * std).to(up.device, up.dtype))
    return layers, Mixer({"unet": unet})


def reference(unet, targets: str, names: list[str], std: float = 0.01):
    """PEFT LoRA through diffusers' `add_adapter`, on the same modules as ours."""
    from peft import LoraConfig

    modules = unet_targets(unet, targets)
    gen = torch.Generator().manual_seed(0)
    for name in names:
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=modules),
                         adapter_name=name)
        with torch.no_grad():
            for module in unet.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    w = module.lora_B[name].weight
                    w.add_((torch.randn(w.shape, generator=gen) * std).to(w.device, w.dtype))
    return unet

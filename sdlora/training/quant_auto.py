"""What training's default `--quant auto` means for a given base."""

from __future__ import annotations

from torch import nn

# A UNet this small (the embedded base's has 3M parameters; SD1's 860M, SDXL's 2.6B) gains nothing from
# quantization, and its layers are so narrow that NF4's error rivals a style adapter's whole change: an
# adapter trained on the embedded base in NF4 draws noise on the float base, one trained in float draws the style.
AUTO_QUANT_MIN_PARAMS = 100_000_000


def training_quant(mode: str, unet: nn.Module) -> str:
    """nf4 if the UNet has at least AUTO_QUANT_MIN_PARAMS parameters, else none, for mode "auto";
    any other mode is returned as it is."""
    if mode != "auto":
        return mode
    return "nf4" if sum(p.numel() for p in unet.parameters()) >= AUTO_QUANT_MIN_PARAMS else "none"

"""sdlora: train, mix and export LoRA-family adapters for Stable Diffusion on a quantized base."""

__version__ = "0.1.0"

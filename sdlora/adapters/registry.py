"""Adapter methods by name: the only dispatch from a method's name (in a config, in a file) to its class.

Adding a method is one module holding its Adapter subclass (see base.py for what it provides) plus one
line here. `sdlora train --method` offers the trainable ones (sdlora.choices.TRAIN_METHODS is the CLI's
copy of that list, kept without torch so the argument parser loads fast; tests/test_cli.py holds it equal).
"""

from __future__ import annotations

from ..errors import SdloraError
from .base import Adapter
from .delta import DeltaAdapter
from .dora import DoraAdapter
from .loha import LohaAdapter
from .lokr import LokrAdapter
from .lora import LoraAdapter
from .vera import VeraAdapter

METHODS: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,  # LoRA on linear layers, LoCon on convolutions
    "dora": DoraAdapter,
    "vera": VeraAdapter,
    "loha": LohaAdapter,  # LyCORIS's LoHa, trained or read from its kohya-layout files
    "lokr": LokrAdapter,  # LyCORIS's LoKr, likewise
    "delta": DeltaAdapter,  # a dense delta W0's shape: what LoHa/LoKr modules without their parts load as
}


def method_class(name: str, where: str = "") -> type[Adapter]:
    try:
        return METHODS[name]
    except KeyError:
        raise SdloraError(f"{where}{': ' if where else ''}unknown adapter method '{name}'",
                          f"sdlora knows: {', '.join(METHODS)}") from None


def trainable_methods() -> tuple[str, ...]:
    """The methods AdapterConfig can build fresh, in registry order."""
    return tuple(name for name, cls in METHODS.items() if cls.trainable and name == cls.method)

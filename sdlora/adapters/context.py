"""The channel through which a mix reaches the layers for the length of one call.

A ContextVar, not module state: each thread (and asyncio task) sees only the mix its own call
set, so concurrent requests with different mixes never see each other's adapters.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

import torch


class ActiveMix(Protocol):
    fused: bool  # True: the mix is merged into the weights, layers add nothing

    def layer_weights(self, layer, batch: int) -> dict[str, float | torch.Tensor]:
        """Adapter name -> weight for this layer now: a float, or a (batch,) tensor of per-sample weights."""


_ACTIVE: ContextVar[ActiveMix | None] = ContextVar("sdlora_active_mix", default=None)


def current_mix() -> ActiveMix | None:
    return _ACTIVE.get()


def set_mix(mix: ActiveMix | None):
    """Returns the token for `reset_mix`."""
    return _ACTIVE.set(mix)


def reset_mix(token) -> None:
    _ACTIVE.reset(token)

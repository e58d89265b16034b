"""Data parallelism without a wrapped model: each process trains on its share of every global batch.

Every process draws the whole global batch's randomness (captions, noise, timesteps) from the same
seeded generators and keeps only its own rows, so the random streams, and with them checkpoints
and resume, are the same whatever the number of processes. Each process's loss is its rows' share
of the global mean (sum over its rows / global batch size); summing the gradients over processes
then gives exactly the gradient of the global mean, even when the shares are unequal.
"""

from __future__ import annotations

import torch


def local_rows(batch_size: int, rank: int, world: int) -> slice:
    """This process's contiguous share of a global batch of `batch_size` rows (may be empty)."""
    per, extra = divmod(batch_size, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


def sum_over_processes(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """The elementwise sum of `tensor` over all processes (itself with one process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.clone(), reduction="sum")


def sum_gradients(params: list[torch.Tensor], accelerator) -> None:
    """Replace each parameter's gradient by its sum over processes, in one flat all-reduce.
    A process whose share of the batch was empty contributes zeros."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = sum_over_processes(torch.cat([g.reshape(-1).float() for g in grads]), accelerator)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()

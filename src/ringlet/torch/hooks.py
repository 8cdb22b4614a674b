"""Communication hooks of :class:`ringlet.torch.DistributedDataParallel`: how a gradient bucket is averaged.

A hook is ``hook(comm, bucket) -> torch.futures.Future[torch.Tensor]``: it starts the averaging of
the flat gradient ``bucket`` over ``comm`` without waiting, and the future's value is the averaged
bucket (the same tensor written in place, or a new one DDP copies back). The compression hooks
halve the bytes on the wire by averaging in float16 / bfloat16; dividing by the number of ranks
before the sum keeps float16 from overflowing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import ringlet

from .works import as_future

__all__ = ["CommHook", "allreduce_hook", "bf16_compress_hook", "fp16_compress_hook"]

CommHook = Callable[[ringlet.Communicator, torch.Tensor], "torch.futures.Future[torch.Tensor]"]


def allreduce_hook(
    comm: ringlet.Communicator, bucket: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over the ranks in place, in its own dtype (the default)."""
    work = comm.all_reduce(bucket, "mean", async_op=True)
    return as_future([work], lambda _: bucket)


def _compressed(
    comm: ringlet.Communicator, bucket: torch.Tensor, dtype: torch.dtype
) -> torch.futures.Future[torch.Tensor]:
    wire = bucket.div(comm.size).to(dtype)
    work = comm.all_reduce(wire, "sum", async_op=True)

    def decompress(_: list[Any]) -> torch.Tensor:
        bucket.copy_(wire)
        return bucket

    return as_future([work], decompress)


def fp16_compress_hook(
    comm: ringlet.Communicator, bucket: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` in float16 (half the bytes on the wire), then cast back."""
    return _compressed(comm, bucket, torch.float16)


def bf16_compress_hook(
    comm: ringlet.Communicator, bucket: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` in bfloat16 (half the bytes, float32's exponent range), then cast back."""
    return _compressed(comm, bucket, torch.bfloat16)

"""Tensor helpers of the backend: flat views, copies of ringlet's results, argument checks, and
the pairwise exchange behind all_to_all with split sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

import ringlet
from ringlet.arrays import from_numpy_like

__all__ = [
    "ALLTOALL_TAG",
    "copy_into",
    "flat",
    "one",
    "pairwise_exchange",
    "same_dtype",
    "seconds",
    "split_rows",
    "tensor_of",
]

#: Tag of the point-to-point messages that carry an uneven all_to_all (users' tags are >= 0).
ALLTOALL_TAG = -0x7A11


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of ``t``'s elements: a view when ``t`` is contiguous, else a copy."""
    return t.detach().reshape(-1)


def tensor_of(x: Any, like: torch.Tensor) -> torch.Tensor:
    """ringlet's result as a tensor (it returns NumPy where the call's input was not a tensor)."""
    return x if isinstance(x, torch.Tensor) else from_numpy_like(like, x)  # type: ignore[return-value]


def copy_into(out: torch.Tensor, src: Any) -> None:
    out.detach().copy_(tensor_of(src, out).reshape(out.shape))


def one(tensors: Sequence[Any], call: str) -> Any:
    if len(tensors) != 1:
        raise ValueError(
            f"{call}: backend 'ringlet' takes one tensor (or tensor list) per call, "
            f"got {len(tensors)}"
        )
    return tensors[0]


def seconds(opts: Any) -> float | None:
    """The per-call timeout torch put in ``opts``, in seconds, or None for the group's default."""
    timeout = getattr(opts, "timeout", None)
    if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
        return timeout.total_seconds()
    return None


def same_dtype(call: str, expected: torch.dtype, tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        if t.dtype != expected:
            raise TypeError(
                f"{call}: output tensors must have the input's dtype {expected}, got {t.dtype}"
            )


def split_rows(
    call: str, t: torch.Tensor, splits: Sequence[int], size: int, what: str
) -> list[torch.Tensor]:
    """``t`` cut along dim 0 into ``splits`` rows each (even parts when ``splits`` is empty)."""
    rows = t.shape[0] if t.dim() else 1
    if not splits:
        if rows % size:
            raise ValueError(
                f"{call}: the {what}'s first dimension ({rows}) must divide by {size} "
                "when no split sizes are given"
            )
        splits = [rows // size] * size
    if len(splits) != size or sum(splits) != rows or min(splits) < 0:
        raise ValueError(
            f"{call}: {what} split sizes {list(splits)} must be {size} non-negative "
            f"numbers summing to the first dimension ({rows})"
        )
    return list(torch.split(t.detach(), list(splits)))


def pairwise_exchange(
    comm: ringlet.Communicator, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor]
) -> tuple[list[ringlet.Work], Callable[[], None]]:
    """Send ``sends[j]`` to rank j and receive ``recvs[j]`` from rank j, pairwise, shifted.

    Step s sends to rank + s and receives from rank - s, so every send meets a posted receive and
    the exchange cannot deadlock. Returns the works and a step to run once they finished (copying
    into non-contiguous outputs).
    """
    rank, size = comm.rank, comm.size
    if sends[rank].numel() != recvs[rank].numel():
        raise ValueError(
            f"all_to_all: rank {rank} sends itself {sends[rank].numel()} elements "
            f"but expects {recvs[rank].numel()}"
        )
    copy_into(recvs[rank], sends[rank])
    works: list[ringlet.Work] = []
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (non-contiguous output, its buffer)
    for step in range(1, size):
        dst, src = (rank + step) % size, (rank - step) % size
        works.append(comm.send(flat(sends[dst]), dst, ALLTOALL_TAG, async_op=True))
        target = recvs[src]
        if target.is_contiguous():
            buf = target.detach().view(-1)
        else:
            buf = torch.empty(target.numel(), dtype=target.dtype)
            staged.append((target, buf))
        works.append(comm.recv(buf, src, ALLTOALL_TAG, async_op=True))

    def copy_staged() -> None:
        for target, buf in staged:
            copy_into(target, buf)

    return works, copy_staged

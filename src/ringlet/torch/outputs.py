"""torch's output tensors of gather, all_gather and scatter, checked and filled from ringlet's result.

torch's list forms of gather and all_gather take one output tensor per rank, each of any size;
ringlet returns one flat array of every rank's contribution. Before the call a rank checks what it
can know of its own list (one tensor per rank, one dtype, its own slot the size of its input);
after it, the flat result is split by the output sizes and copied in, on ringlet's progress
thread, before the Work completes. A scattered part is checked against its output the same way:
only after the data moved can a rank know what root sent it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import ringlet

from .tensors import copy_into, same_dtype

__all__ = ["check_parts", "scattered_into", "split_into"]


def check_parts(
    call: str, comm: ringlet.Communicator, outs: Sequence[torch.Tensor], inp: torch.Tensor
) -> None:
    """ValueError unless ``outs`` is one tensor per rank of ``inp``'s dtype, this rank's its size."""
    if len(outs) != comm.size:
        raise ValueError(f"{call}: need {comm.size} output tensors, got {len(outs)}")
    same_dtype(call, inp.dtype, outs)
    if outs[comm.rank].numel() != inp.numel():
        raise ValueError(
            f"{call}: output {comm.rank} has {outs[comm.rank].numel()} "
            f"elements but this rank's input has {inp.numel()}"
        )


def split_into(
    call: str, comm: ringlet.Communicator, joined: torch.Tensor, outs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Copy the flat ``joined`` into ``outs`` in turn; ValueError when the sizes differ."""
    sizes = [o.numel() for o in outs]
    if joined.numel() != sum(sizes):
        raise ValueError(
            f"{call}: the ranks sent {joined.numel()} elements in all but the "
            f"output tensors of rank {comm.rank} hold {sum(sizes)}"
        )
    for out, part in zip(outs, torch.split(joined, sizes), strict=True):
        copy_into(out, part)
    return list(outs)


def scattered_into(
    comm: ringlet.Communicator, got: torch.Tensor, out: torch.Tensor
) -> list[torch.Tensor]:
    """scatter: copy the part this rank received into ``out``; ValueError when it does not fit."""
    same_dtype("scatter", got.dtype, [out])
    if got.numel() != out.numel():
        raise ValueError(
            f"scatter: rank {comm.rank} received {got.numel()} "
            f"elements into an output of {out.numel()}"
        )
    copy_into(out, got)
    return [out]

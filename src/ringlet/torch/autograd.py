"""all_gather that autograd can differentiate: the global batch for contrastive losses (CLIP, InfoNCE), MoE.

Forward: every rank gets ``[t_0 | t_1 | …]`` along dim 0 (first dimensions may differ between
ranks). Backward: rank i gets rows i of the output gradient summed over all ranks — the gradient
of the sum of every rank's loss with respect to its own ``t``. The sum is a reduce_scatter padded
to the largest part when that wastes little, else an all_reduce followed by a slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import ringlet

from .groups import communicator_for

__all__ = ["all_gather_with_grad"]


class _Exchange:
    """The three steps the autograd function needs, over a ringlet communicator or a torch group."""

    def __init__(self, comm: ringlet.Communicator | None, group: Any) -> None:
        self.comm, self.group = comm, group
        self.rank = comm.rank if comm is not None else dist.get_rank(group)
        self.size = comm.size if comm is not None else dist.get_world_size(group)

    def counts(self, rows: int) -> list[int]:
        if self.comm is not None:
            return [int(c) for c in self.comm.all_gather(np.array([rows], np.int64))]
        everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(everyone, torch.tensor([rows], dtype=torch.int64), group=self.group)
        return [int(c) for c in everyone]

    def gather(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.comm is not None:
            out: torch.Tensor = self.comm.all_gather(t)
            return out
        most = max(counts)  # torch's all_gather wants equal sizes: pad, gather, trim
        padded = t.new_zeros((most, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def sum_own_rows(self, grad: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows ``counts[rank]`` at this rank's offset of ``grad`` summed over all ranks."""
        start = sum(counts[: self.rank])
        most, total = max(counts), sum(counts)
        if self.comm is not None and self.size * most <= 2 * total:
            if most * self.size == total:
                padded = grad.contiguous()
            else:
                padded = grad.new_zeros((self.size * most, *grad.shape[1:]))
                offsets = np.cumsum([0, *counts])
                for r in range(self.size):
                    padded[r * most : r * most + counts[r]] = grad[offsets[r] : offsets[r + 1]]
            mine: torch.Tensor = self.comm.reduce_scatter(padded, "sum")
            return mine[: counts[self.rank]]
        summed = grad.contiguous().clone()
        if self.comm is not None:
            self.comm.all_reduce(summed, "sum")
        else:
            dist.all_reduce(summed, group=self.group)
        return summed[start : start + counts[self.rank]]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, exchange: _Exchange) -> torch.Tensor:  # type: ignore[override]
        counts = exchange.counts(t.shape[0])
        ctx.exchange, ctx.counts = exchange, counts
        return exchange.gather(t.detach().contiguous(), counts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.exchange.sum_own_rows(grad, ctx.counts), None


def all_gather_with_grad(
    t: torch.Tensor, comm: ringlet.Communicator | None = None, group: Any = None
) -> torch.Tensor:
    """``[t_0 | t_1 | …]`` along dim 0 on every rank, differentiable (see the module docstring).

    Args:
        t: this rank's rows; at least one dimension; other dimensions and dtype equal on all ranks.
        comm: a ringlet communicator. Without it: the torch process group ``group`` (default: the
            default group) — through its ringlet communicator when it runs on backend "ringlet",
            else through torch.distributed calls (any backend, e.g. gloo).

    Every rank must call it, and run backward through it, in the same order.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"all_gather_with_grad: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError("all_gather_with_grad: t needs at least one dimension (rows are gathered)")
    if comm is None and dist.is_initialized():
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        if dist.get_backend(pg) == "ringlet":
            comm = communicator_for(pg)
    if comm is None and not dist.is_initialized():
        raise ValueError(
            "all_gather_with_grad: pass comm= (a ringlet communicator) or initialize "
            "torch.distributed first"
        )
    out: torch.Tensor = _AllGatherWithGrad.apply(t, _Exchange(comm, group))  # type: ignore[no-untyped-call]
    return out

"""Gradient buckets of :class:`ringlet.torch.DistributedDataParallel`: what is averaged as one.

DDP averages gradients not one by one but in buckets: small gradients packed into a flat buffer of
about ``bucket_cap_mb``, a large one (``direct_mb``) as a bucket of its own, averaged where it lies
in ``param.grad``. This module decides the buckets and holds their per-step state; `GradBucket`
is the view of a bucket that torch's comm hooks (``register_comm_hook``) expect. How and when a
bucket is averaged is DDP's (`ringlet.torch.ddp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .trace import BucketTiming

__all__ = ["EMPTY", "MB", "Bucket", "GradBucket", "make_buckets"]

MB = 1024 * 1024
EMPTY = torch.empty(0)


@dataclass
class Bucket:
    """A flat buffer holding the gradients of ``params`` at ``offsets``; averaged as one.

    A ``direct`` bucket has one parameter and no buffer of its own: each step ``buffer`` becomes a
    flat view of that parameter's gradient (or, when the gradient cannot be viewed flat, a spare
    buffer it is copied into).
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    direct: bool = False
    pending: int = 0
    future: torch.futures.Future[torch.Tensor] | None = None
    timing: BucketTiming | None = None
    ready: list[bool] = field(default_factory=list)
    spare: torch.Tensor | None = None

    def slot(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)

    def take(self, grad: torch.Tensor | None) -> None:
        """Direct bucket: average ``grad`` where it lies (zeros when the parameter got none)."""
        p = self.params[0]
        if grad is not None and grad.is_contiguous() and grad.dtype == p.dtype:
            self.buffer = grad.view(-1)
            return
        if self.spare is None:
            self.spare = torch.empty(p.numel(), dtype=p.dtype)
        self.buffer = self.spare
        if grad is None:
            self.buffer.zero_()
        else:
            self.slot(0).copy_(grad)


def make_buckets(
    params: list[nn.Parameter], cap_bytes: int, first_cap_bytes: int, direct_bytes: int
) -> list[Bucket]:
    """Buckets of at most ``cap_bytes`` (the first at most ``first_cap_bytes``), one dtype each;
    a parameter of at least ``direct_bytes`` is a direct bucket of its own."""
    groups: list[tuple[list[nn.Parameter], bool]] = []
    open_group: dict[torch.dtype, tuple[list[nn.Parameter], int]] = {}
    for p in reversed(params):  # backward produces the last layers' gradients first
        nbytes = p.numel() * p.element_size()
        if nbytes >= direct_bytes:
            groups.append(([p], True))
            open_group.pop(p.dtype, None)  # smaller ones after it start a new bucket
            continue
        members, used = open_group.get(p.dtype, ([], 0))
        cap = first_cap_bytes if not groups or members is groups[0][0] else cap_bytes
        if members and used + nbytes > cap:
            members, used = [], 0
        if not members:
            groups.append((members, False))
        members.append(p)
        open_group[p.dtype] = (members, used + nbytes)
    buckets = []
    for index, (members, direct) in enumerate(groups):
        offsets = np.cumsum([0] + [p.numel() for p in members]).tolist()
        buffer = EMPTY if direct else torch.zeros(int(offsets[-1]), dtype=members[0].dtype)
        buckets.append(Bucket(index, members, [int(o) for o in offsets[:-1]], buffer, direct))
    return buckets


class GradBucket:
    """What torch's comm hooks read of a bucket (torch's ``dist.GradBucket``, over a ringlet bucket)."""

    def __init__(self, bucket: Bucket, last: bool) -> None:
        self._bucket = bucket
        self._last = last

    def index(self) -> int:
        return self._bucket.index

    def buffer(self) -> torch.Tensor:
        """The flat gradients of the bucket; a hook may average it in place."""
        return self._bucket.buffer

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient: views into ``buffer()``."""
        return [self._bucket.slot(i) for i in range(len(self._bucket.params))]

    def parameters(self) -> list[torch.Tensor]:
        return list(self._bucket.params)

    def is_last(self) -> bool:
        """True for the bucket averaged last in a step (PowerSGD counts steps by it)."""
        return self._last

    def set_buffer(self, tensor: torch.Tensor) -> None:
        self._bucket.buffer.copy_(tensor.reshape(-1))

"""``join()`` of ringlet's DistributedDataParallel: training on when ranks have uneven inputs.

torch's ``Join`` context manager asks each Joinable for a JoinHook. While some ranks still train,
a rank that ran out of batches shadows each of their steps in ``main_hook`` — the same buffer
broadcast and bucket averages, with zero gradients — so every rank issues the same calls in the
same order; once all have joined, ``post_hook`` gives every rank the model of a rank that joined
last. With ``divide_by_initial_world_size=False`` a step's averages are rescaled to the ranks still
training. DDP keeps the step's state; this module is what joining adds to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import JoinHook

from .groups import communicator_for

if TYPE_CHECKING:
    from .ddp import DistributedDataParallel

__all__ = ["DDPJoinHook", "grad_scale_active", "join_process_group"]


def join_process_group(ddp: DistributedDataParallel) -> Any:
    """The torch group join() counts ranks on: DDP's own, else the default one it averages over."""
    if ddp.process_group is not None:
        return ddp.process_group
    world = dist.group.WORLD if dist.is_initialized() else None
    if world is None or communicator_for(None) is not ddp.comm:
        raise ValueError(
            "join() needs the torch group this model averages over: build "
            "DistributedDataParallel with process_group= (not comm=)"
        )
    return world


def grad_scale_active(ddp: DistributedDataParallel) -> bool:
    """join(divide_by_initial_world_size=False): rescale a step's averages to the ranks active."""
    if ddp._divide_by_initial_world_size:
        return False
    ddp._join_work.wait()
    active = float(ddp._join_work.get_future().value()[0].item())
    ddp._grad_scale = ddp.comm.size / active if active > 0 else 1.0
    return True


class DDPJoinHook(JoinHook):
    """join(): a joined rank shadows every step of the others, then all take the last joiner's model."""

    def __init__(self, ddp: DistributedDataParallel, divide_by_initial_world_size: bool) -> None:
        self.ddp = ddp
        ddp._divide_by_initial_world_size = divide_by_initial_world_size

    def main_hook(self) -> None:
        """A joined rank's share of one step of the others: the same calls, with zero gradients."""
        ddp = self.ddp
        buffers = list(ddp.module.buffers())
        if ddp.broadcast_buffers and buffers and ddp.comm.size > 1:
            ddp._broadcast_coalesced(buffers)
        for bucket in ddp._buckets:
            if bucket.direct:
                bucket.take(None)
            else:
                bucket.buffer.zero_()
            ddp._average(bucket).wait()
        if ddp.find_unused_parameters and ddp._static_used is None:
            ddp.comm.all_reduce(np.zeros(len(ddp._params), np.uint8), "max")
        ddp._reset_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        """After join(): every rank takes the parameters and buffers of a rank that joined last."""
        ddp = self.ddp
        mine = np.array([ddp.comm.rank if is_last_joiner else -1], np.int64)
        source = int(ddp.comm.all_reduce(mine, "max")[0])
        tensors: list[torch.Tensor] = [*ddp.module.parameters(), *ddp.module.buffers()]
        ddp._broadcast_coalesced(tensors, source)

"""``monitored_barrier`` for backend "ringlet": a barrier that names the ranks that did not come.

torch's own ``dist.monitored_barrier`` accepts only Gloo groups. A hung job is easiest to debug
when rank 0 can say which rank never arrived, and that needs a barrier that does not go through
the communicator that may be stuck: every rank checks in through the group's torch store, rank 0
waits for each rank in turn (for all of them with ``wait_all_ranks``) and then releases everyone.
It moves no ringlet data, so a failed monitored barrier leaves the communicator usable.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["monitored_barrier"]


def _store_barrier(
    store: Any, rank: int, size: int, key: str, timeout: timedelta | None, wait_all_ranks: bool
) -> None:
    """The barrier of ``size`` ranks at ``key`` in ``store`` (a key alike on every rank, new per
    call); raises DistBackendError naming who was missing (rank 0) or that rank 0 did not reply.
    """
    limit = timeout if timeout is not None else timedelta(minutes=30)
    ms = int(limit.total_seconds() * 1000)
    me = rank
    store.set(f"{key}/{me}", b"1")
    if me != 0:
        try:
            store.wait([f"{key}/released"], limit)
        except Exception as exc:
            raise dist.DistBackendError(
                f"Rank {me} did not receive a reply from rank 0 in monitored_barrier "
                f"within {ms} ms (rank 0 or another rank did not reach it)"
            ) from exc
        return
    deadline = time.monotonic() + limit.total_seconds()
    missing: list[int] = []
    for r in range(1, size):
        if store.check([f"{key}/{r}"]):
            continue
        left = deadline - time.monotonic()
        try:
            if left <= 0:  # past the deadline: only ranks already there pass
                raise TimeoutError
            store.wait([f"{key}/{r}"], timedelta(seconds=left))
        except Exception:
            missing.append(r)
            if not wait_all_ranks:
                break
    if missing:
        who = ", ".join(str(r) for r in missing)
        raise dist.DistBackendError(
            f"Rank{'s' if len(missing) > 1 else ''} {who} failed to pass monitoredBarrier "
            f"in {ms} ms"
        )
    store.set(f"{key}/released", b"1")


def monitored_barrier(
    group: Any = None, timeout: timedelta | None = None, wait_all_ranks: bool = False
) -> None:
    """``dist.monitored_barrier`` for groups of backend "ringlet" (torch's own accepts only Gloo).

    Raises on rank 0 naming the rank that did not arrive within ``timeout`` (every such rank
    with ``wait_all_ranks``); the other ranks raise when rank 0 does not release them in time.
    """
    from .backend import RingletProcessGroup  # the backend imports this module

    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if not isinstance(pg, RingletProcessGroup):
        raise ValueError(f"monitored_barrier: {pg!r} is not a group of backend 'ringlet'")
    if pg.store is None:
        raise RuntimeError("monitored_barrier: this group was made without a torch store")
    pg._barriers += 1  # counted alike on every rank: each call meets at keys of its own
    key = f"ringlet/monitored_barrier/{pg._barriers}"
    _store_barrier(pg.store, pg.comm.rank, pg.comm.size, key, timeout, wait_all_ranks)

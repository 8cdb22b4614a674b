"""What a torch ProcessGroup of backend "ringlet" answers besides its collectives.

Names and descriptions (DeviceMesh, functional collectives and FSDP2 look groups up by name),
shutdown and abort, timeouts, sequence numbers, the coalescing manager, monitored_barrier, and
splitting: ``pg.split_group(ranks)`` (what ``torch.distributed.split_group`` calls, and what Gloo
answers on CPU) makes a ringlet communicator over those ranks of the same world without moving any
data, as Gloo builds its split from the parent's store; a rank outside ``ranks`` gets None.
``RingletProcessGroup`` takes these methods from :class:`GroupSurface`; its collectives stay in
``backend``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import PrefixStore  # type: ignore[attr-defined]

import ringlet

from . import groups, monitored
from .coalescing import Coalescing
from .works import RingletWork

__all__ = ["GroupSurface"]

_BackendOptions: Any = torch._C._distributed_c10d.Backend.Options


class GroupSurface:
    """Naming, lifecycle, timeouts, coalescing and splitting of a ringlet process group."""

    comm: ringlet.Communicator
    store: Any
    _group_name: str
    _group_desc: str
    _timeout: float | None
    _coalescing: Coalescing
    _sequence: int
    _splits: int

    # -- naming and lifecycle -----------------------------------------------------------------
    def getBackendName(self) -> str:
        return "ringlet"

    # torch keeps a group's name and description in its backends; a Python ProcessGroup has none,
    # so it answers them itself.
    def getGroupName(self) -> str:
        if not self._group_name:
            raise RuntimeError("ProcessGroup name not set")
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    def name(self) -> str:
        return "ringlet"

    _get_backend_name = name

    def shutdown(self) -> None:
        """Close the communicator (the whole ringlet world for a default group)."""
        self.comm.close()
        groups.forget(self.comm)

    def abort(self) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<RingletProcessGroup rank {self.comm.rank} of {self.comm.size}>"

    # -- capabilities, timeouts, sequence numbers ---------------------------------------------
    @property
    def supports_splitting(self) -> bool:
        """True: ``split_group`` makes a sub-communicator of the same world (see the module)."""
        return True

    @property
    def supports_coalescing(self) -> bool:
        """False: torch then runs batch_isend_irecv as separate isend/irecv, which ringlet orders."""
        return False

    def set_timeout(self, timeout: timedelta) -> None:
        """Every later call of this group without a timeout of its own waits at most ``timeout``."""
        self._timeout = timeout.total_seconds() if timeout.total_seconds() > 0 else None

    _set_default_timeout = set_timeout

    def _set_sequence_number_for_group(self) -> None:
        self._sequence = 0

    def _get_sequence_number_for_group(self) -> int:
        return self._sequence

    def eager_connect_single_device(self, device: Any = None) -> None:
        """Nothing to do: a ringlet communicator connects on its first call, CPU only."""

    # torch asks a group for its backend per device (FSDP2's allocator, shrink_group, timeouts);
    # a Python group is its own backend, for the CPU only.
    @property
    def _device_types(self) -> list[torch.device]:
        return [torch.device("cpu")]

    def _get_backend(self, device: Any) -> GroupSurface:
        if torch.device(device).type != "cpu":
            raise RuntimeError(f"No backend type associated with device type {device}")
        return self

    def get_group_store(self) -> Any:
        """The torch store the group was made with (its name's prefix applied)."""
        return self.store

    supports_shrinking = False  # as Gloo: torch's shrink_group is refused (see ringlet.survive)
    supports_time_estimate = False

    @property
    def options(self) -> Any:
        """torch's Backend.Options of the group: its timeout (what split_group copies)."""
        seconds = self._timeout if self._timeout is not None else self.comm.timeout
        return _BackendOptions("ringlet", timedelta(seconds=seconds))

    def memory_stats(self) -> dict[str, int]:
        raise RuntimeError("Backend ringlet does not support getMemoryStats")

    def suspend(self) -> None:
        raise RuntimeError("Backend ringlet does not support suspend")

    def resume(self) -> None:
        raise RuntimeError("Backend ringlet does not support resume")

    def supports_tensor_alloc(self, device: Any) -> bool:
        """False: torch allocates communication buffers itself (as on Gloo)."""
        return False

    def allocate_tensor(self, size: int, *, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    # -- coalescing and monitored_barrier ------------------------------------------------------
    def _start_coalescing(self, device: Any = None) -> None:
        """Collect the works of the calls until ``_end_coalescing`` (torch's coalescing manager)."""
        self._coalescing.start()

    def _end_coalescing(self, device: Any = None) -> RingletWork:
        """One Work for every call since ``_start_coalescing`` (ringlet already ran them in order)."""
        return self._coalescing.end()

    def monitored_barrier(
        self, timeout: timedelta | None = None, wait_all_ranks: bool = False
    ) -> None:
        """A barrier that names the ranks that did not reach it within ``timeout`` (as Gloo's);
        see :func:`ringlet.torch.monitored_barrier`."""
        monitored.monitored_barrier(self, timeout, wait_all_ranks)

    # -- splitting and merging -----------------------------------------------------------------
    def merge_remote_group(
        self,
        store: Any,
        size: int,
        timeout: timedelta = timedelta(minutes=30),
        group_name: str | None = None,
        group_desc: str | None = None,
    ) -> Any:
        """A new group of ``size`` processes that meet in ``store`` (as Gloo's: each takes the
        next rank from the store's ``mergeGroupRank`` counter): a ringlet world of their own."""
        from .backend import RingletProcessGroup  # the class this surface belongs to

        rank = int(store.add("mergeGroupRank", 1)) - 1
        meeting = PrefixStore("ringlet-merge/", store)
        pg = RingletProcessGroup(
            groups.new_world(meeting, rank, size, timeout.total_seconds()), meeting
        )
        pg.setGroupName(group_name or f"{self._group_name}:merged")
        pg.setGroupDesc(group_desc or "merged")
        return pg

    def comm_split_count(self) -> int:
        """How many groups were split from this one (torch names a split's description by it)."""
        return self._splits

    def split_group(
        self,
        ranks: Sequence[int],
        timeout: timedelta | None = None,
        opts: Any = None,
        group_name: str | None = None,
        group_desc: str | None = None,
        device_types: Any = None,
    ) -> Any:
        """A new group of this group's ``ranks`` (group ranks, in this order), or None on a rank
        outside them. Called by every rank of this group with the same ``ranks``, like Gloo's."""
        from .backend import RingletProcessGroup  # the class this surface belongs to

        ranks = [int(r) for r in ranks]
        if not ranks or len(set(ranks)) != len(ranks):
            raise ValueError(f"split_group: ranks must be distinct and not empty, got {ranks}")
        if not all(0 <= r < self.comm.size for r in ranks):
            raise ValueError(
                f"split_group: ranks {ranks} are not all ranks of a group of {self.comm.size}"
            )
        self._splits += 1
        name = group_name or f"{self._group_name}:split:{self._splits}:{ranks}"
        if self.comm.rank not in ranks:
            return None
        members = [self.comm.members[r] for r in ranks]
        comm = groups.sub_communicator(self.comm, name, members)
        store = PrefixStore(f"{name}/", self.store) if self.store is not None else None
        pg = RingletProcessGroup(comm, store)
        pg.setGroupName(name)
        pg.setGroupDesc(group_desc or f"{self._group_desc}:split:{self._splits}")
        seconds = timeout.total_seconds() if timeout is not None else self._timeout
        if seconds:
            pg.set_timeout(timedelta(seconds=seconds))
        del opts, device_types  # CPU only: one backend, no options of its own
        return pg

"""One torch Work for several ringlet calls: chained Works, and torch's coalescing manager.

torch sometimes wants one Work for many calls: the ``*_coalesced`` variants issue one ringlet call
per tensor, and ``dist._coalescing_manager`` brackets a block of calls with ``_start_coalescing`` /
``_end_coalescing`` and then waits on a single Work. ringlet already runs a communicator's calls in
the order they were issued, so coalescing is bookkeeping only: keep the Works issued meanwhile and
complete one Work when they all have, raising the first failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .works import RingletWork

__all__ = ["Coalescing", "chain"]


def chain(works: Sequence[RingletWork], value: Any, call: str) -> RingletWork:
    """One Work that completes with ``value`` once every one of ``works`` has."""
    joined = torch.futures.collect_all([w.get_future() for w in works])

    def settle(fut: torch.futures.Future[Any]) -> Any:
        for f in fut.wait():
            f.wait()  # re-raises the first failure
        return value

    return RingletWork(joined.then(settle), call)


class Coalescing:
    """The Works a group issued since ``start()``, for the one Work ``end()`` returns."""

    def __init__(self) -> None:
        self._works: list[RingletWork] | None = None  # works issued since start()

    def issued(self, work: RingletWork) -> RingletWork:
        """Note ``work`` if the group is coalescing; return it."""
        if self._works is not None:
            self._works.append(work)
        return work

    def start(self) -> None:
        if self._works is not None:
            raise RuntimeError("_start_coalescing: this group is already coalescing")
        self._works = []

    def end(self) -> RingletWork:
        works, self._works = self._works, None
        if works is None:
            raise RuntimeError("_end_coalescing without _start_coalescing")
        return chain(works, [], "coalesced calls")

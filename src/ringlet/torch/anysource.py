"""Receives from any source for backend "ringlet": each send announces itself in the torch store.

torch's ``recv`` without ``src`` takes the next message from whichever rank sent one. ringlet's recv
reads one source's connection, in order, and has no probe across connections; so with
RINGLET_TORCH_ANYSOURCE=1 on every rank each send also announces itself in the group's torch store
(one counter increment and one key: a store round trip per send), and a receive from any source
reads the announcements in order, skipping those of messages a recv with ``src`` took, then
receives from that source. Without the variable a send costs nothing extra and such a receive is
a RuntimeError. This module holds that protocol and its per-group state.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

import ringlet

from .works import RingletWork, torch_error

__all__ = ["AnySource", "AnySourceWork"]

#: Where sends announce themselves for receives from any source (RINGLET_TORCH_ANYSOURCE=1).
_ANYSOURCE = "ringlet/anysource"


class AnySourceWork(RingletWork):
    """The Work of a receive from any source: ``_source_rank()`` is the rank it came from."""

    source = -1

    def _source_rank(self) -> int:
        return self.source

    source_rank = _source_rank


class AnySource:
    """One group's announcements of sends, and its receives from any source that follow them."""

    def __init__(self, comm: ringlet.Communicator, store: Any) -> None:
        self.comm = comm
        self.store = store
        self.enabled = store is not None and os.environ.get("RINGLET_TORCH_ANYSOURCE") == "1"
        self._lock = threading.Lock()
        self._recv = threading.Lock()
        self._credits: dict[tuple[int, int], int] = {}  # (src, tag): recvs with src not yet skipped
        self._cursors: dict[int, int] = {}  # tag: announcements read

    def announce(self, dst: int, tag: int) -> None:
        """A send to ``dst``: tell dst, through the store, that a message from us is on its way."""
        if self.enabled:
            key = f"{_ANYSOURCE}/{dst}/{tag}"
            self.store.set(f"{key}/{self.store.add(key, 1)}", str(self.comm.rank))

    def credit(self, src: int, tag: int) -> None:
        """A recv with ``src``: its announcement, when read, is skipped."""
        if self.enabled:
            with self._lock:
                self._credits[(src, tag)] = self._credits.get((src, tag), 0) + 1

    def recv(self, t: torch.Tensor, tag: int, timeout: Callable[[], float | None]) -> RingletWork:
        """Receive into ``t`` the next message with ``tag`` from whichever rank announced one first.

        ``timeout()`` is the group's deadline for the receive once its source is known.
        """
        if not self.enabled:
            raise RuntimeError(
                "recv: backend 'ringlet' receives from any source only with "
                "RINGLET_TORCH_ANYSOURCE=1 set on every rank (each send then announces itself "
                "in the torch store); pass src= otherwise"
            )
        future: torch.futures.Future[Any] = torch.futures.Future()
        work = AnySourceWork(future, f"recv from any source on rank {self.comm.rank}")

        def run() -> None:
            try:
                with self._recv:  # one any-source receive at a time, in call order
                    key = f"{_ANYSOURCE}/{self.comm.rank}/{tag}"
                    while True:
                        self._cursors[tag] = self._cursors.get(tag, 0) + 1
                        src = int(self.store.get(f"{key}/{self._cursors[tag]}"))
                        with self._lock:
                            credit = self._credits.get((src, tag), 0)
                            if credit:
                                self._credits[(src, tag)] = credit - 1
                        if not credit:
                            break
                    self.comm.recv(t, src, tag, async_op=True, timeout=timeout()).wait()
                work.source = src
                future.set_result([t])
            except BaseException as exc:
                future.set_exception(torch_error(exc))

        threading.Thread(target=run, name="ringlet-recv-anysource", daemon=True).start()
        return work

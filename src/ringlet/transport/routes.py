"""One transport made of several: each peer is reached through the transport that serves it.

A communicator that spans hosts sends to the ranks of its own host through shared memory and to
the others over TCP, under the same schedule. A round whose messages all use one transport runs
on it directly; a round that mixes them runs the shared-memory half on a helper thread while this
thread drives the TCP half, so neither waits for the other (a round's messages are concurrent by
definition). When one half fails, the other is cancelled and the first error is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .base import Tag
from .shm_p2p import ShmTransport
from .tcp import TcpTransport

Msgs = Sequence[tuple[int, memoryview]]


class Routes:
    """Shared memory to the peers in ``local.peers``, TCP to every other peer."""

    def __init__(self, tcp: TcpTransport, local: ShmTransport | None) -> None:
        self.rank, self.size = tcp.rank, tcp.size
        self.tcp = tcp
        self.local = local
        self.local_peers = local.peers if local is not None else frozenset()
        self._helper: _Helper | None = None

    def kind(self, peer: int) -> str:
        """ "shm" or "tcp": how messages to ``peer`` travel."""
        return "shm" if peer in self.local_peers else "tcp"

    def exchange(self, sends: Msgs, recvs: Msgs, tag: Tag, deadline: float) -> None:
        """Send and receive one round, each message over its peer's transport."""
        local = self.local
        if local is None:
            self.tcp.exchange(sends, recvs, tag, deadline)
            return
        near = self.local_peers
        ls = [m for m in sends if m[0] in near]
        lr = [m for m in recvs if m[0] in near]
        if len(ls) == len(sends) and len(lr) == len(recvs):
            local.exchange(sends, recvs, tag, deadline)
            return
        if not ls and not lr:
            self.tcp.exchange(sends, recvs, tag, deadline)
            return
        far_s = [m for m in sends if m[0] not in near]
        far_r = [m for m in recvs if m[0] not in near]
        if self._helper is None:
            self._helper = _Helper()
        self._helper.start(lambda: local.exchange(ls, lr, tag, deadline))
        try:
            self.tcp.exchange(far_s, far_r, tag, deadline)
        except BaseException:
            local.cancel.set()
            self._helper.finish()  # the TCP error is the one to report
            raise
        finally:
            error = self._helper.finish()
            local.cancel.clear()
        if error is not None:
            raise error

    def abort(self, message: str) -> None:
        self.tcp.abort(message)
        if self.local is not None:
            self.local.abort(message)

    def close(self) -> None:
        self.tcp.close()
        if self.local is not None:
            self.local.close()
        if self._helper is not None:
            self._helper.close()


class _Helper:
    """A thread that runs one job at a time for :class:`Routes` and keeps its exception."""

    def __init__(self) -> None:
        self._job: object = None
        self._error: BaseException | None = None
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._running = False
        self._thread = threading.Thread(target=self._loop, name="ringlet-routes", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            job = self._job
            if job is None:
                return
            try:
                job()  # type: ignore[operator]
            except BaseException as exc:
                self._error = exc
            job = None  # nor the round's buffers, which the job holds, until the next round
            self._done.release()

    def start(self, job: object) -> None:
        self._job, self._error, self._running = job, None, True
        self._go.release()

    def finish(self) -> BaseException | None:
        """Wait for the running job (if any); its exception or None."""
        if self._running:
            self._done.acquire()
            self._running, self._job = False, None
        return self._error

    def close(self) -> None:
        self._job = None
        self._go.release()

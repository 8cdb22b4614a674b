"""Point-to-point send and recv, by tag, on connections of their own.

Matching follows MPI: ``recv(x, src, tag)`` takes the earliest message from ``src`` with that tag,
and messages with one tag arrive in the order they were sent. A message with another tag that
arrives first is kept, whole, until a recv asks for its tag (so unmatched messages cost memory,
as MPI's unexpected messages do). A message whose dtype or shape differs from the recv's array
raises MismatchError and stays kept. Each message is a small header (tag, dtype, shape) then the
data, so ``recv(None, src)`` can allocate the result. Sends and receives run on separate threads
when asynchronous, so a pair may exchange both ways; receives run one at a time, in the order
they were posted. The communicator holds one ``PointToPoint`` and hands its send and recv to it.

``recv(x, None, tag)`` receives from any source: the earliest kept message with the tag, else the
first to arrive from whichever rank, and returns ``(array, source)`` (the Work's result when
asynchronous). Point-to-point messages always travel on these TCP connections, whatever the
collectives use, so waiting for any source is one poll() over one kind of socket.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import from_numpy_like, staged, to_numpy
from .engine import as_bytes
from .errors import CollectiveTimeout, MismatchError, PeerError, RingletError
from .links import core_per_rank
from .ops import check_dtype, dtype_code, dtype_from_code
from .transport.base import Tag
from .transport.tcp import TcpTransport
from .work import Worker

if TYPE_CHECKING:
    from .world import World

#: Communicator id bit that gives point-to-point messages their own sockets.
P2P_BIT = 1 << 63
MAX_DIMS = 32
P2P_SIG = 0x5032_5032


class PointToPoint:
    """send / recv between two ranks of a communicator, on connections of their own (opened at
    the first message). ``check`` raises if the communicator is closed or broken; ``timeout``
    gives the communicator's current default timeout."""

    def __init__(
        self,
        world: World,
        comm_id: int,
        members: Sequence[int],
        rank: int,
        poll: Callable[[], None],
        check: Callable[[], None],
        timeout: Callable[[], float],
    ) -> None:
        self.rank, self.size = rank, len(members)
        addresses = [world.addresses[g] for g in members]
        self._connect: Callable[[], TcpTransport] = functools.partial(
            TcpTransport, comm_id | P2P_BIT, rank, addresses, world.listener, world.secret, poll,
            core_per_rank(world),
        )
        self._check_usable, self._timeout = check, timeout
        self._p2p: TcpTransport | None = None
        self._open_lock = threading.Lock()
        self._p2p_counts: dict[tuple[str, int], int] = {}
        self._p2p_workers = {"send": Worker("ringlet-send"), "recv": Worker("ringlet-recv")}
        self._p2p_lock = threading.Lock()
        # per source: messages that arrived before a recv asked for their tag, in order
        # (arrival number, tag, data): any-source receives take the earliest that matches
        self._p2p_kept: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        self._arrivals = 0
        self._last_any = rank  # the source of the last any-source receive: rotation starts after it
        self._gone: dict[int, str] = {}  # peers whose connection ended: why

    def _p2p_transport(self) -> TcpTransport:
        with self._open_lock:
            if self._p2p is None:
                self._p2p = self._connect()
            return self._p2p

    def _peer(self, peer: int, name: str) -> int:
        if (
            not isinstance(peer, (int, np.integer))
            or not 0 <= peer < self.size
            or peer == self.rank
        ):
            raise ValueError(
                f"{name}: peer {peer!r} must be another rank of this communicator "
                f"(0..{self.size - 1}, not {self.rank})"
            )
        return int(peer)

    def _next(self, direction: str, peer: int) -> int:
        with self._p2p_lock:
            n = self._p2p_counts.get((direction, peer), 0)
            self._p2p_counts[(direction, peer)] = n + 1
            return n

    def _p2p_run(self, direction: str, fn: Any, async_op: bool, desc: str) -> Any:
        """Run ``fn`` after everything posted before it in this direction (inline if nothing is)."""
        self._check_usable()
        self._p2p_transport()
        worker = self._p2p_workers[direction]
        if async_op or not (worker.idle or worker.on_worker_thread()):
            work = worker.submit(fn, desc)
            return work if async_op else work.wait()
        return fn()

    def send(
        self,
        x: Any,
        dst: int,
        tag: int = 0,
        *,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Send ``x`` to rank ``dst``; matched in order with ``recv(…, src=this rank, tag)``."""
        dst = self._peer(dst, "send")
        arr = to_numpy(x, call="send")
        check_dtype(arr.dtype, call="send")
        if arr.ndim > MAX_DIMS:
            raise ValueError(f"send: at most {MAX_DIMS} dimensions are supported")
        meta = np.zeros(3 + MAX_DIMS, np.int64)
        meta[:3] = (tag, dtype_code(arr.dtype), arr.ndim)
        meta[3 : 3 + arr.ndim] = arr.shape

        def run() -> None:
            flat, _ = staged(arr)
            deadline = time.monotonic() + (self._timeout() if timeout is None else timeout)
            tr, n = self._p2p_transport(), self._next("send", dst)
            try:
                tr.exchange([(dst, as_bytes(meta))], [], Tag(n, P2P_SIG, 0), deadline)
                tr.exchange([(dst, as_bytes(flat))], [], Tag(n, P2P_SIG, 1), deadline)
            except (RingletError, TimeoutError, OSError) as exc:
                raise self._p2p_error(exc, f"send to rank {dst} (tag {tag})") from exc

        return self._p2p_run("send", run, async_op, f"send to rank {dst}")

    def recv(
        self,
        x: Any,
        src: int | None,
        tag: int = 0,
        *,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Receive the earliest message from ``src`` with ``tag`` into ``x`` (or a new array when
        ``x`` is None); messages with other tags that come first are kept for later recvs.
        ``src=None``: from any source, returning ``(array, source)`` (see :meth:`_any`)."""
        peer = None if src is None else self._peer(src, "recv")
        if peer is None and self.size == 1:
            raise ValueError("recv: a communicator of one rank has no other rank to receive from")
        arr = None if x is None else to_numpy(x, call="recv", writable=True)

        def run() -> Any:
            deadline = time.monotonic() + (self._timeout() if timeout is None else timeout)
            if peer is None:
                got, source = self._any(arr, tag, deadline)
                return (x if arr is not None else from_numpy_like(got, got)), source
            kept = self._kept_one([peer], arr, tag)
            data = None if kept is None else kept[0]
            try:
                while data is None:
                    data = self._read(peer, arr, tag, deadline)
            except MismatchError:
                raise  # the message that does not fit is kept; the connection is fine
            except (RingletError, TimeoutError, OSError) as exc:
                what = f"recv from rank {peer} (tag {tag})"
                raise self._p2p_error(exc, what, self._unmatched([peer])) from exc
            return x if arr is not None else from_numpy_like(data, data)

        desc = "recv from any source" if peer is None else f"recv from rank {peer}"
        return self._p2p_run("recv", run, async_op, desc)

    def _any(self, arr: np.ndarray | None, tag: int, deadline: float) -> tuple[np.ndarray, int]:
        """The earliest kept message with ``tag`` from any rank, else the first that arrives.

        Waits in the transport's poll for whichever peer has a message (no busy loop); each
        message read is delivered when it has ``tag`` and kept otherwise. Ready peers are looked
        at in turn, starting after the one that gave the last such receive, so one busy sender
        cannot starve the others. A peer whose connection ended is left out (PeerError at once
        when no peer is left); the deadline is a CollectiveTimeout naming the ranks that sent
        nothing with ``tag``.
        """
        others = [(self._last_any + 1 + i) % self.size for i in range(self.size)]
        peers = [p for p in others if p != self.rank]
        kept = self._kept_one(peers, arr, tag)
        if kept is not None:
            return kept
        tr, what = self._p2p_transport(), f"recv from any source (tag {tag})"
        while live := [p for p in peers if p not in self._gone]:
            try:
                src = tr.first_ready(live, deadline)
                data = self._read(src, arr, tag, deadline)
            except PeerError as exc:
                if exc.rank not in live:
                    raise
                self._gone[exc.rank] = str(exc)
                continue
            except MismatchError:
                raise
            except (RingletError, TimeoutError, OSError) as exc:
                raise self._any_error(exc, what, tag, live) from exc
            if data is not None:
                self._last_any = src
                return data, src
        gone = "; ".join(f"rank {r}: {why}" for r, why in sorted(self._gone.items()))
        left = f"on rank {self.rank}: no rank is left to send ({gone})"
        raise PeerError(f"{what} {left}{self._unmatched(peers)}")

    def _any_error(self, exc: BaseException, what: str, tag: int, live: list[int]) -> RingletError:
        """A timed-out any-source receive names the ranks that sent nothing; other errors pass."""
        if not isinstance(exc, TimeoutError):
            return self._p2p_error(exc, what)
        gone = f"; ranks {sorted(self._gone)} closed their connections" if self._gone else ""
        return CollectiveTimeout(
            f"{what} on rank {self.rank} timed out: no message with tag {tag} from ranks "
            f"{sorted(live)}{gone}"
            f"{self._unmatched(live)}",
            missing=tuple(sorted(live)),
        )

    def _read(
        self, src: int, arr: np.ndarray | None, tag: int, deadline: float
    ) -> np.ndarray | None:
        """Read the next message from ``src``: the array it landed in when it has ``tag`` (``arr``
        itself when it fits), else None after keeping it. A misfit with ``tag`` is kept too and
        raises MismatchError."""
        tr, n = self._p2p_transport(), self._p2p_counts.get(("recv", src), 0)
        meta = np.zeros(3 + MAX_DIMS, np.int64)
        tr.exchange([], [(src, as_bytes(meta))], Tag(n, P2P_SIG, 0), deadline)
        self._p2p_counts[("recv", src)] = n + 1  # only now: a recv that timed out may be retried
        their_tag, dtype = int(meta[0]), dtype_from_code(int(meta[1]))
        shape = tuple(int(d) for d in meta[3 : 3 + int(meta[2])])
        fits = arr is None or (arr.dtype == dtype and arr.shape == shape)
        into = arr if their_tag == tag and arr is not None and fits else np.empty(shape, dtype)
        flat, writeback = staged(into)
        tr.exchange([], [(src, as_bytes(flat))], Tag(n, P2P_SIG, 1), deadline)
        writeback()
        if their_tag == tag and fits:
            return into
        self._arrivals += 1
        self._p2p_kept.setdefault(src, []).append((self._arrivals, their_tag, into))
        if their_tag == tag:
            self._check_fits(arr, dtype, shape, src, tag)
        return None

    def _kept_one(
        self, peers: list[int], arr: np.ndarray | None, tag: int
    ) -> tuple[np.ndarray, int] | None:
        """Take the earliest kept message with ``tag`` from one of ``peers``: (its array, or
        ``arr`` filled with it; its source), or None. MismatchError, and it stays kept, when it
        does not fit ``arr``."""
        found = [
            (arrival, src, k)
            for src in peers
            for k, (arrival, their_tag, _) in enumerate(self._p2p_kept.get(src, []))
            if their_tag == tag
        ]
        if not found:
            return None
        _, src, k = min(found)
        data = self._p2p_kept[src][k][2]
        self._check_fits(arr, data.dtype, data.shape, src, tag)
        del self._p2p_kept[src][k]
        if arr is None:
            return data, src
        np.copyto(arr, data)
        return arr, src

    def _unmatched(self, peers: list[int]) -> str:
        """What arrived from ``peers`` and waits, unmatched, for a recv with its tag."""
        kept = [(src, t, d) for src in sorted(peers) for _, t, d in self._p2p_kept.get(src, [])]
        if not kept:
            return ""
        if len(peers) == 1:
            waiting = ", ".join(f"tag {t} ({d.dtype.name} {d.shape})" for _, t, d in kept)
            return f"; arrived from rank {peers[0]} but unmatched: {waiting}"
        waiting = ", ".join(f"tag {t} from rank {r} ({d.dtype.name} {d.shape})" for r, t, d in kept)
        return f"; arrived but unmatched: {waiting}"

    def _check_fits(
        self, arr: np.ndarray | None, dtype: np.dtype, shape: tuple[int, ...], src: int, tag: int
    ) -> None:
        """MismatchError when the matched message does not fit the recv's array (it stays kept)."""
        if arr is not None and (arr.dtype != dtype or arr.shape != shape):
            raise MismatchError(
                f"recv on rank {self.rank}: rank {src} sent tag {tag} as {dtype.name} {shape} "
                f"but this rank receives into {arr.dtype.name} {arr.shape}"
            )

    def _p2p_error(self, exc: BaseException, what: str, note: str = "") -> RingletError:
        if isinstance(exc, (CollectiveTimeout, TimeoutError)):
            return CollectiveTimeout(f"{what} on rank {self.rank} timed out ({exc}){note}")
        if isinstance(exc, RingletError):
            return exc
        return PeerError(f"{what} on rank {self.rank} failed: {exc}")

    def close(self) -> None:
        """Stop the send and recv threads and close the connections, if any were opened."""
        for w in self._p2p_workers.values():
            w.close()
        if self._p2p is not None:
            self._p2p.close()

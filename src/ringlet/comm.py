"""The Communicator users hold: every collective of SPEC, each one check → call → one path.

A public collective checks its arguments here, before any data moves (ValueError / TypeError),
names the call (kind, signature, and a sequence number every rank counts alike) and hands a body
to ``_collective``: flight recorder, failure reporter, inline or on the progress thread for
``async_op=True``. Inside, its data moves one way: ``Path.move`` (path.py: select → schedule →
engine → transports). A call rejected for its arguments still takes its sequence number and is
reported to the other ranks (failures.py), so none waits for it in vain.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import calls, objects
from .arrays import from_numpy_like, staged, to_numpy
from .blocks import ScatterHeader, even_blocks, piece_call, rows
from .calls import Call, reducible
from .calls import check_root as _root
from .eager import Records
from .errors import BrokenCommunicator, CollectiveTimeout, RingletError
from .failures import Reporter, rejected_call
from .links import host_indices
from .ops import ReduceOp, check_dtype
from .p2p import PointToPoint
from .path import Path
from .recorder import Entry, FlightRecorder
from .work import Work, Worker

if TYPE_CHECKING:
    from .world import World

WORLD_ID = 1
#: Mixed into every call's signature in deterministic mode.
DETERMINISTIC_SIG = 0x0D37_0000_0000_0000
F = TypeVar("F", bound=Callable[..., Any])


def _counted(method: F) -> F:
    """A collective whose argument errors still count: a call this rank refuses before taking a
    sequence number takes it anyway and is reported, so ranks that accepted stop waiting for it."""

    @functools.wraps(method)
    def wrapper(comm: Communicator, *args: Any, **kwargs: Any) -> Any:
        seq = comm._seq
        try:
            return method(comm, *args, **kwargs)
        except (ValueError, TypeError) as exc:
            if comm._seq == seq and not comm._closed and comm._broken is None:
                call = rejected_call(method.__name__, seq, exc)
                comm._seq += 1
                comm._recorder.reject(call, exc)
                comm._reporter.reject(call)
            raise

    return wrapper  # type: ignore[return-value]


class Communicator:
    """A group of ranks that run collectives together; the docs' Operations page describes each.

    ``rank``/``size`` are this process's place in the group, ``local_rank``/``local_size`` its place
    among the group's ranks on the same host, ``hosts`` the host (numbered by first appearance) of
    every rank. Use as a context manager to close it.
    """

    def __init__(self, world: World, comm_id: int, members: Sequence[int]) -> None:
        self.world = world  # what every communicator of this process shares
        self.id = comm_id
        self.members = list(members)  # global rank of each rank of this communicator
        self.rank = self.members.index(world.rank)
        self.size = len(self.members)
        self.hosts = host_indices([world.hosts[g] for g in self.members])
        me = self.hosts[self.rank]
        self.local_rank, self.local_size = self.hosts[: self.rank].count(me), self.hosts.count(me)
        self.timeout = world.timeout
        self._recorder = FlightRecorder(self.rank, self.size, comm_id, world.rank, world.job)
        store_rank = self.members.index(0) if 0 in self.members else None
        self._reporter = Reporter(
            world.store, f"c{comm_id:x}/", self.rank, self.size, self._recorder, store_rank
        )
        self._current: Call | None = None
        self._seq = 0
        self._splits = 0
        self._lock = threading.RLock()
        self._broken: BaseException | None = None
        self._closed = False
        self._worker = Worker(f"ringlet-progress-{comm_id:x}")
        world.comms.append(self)
        self._path = Path(
            world, comm_id, self.members, self.hosts, self.rank, self._recorder, self._poll,
            self.timeout,
        )
        self._p2p = PointToPoint(
            world, comm_id, self.members, self.rank, self._poll, self._check_usable,
            lambda: self.timeout,
        )

    @property
    def transport(self) -> str:
        """How this communicator moves data: "shm" (every rank on this host, through shared
        memory), "tcp", "shm+tcp" (shared memory to this host's ranks, TCP to the others), or
        "self" (a single rank)."""
        return self._path.transport

    @property
    def failed(self) -> bool:
        """True once a call of this communicator failed; every later call raises BrokenCommunicator."""
        return self._broken is not None

    # -- the collectives ----------------------------------------------------------------------
    @_counted
    def barrier(self, *, async_op: bool = False, timeout: float | None = None) -> Work | None:
        """Block until every rank of the communicator has entered the barrier."""
        call = self._call("barrier", None, ())

        def body(deadline: float) -> None:
            self._path.move(call, "barrier", None, {"tmp": np.zeros(1, np.uint8)}, None, deadline)

        return self._collective(call, body, async_op, timeout)  # type: ignore[no-any-return]

    @_counted
    def broadcast(
        self, x: Any, root: int = 0, *, async_op: bool = False, timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Copy root's ``x`` into ``x`` on every rank, in place; returns ``x``."""
        arr = to_numpy(x, call="broadcast", writable=True)
        root = _root(root, self.size, "broadcast")
        check_dtype(arr.dtype, call="broadcast")
        call = self._call("broadcast", arr.dtype, arr.shape, root=root)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            self._path.move(call, "broadcast", algo, {"out": flat}, None, deadline, count=flat.size,
                            root=root)
            if self.rank != root:
                writeback()
            return x

        return self._collective(call, body, async_op, timeout)

    @_counted
    def all_reduce(
        self, x: Any, op: str | ReduceOp = "sum", *, async_op: bool = False,
        timeout: float | None = None, algo: str | None = None,
    ) -> Any:
        """Reduce ``x`` over all ranks with ``op``; every rank gets the result in place. Returns ``x``."""
        arr, rop = reducible(x, op, "all_reduce")
        call = self._call("all_reduce", arr.dtype, arr.shape, rop.value)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            self._path.move(call, "all_reduce", algo, {"out": flat}, rop, deadline, count=flat.size)
            writeback()
            return x

        return self._collective(call, body, async_op, timeout)

    @_counted
    def reduce(
        self, x: Any, root: int = 0, op: str | ReduceOp = "sum", *, async_op: bool = False,
        timeout: float | None = None, algo: str | None = None,
    ) -> Any:
        """Reduce ``x`` over all ranks into ``x`` on ``root``; other ranks' ``x`` is unchanged."""
        arr, rop = reducible(x, op, "reduce")
        root = _root(root, self.size, "reduce")
        call = self._call("reduce", arr.dtype, arr.shape, rop.value, root)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            self._path.move(call, "reduce", algo, {"out": flat}, rop, deadline, count=flat.size,
                            root=root)
            if self.rank == root:
                writeback()
            return x

        return self._collective(call, body, async_op, timeout)

    @_counted
    def all_gather(
        self, x: Any, *, async_op: bool = False, timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Every rank gets ``[x_0 | x_1 | … ]`` along axis 0 (first dimensions may differ)."""
        return self._gather(x, None, async_op, timeout, algo)

    @_counted
    def gather(
        self, x: Any, root: int = 0, *, async_op: bool = False, timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Root gets ``[x_0 | x_1 | … ]`` along axis 0 in rank order; the others get None."""
        return self._gather(x, _root(root, self.size, "gather"), async_op, timeout, algo)

    def _gather(
        self, x: Any, root: int | None, async_op: bool, timeout: float | None, algo: str | None
    ) -> Any:
        """gather to ``root``, or all_gather when ``root`` is None: the ranks all-gather records
        of their row counts (phase signature) with the payloads if all fit (eager.py), else data."""
        kind = "all_gather" if root is None else "gather"
        arr = rows(to_numpy(x, call=kind))
        check_dtype(arr.dtype, call=kind)
        call = self._call(kind, arr.dtype, arr.shape[1:], root=-1 if root is None else root)

        def body(deadline: float) -> Any:
            rec = Records(arr, self.size, algo or self.world.forced.get(kind))
            self._path.move(call.phase(), "all_gather", None, rec.bufs, None, deadline,
                            counts=rec.counts)
            lands = root is None or self.rank == root
            if rec.eager(self._recorder):  # every payload came with the records
                return from_numpy_like(x, rec.gathered()) if lands else None
            bufs = {"in": staged(arr)[0]}
            out = None
            if lands:
                out = np.empty((sum(rec.rows), *arr.shape[1:]), arr.dtype)
                bufs["out"] = out.reshape(-1)
            kw: dict[str, Any] = {} if root is None else {"root": root}
            self._path.move(call, kind, algo, bufs, None, deadline, counts=rec.data_counts(), **kw)
            return None if out is None else from_numpy_like(x, out)

        return self._collective(call, body, async_op, timeout)

    @_counted
    def scatter(
        self, x: Any, root: int = 0, *, async_op: bool = False, timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Root passes one array (split evenly on axis 0) or a list of N arrays; each rank gets its
        part. Root's input is described to every rank first, so a bad one is an error on all."""
        root = _root(root, self.size, "scatter")
        call = self._call("scatter", None, (), root=root)

        def body(deadline: float) -> Any:
            header, source = (
                ScatterHeader.describe(x, self.size, algo or self.world.forced.get("scatter"))
                if self.rank == root
                else (ScatterHeader(self.size), None)
            )
            self._path.move(call.phase(), "broadcast", None, {"out": header.data}, None, deadline,
                            count=header.data.size, root=root)
            header.check(root)
            out = np.empty((header.rows[self.rank], *header.trailing), header.dtype)
            header.take(out.reshape(-1), self.rank, self._recorder)  # if it came in the header
            for k, bufs, counts in header.moves(source, out.reshape(-1), self.rank):
                self._path.move(piece_call(call, k), "scatter", algo, bufs, None, deadline,
                                counts=counts, root=root)
            listed = isinstance(x, (list, tuple))
            template = x if self.rank == root and not listed else (x[0] if listed and x else out)
            return from_numpy_like(template, out)

        return self._collective(call, body, async_op, timeout)

    @_counted
    def reduce_scatter(
        self, x: Any, op: str | ReduceOp = "sum", *, async_op: bool = False,
        timeout: float | None = None, algo: str | None = None,
    ) -> Any:
        """``x`` split evenly on axis 0; rank i gets part i of the reduction over ranks."""
        arr, rop = reducible(x, op, "reduce_scatter")
        block = even_blocks(arr, self.size, "reduce_scatter")
        call = self._call("reduce_scatter", arr.dtype, arr.shape, rop.value)

        def body(deadline: float) -> Any:
            out = np.empty((arr.shape[0] // self.size, *arr.shape[1:]), arr.dtype)
            bufs = {"in": staged(arr)[0], "out": out.reshape(-1)}
            self._path.move(call, "reduce_scatter", algo, bufs, rop, deadline,
                            counts=(block,) * self.size)
            return from_numpy_like(x, out)

        return self._collective(call, body, async_op, timeout)

    @_counted
    def all_to_all(
        self, x: Any, *, async_op: bool = False, timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """``x`` split evenly on axis 0; part j goes to rank j; returns the received parts in rank order."""
        arr = to_numpy(x, call="all_to_all")
        check_dtype(arr.dtype, call="all_to_all")
        counts = (even_blocks(arr, self.size, "all_to_all"),) * self.size
        call = self._call("all_to_all", arr.dtype, arr.shape)

        def body(deadline: float) -> Any:
            out = np.empty_like(arr, order="C")
            bufs = {"in": staged(arr)[0], "out": out.reshape(-1)}
            self._path.move(call, "all_to_all", algo, bufs, None, deadline, send_counts=counts,
                            recv_counts=counts)
            return from_numpy_like(x, out)

        return self._collective(call, body, async_op, timeout)

    def send(
        self, x: Any, dst: int, tag: int = 0, *, async_op: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Send ``x`` to rank ``dst``; matched in order with ``recv(…, src=this rank, tag)``."""
        return self._p2p.send(x, dst, tag, async_op=async_op, timeout=timeout)

    def recv(
        self, x: Any = None, src: int | None = None, tag: int = 0, *, async_op: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Receive the earliest message from ``src`` with ``tag`` into ``x`` (or a new array when
        ``x`` is None); messages with other tags that come first are kept for later recvs.
        ``src=None``: from any source; returns ``(array, source)`` (the Work's result if async)."""
        return self._p2p.recv(x, src, tag, async_op=async_op, timeout=timeout)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Every rank gets root's ``obj`` (others' ``obj`` is ignored)."""
        return objects.broadcast_object(self, obj, root)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank gets the list of every rank's ``obj``, in rank order."""
        return objects.all_gather_object(self, obj)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Root gets the list of every rank's ``obj``; the others get None."""
        return objects.gather_object(self, obj, root)

    def scatter_object(self, objs: list[Any] | None, root: int = 0) -> Any:
        """Root passes one object per rank; rank i gets ``objs[i]``."""
        return objects.scatter_object(self, objs, root)

    @_counted
    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """MPI_Comm_split: ranks with the same ``color`` form a new communicator, ordered by (key, rank).

        Every rank of this communicator must call it; ``color=None`` takes part but gets None.
        """
        if color is not None and (not isinstance(color, int) or color < 0):
            raise ValueError(f"split: color must be a non-negative int or None, not {color!r}")
        if not isinstance(key, int):
            raise TypeError(f"split: key must be an int, not {type(key).__name__}")
        self._splits += 1
        pairs = self.all_gather_object((color, key))
        if color is None:
            return None
        ranks = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        raw = f"{self.id}/{self._splits}/{color}".encode()
        new_id = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2
        return Communicator(self.world, new_id, [self.members[r] for _, r in ranks])

    def dup(self) -> Communicator:
        """A new communicator of the same ranks, with its own sequence numbers and connections."""
        sub = self.split(0, self.rank)
        assert sub is not None
        return sub

    # -- the one path -------------------------------------------------------------------------
    def _call(
        self, kind: str, dtype: np.dtype | None, shape: tuple[int, ...], op: str = "",
        root: int = -1,
    ) -> Call:
        """Describe a call and give it the next sequence number (all ranks count alike)."""
        self._check_usable()
        seq = self._seq
        self._seq += 1
        sig, desc = calls.named(kind, dtype, shape, op, root)
        if self.world.deterministic:
            sig ^= DETERMINISTIC_SIG  # a rank that folds otherwise meets a MismatchError
        return Call(kind, seq, sig, desc)

    def _collective(
        self, call: Call, body: Callable[[float], Any], async_op: bool, timeout: float | None
    ) -> Any:
        """Run ``body(deadline)`` in issue order: inline when nothing is pending, else queued."""
        entry = self._recorder.issue(call)
        if not async_op:
            # Inline when nothing is queued, and always on the progress thread itself (a done-callback,
            # e.g. a DDP comm hook, making a blocking call), which could never wait on its own queue.
            with self._lock:
                if self._worker.idle or self._worker.on_worker_thread():
                    return self._execute(call, body, timeout, entry)
        run = functools.partial(self._execute, call, body, timeout, entry)
        work = self._worker.submit(run, call.desc)
        return work if async_op else work.wait()

    def _execute(
        self, call: Call, body: Callable[[float], Any], timeout: float | None, entry: Entry
    ) -> Any:
        with self._lock:
            self._check_usable()
            self._current = call
            self._recorder.begin(entry)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            try:
                result = body(deadline)
                entry.finish()
                return result
            except (ValueError, TypeError) as exc:
                entry.finish(exc)
                raise  # argument errors every rank of the call finds alike (e.g. scatter's root input)
            except Exception as exc:
                if isinstance(exc, TimeoutError) and not isinstance(exc, CollectiveTimeout):
                    exc = CollectiveTimeout(f"{call.desc}: {exc}")
                err = self._reporter.report(call, exc)
                entry.finish(err)
                self._recorder.dump(err, entry, self.transport)
                self._fail(err)
                raise err from (exc if err is not exc else None)
            finally:
                self._current = None

    def _poll(self) -> None:
        self._reporter.poll(self._current)

    def _check_usable(self) -> None:
        if self._closed:
            raise RingletError(f"rank {self.rank}: this communicator is closed")
        if self._broken is not None:
            raise BrokenCommunicator(
                f"rank {self.rank}: this communicator failed earlier and cannot be used: "
                f"{self._broken}"
            ) from self._broken

    def _fail(self, err: BaseException) -> None:
        """Mark the communicator broken and tell connected peers, so nobody waits on us."""
        self._broken = err
        self._path.abort(f"rank {self.rank}: {err}")

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release this communicator's sockets, segments and threads; closing the world
        communicator also leaves the job. Calling it again is harmless."""
        if self._closed:
            return
        self._closed = True
        self._p2p.close()
        self._worker.close()
        self._path.close()
        if self.id == WORLD_ID and self.world.closer is not None:
            self.world.closer()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ringlet.Communicator rank {self.rank} of {self.size}, id {self.id:#x}>"

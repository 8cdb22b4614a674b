"""The communicator core: argument checks, call signatures, sequence numbers; picks and runs a schedule.

Every public collective follows one path: check the arguments locally (ValueError / TypeError,
before any data moves), describe the call, then run it — inline, or on the progress thread for
``async_op=True`` — as a schedule chosen by select from the op, size and the hosts the
communicator spans, executed by the engine over its routes: shared memory to the ranks of this
host, TCP to the others. (A communicator whose ranks all share one host still runs its default
choices through the host's shm group, shm.py, until those algorithms are schedules too.) A call
rejected for its arguments still takes its sequence number and is reported to the other ranks
(failures.py), so none waits for it in vain.
The flight recorder (recorder.py) keeps the last calls for the error report.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import calls
from .calls import Call
from .engine import Engine
from .errors import BrokenCommunicator, CollectiveTimeout, RingletError
from .failures import Reporter, report_rejections
from .ops import ReduceOp, check_dtype, check_op_dtype, parse_op
from .recorder import Entry, FlightRecorder
from .schedules import select
from .schedules.base import Schedule, extent
from .transport.routes import Routes
from .transport.tcp import Listener, TcpTransport
from .work import Worker

log = logging.getLogger("ringlet")
#: Mixed into every call's signature in deterministic mode.
DETERMINISTIC_SIG = 0x0D37_0000_0000_0000


@dataclass
class World:
    """What every communicator of this process shares: store, listener, secret, peer addresses."""

    rank: int
    size: int
    store: Any
    listener: Listener
    secret: bytes
    addresses: list[tuple[str, int]]
    hosts: list[str]
    job: str
    timeout: float
    server: Any = None
    deterministic: bool = False  # every reduction folds in rank order (RINGLET_DETERMINISTIC)
    forced: dict[str, str] = field(default_factory=dict)  # op -> algorithm (RINGLET_ALGO)
    comms: list[CommunicatorCore] = field(default_factory=list)
    closer: Any = None  # closes the whole world; called when the world communicator closes
    finalized: bool = False


@functools.lru_cache(maxsize=4096)
def _signature(
    kind: str, dtype: np.dtype | None, shape: tuple[int, ...], op: str, root: int
) -> tuple[int, str]:
    """A call's signature and description, cached: the fast path pays a dict lookup, not a hash."""
    return calls.signature(kind, dtype, shape, op, root), calls.describe(
        kind, dtype, shape, op, root
    )


@functools.lru_cache(maxsize=1024)
def _checked(op: str | ReduceOp, dtype: np.dtype, kind: str) -> ReduceOp:
    """Parse the reduce op and check it suits the dtype (cached; raises ValueError/TypeError)."""
    rop = parse_op(op, call=kind)
    check_dtype(dtype, call=kind)
    check_op_dtype(rop, dtype, call=kind)
    return rop


@functools.lru_cache(maxsize=512)
def _schedule(
    op: str, algo: str, rank: int, size: int, hosts: tuple[int, ...] | None, **kw: Any
) -> Schedule:
    return select.build(op, algo, rank, size, hosts=hosts, **kw)


def forced_algorithms(value: str) -> dict[str, str]:
    """RINGLET_ALGO as op -> algorithm: ``op=name,op=name`` per op, or a bare name for every op
    that has it. Raises ValueError for an op or algorithm that does not exist, so a typo is an
    error on every rank and every transport, never silently ignored."""
    forced: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        name, _, algo = (part.strip() for part in item.partition("="))
        if algo:
            select.select(name, 2, 0, algo)  # raises for an unknown op or algorithm
            forced[name] = algo
            continue
        ops = [op for op, algos in select.ALGORITHMS.items() if name in algos]
        if not ops:
            raise ValueError(
                f"RINGLET_ALGO={value!r}: no collective has an algorithm named {name!r}; use "
                "op=name pairs, e.g. all_reduce=ring"
            )
        forced.update(dict.fromkeys(ops, name))
    return forced


def host_indices(hosts: Sequence[str]) -> tuple[int, ...]:
    """Each rank's host as a small number, hosts numbered by first appearance."""
    seen: dict[str, int] = {}
    return tuple(seen.setdefault(h, len(seen)) for h in hosts)


def _check_root(root: int, size: int, kind: str) -> int:
    if not isinstance(root, (int, np.integer)) or not 0 <= root < size:
        raise ValueError(
            f"{kind}: root={root!r} is not a rank of this communicator (0..{size - 1})"
        )
    return int(root)


class CommunicatorCore:
    """Plumbing shared by every collective, and the reducing and broadcasting ones."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        report_rejections(cls)  # a call this rank refuses still counts, and the others hear of it

    def __init__(self, world: World, comm_id: int, members: Sequence[int]) -> None:
        self._world = world
        self.id = comm_id
        self.members = list(members)  # global rank of each rank of this communicator
        self.rank = self.members.index(world.rank)
        self.size = len(self.members)
        #: The host of each rank (numbered by first appearance): who shares memory with whom.
        self.hosts = host_indices([world.hosts[g] for g in self.members])
        me = self.hosts[self.rank]
        self.local_rank = self.hosts[: self.rank].count(me)
        self.local_size = self.hosts.count(me)
        self._forced = world.forced
        self._deterministic = world.deterministic
        self._topology = self.hosts if len(set(self.hosts)) > 1 else None
        self.timeout = world.timeout
        self._prefix = f"c{comm_id:x}/"
        self._recorder = FlightRecorder(self.rank, self.size, comm_id, world.rank, world.job)
        self._reporter = Reporter(
            world.store,
            self._prefix,
            self.rank,
            self.size,
            self._recorder,
            self.members.index(0) if 0 in self.members else None,
        )
        self._current: Call | None = None
        tcp = TcpTransport(
            comm_id,
            self.rank,
            [world.addresses[g] for g in self.members],
            world.listener,
            world.secret,
            self._poll,
        )
        self._transport = Routes(tcp, None)
        self._engine = Engine(self._transport)
        self._shm: Any = None
        self._seq = 0
        self._splits = 0
        self._kinds: dict[int, tuple[Schedule, str]] = {}  # see _transport_of
        self._lock = threading.RLock()
        self._broken: BaseException | None = None
        self._closed = False
        self._worker = Worker(f"ringlet-progress-{comm_id:x}")
        world.comms.append(self)
        transport = os.environ.get("RINGLET_TRANSPORT", "auto")
        if transport not in ("auto", "tcp", "shm"):
            raise ValueError(f"RINGLET_TRANSPORT={transport!r}: use tcp, shm or auto")
        if self.local_size > 1 and transport != "tcp":
            self._open_local(required=transport == "shm")
        if self.size > 1 and transport != "tcp" and self._topology is None:
            self._open_shm(required=transport == "shm")

    @property
    def transport(self) -> str:
        """How this communicator moves data: "shm" (every rank on this host, through shared
        memory), "tcp", "shm+tcp" (shared memory to this host's ranks, TCP to the others), or
        "self" (a single rank)."""
        if self.size == 1:
            return "self"
        if not self._transport.local_peers:
            return "tcp"
        return "shm" if len(self._transport.local_peers) == self.size - 1 else "shm+tcp"

    # -- plumbing -----------------------------------------------------------------------------
    def _open_local(self, required: bool) -> None:
        """Reach this host's ranks through shared memory; if the host forbids it, through TCP."""
        from .transport.shm_p2p import ShmTransport, ShmUnavailable

        me = self.hosts[self.rank]
        local = [r for r, h in enumerate(self.hosts) if h == me]
        rounds = iter(range(1 << 30))

        def exchange(value: bytes) -> list[bytes]:
            key = f"{self._prefix}p2p/{me}/{next(rounds)}/"
            self._world.store.set(f"{key}{self.rank}", value)
            return [self._world.store.get(f"{key}{r}", timeout=self.timeout) for r in local]

        try:
            shm = ShmTransport.open(
                self.rank,
                self.size,
                local,
                job=f"{self._world.job}-{self.id:x}-{me}",
                exchange=exchange,
                poll=self._poll,
            )
        except ShmUnavailable as exc:
            if required:
                raise
            log.warning("ringlet: shared memory unavailable (%s); rank %d uses TCP", exc, self.rank)
            return
        self._transport = Routes(self._transport.tcp, shm)
        self._engine = Engine(self._transport)

    def _open_shm(self, required: bool) -> None:
        """Join the host's shared segment; if the host forbids it, every rank falls back to TCP."""
        from .transport.shm import ShmGroup, ShmUnavailable

        rounds = iter(range(1 << 30))

        def exchange(value: bytes) -> list[bytes]:
            key = f"{self._prefix}shm/{next(rounds)}/"
            self._world.store.set(f"{key}{self.rank}", value)
            return [
                self._world.store.get(f"{key}{r}", timeout=self.timeout) for r in range(self.size)
            ]

        try:
            self._shm = ShmGroup.open(
                self.rank,
                self.size,
                job=f"{self._world.job}-{self.id:x}",
                exchange=exchange,
                timeout=self.timeout,
                poll=self._poll,
            )
        except ShmUnavailable as exc:
            if required:
                raise
            log.warning("ringlet: shared memory unavailable (%s); rank %d uses TCP", exc, self.rank)

    def _poll(self) -> None:
        self._reporter.poll(self._current)

    def _call(
        self,
        kind: str,
        dtype: np.dtype | None,
        shape: tuple[int, ...],
        op: str = "",
        root: int = -1,
    ) -> Call:
        """Describe a call and give it the next sequence number (all ranks count alike)."""
        self._check_usable()
        seq = self._seq
        self._seq += 1
        sig, desc = _signature(kind, dtype, shape, op, root)
        if self._deterministic:
            sig ^= DETERMINISTIC_SIG  # a rank that folds otherwise meets a MismatchError
        return Call(kind, seq, sig, desc)

    def _check_usable(self) -> None:
        if self._closed:
            raise RingletError(f"rank {self.rank}: this communicator is closed")
        if self._broken is not None:
            raise BrokenCommunicator(
                f"rank {self.rank}: this communicator failed earlier and cannot be used: "
                f"{self._broken}"
            ) from self._broken

    def _submit(
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

    def _fail(self, err: BaseException) -> None:
        """Mark the communicator broken and tell connected peers, so nobody waits on us."""
        self._broken = err
        self._transport.abort(f"rank {self.rank}: {err}")
        if self._shm is not None:
            self._shm.abort(f"rank {self.rank}: {err}")

    def _group(self, op: str, algo: str | None) -> Any:
        """The host's shm group when it should run this call: every rank on this host and no
        algorithm forced; else None, and the call runs as a schedule. (The group folds every
        element in rank order on all its paths, so deterministic mode keeps it.)"""
        if self._shm is None or algo is not None or op in self._forced:
            return None
        self._recorder.note("shm_group", None, "shm")  # shm.py picks its own path by size
        return self._shm

    def _algo(self, op: str, nbytes: int, algo: str | None) -> str:
        return select.select(
            op,
            self.size,
            nbytes,
            algo or self._forced.get(op),
            hosts=self._topology,
            deterministic=self._deterministic,
        )

    def _run(
        self,
        call: Call,
        op: str,
        algo: str | None,
        nbytes: int,
        bufs: dict[str, np.ndarray],
        rop: ReduceOp | None,
        deadline: float,
        **kw: Any,
    ) -> dict[str, np.ndarray]:
        """Build (cached) and execute the schedule of ``op`` on the given buffers over the routes."""
        chosen = self._algo(op, nbytes, algo)
        sched = _schedule(op, chosen, self.rank, self.size, self._topology, **kw)
        self._recorder.note(chosen, sched, self._transport_of(sched))
        dtype = next(iter(bufs.values())).dtype
        for name in ("out", "tmp"):
            need = extent(sched, name)  # type: ignore[arg-type]
            if name not in bufs or bufs[name].size < need:
                bufs[name] = np.empty(need, dtype)
        self._engine.run(sched, bufs, rop, call.seq, call.sig, deadline)
        return bufs

    def _transport_of(self, sched: Schedule) -> str:
        """Which transports a schedule's messages use on this rank: "shm", "tcp" or "shm+tcp".

        Kept per schedule object (schedules come from a cache, so a call repeats the same one):
        the fast path pays a dict lookup, not a walk over every round's peers."""
        known = self._kinds.get(id(sched))
        if known is not None and known[0] is sched:
            return known[1]
        kinds = "+".join(sorted({self._transport.kind(p) for p in sched.peers()})) or "self"
        if len(self._kinds) >= 512:
            self._kinds.clear()
        self._kinds[id(sched)] = (sched, kinds)  # holding sched keeps its id from being reused
        return kinds

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release this communicator's sockets, segments and thread; calling it again is harmless."""
        if self._closed:
            return
        self._closed = True
        self._worker.close()
        self._transport.close()
        if self._shm is not None:
            self._shm.close()

    def __enter__(self) -> CommunicatorCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ringlet.Communicator rank {self.rank} of {self.size}, id {self.id:#x}>"

"""The one way a collective's data moves: select → schedule → engine → transports.

A communicator holds one ``Path``. ``move`` takes a call's named flat buffers and the arguments
its schedule is built from; select picks the algorithm from the op, the size, the hosts the
communicator spans and what ``algo=`` / RINGLET_ALGO force, and the engine runs the (cached)
schedule over the routes: shared memory to this host's ranks, TCP to the others. (Where every rank
shares one host, select still answers ``select.GROUP`` for the ops whose one-host defaults are the
host's shm group, shm.py, until schedules match them; forcing an algorithm runs it as a schedule.)
The flight recorder notes the algorithm and transports of every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import calls
from .calls import Call
from .engine import DIRECT_SEGMENT_BYTES, SEGMENT_BYTES, Engine
from .links import connect
from .ops import ReduceOp, finish_mean, wire_op
from .recorder import FlightRecorder
from .schedules import select
from .schedules.base import Schedule, extent

if TYPE_CHECKING:
    from .world import World

_MEAN = ReduceOp.MEAN
#: A reduce or reduce_scatter larger than this runs as a sequence of pieces of about this many
#: bytes, each with scratch of its own size (a non-root's working copy, a ring's partial sums), so
#: the extra memory of a call stays bounded whatever its size; a few more rounds, each still large.
PIECE_BYTES = 16 << 20
#: Added to a call's signature per piece, so the frames of two pieces are never taken for each other.
PIECE_SIG = 0x9E37_79B9_7F4A_7C15


@functools.lru_cache(maxsize=512)
def _schedule(
    op: str, algo: str, rank: int, size: int, hosts: tuple[int, ...] | None, **kw: Any
) -> Schedule:
    return select.build(op, algo, rank, size, hosts=hosts, **kw)


def _needs(sched: Schedule) -> tuple[int, int, bool]:
    """The sizes of ``out`` and ``tmp`` a schedule touches, and whether any round receives or
    copies into ``out`` (a tree's leaf does not)."""
    writes = any(
        any(v.buf == "out" for v in rnd.recvs) or any(c.dst_buf == "out" for c in rnd.copies)
        for rnd in sched.rounds
    )
    return extent(sched, "out"), extent(sched, "tmp"), writes


class _Plan(NamedTuple):
    """How calls of one shape move (decided by :meth:`Path._plan`)."""

    shm: bool  # through the host's shm group (select chose select.GROUP)
    algo: str
    sched: Schedule | None  # None: a large reduction that runs piece by piece
    sent: ReduceOp | None  # the op that travels (a mean moves as a sum)
    finish: Callable[[np.ndarray], None] | None  # applied where the result lands
    keep_input: bool  # a non-root's reduce must not write into the caller's input
    needs: tuple[int, int, bool]  # of sched: see _needs


def _pieces(
    op: str, bufs: dict[str, np.ndarray], rank: int, **kw: Any
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """The buffers and schedule arguments of each piece of a large reduce or reduce_scatter:
    the same cut on every rank (it depends only on the call's counts)."""
    out = bufs["out"]
    if op == "reduce":
        step = max(1, PIECE_BYTES // out.itemsize)
        for lo in range(0, kw["count"], step):
            hi = min(kw["count"], lo + step)
            yield {"out": out[lo:hi]}, {"count": hi - lo, "root": kw["root"]}
        return
    counts, inp = kw["counts"], bufs["in"]  # reduce_scatter: a slice of every rank's block
    starts = [sum(counts[:r]) for r in range(len(counts))]
    step = max(1, PIECE_BYTES // (inp.itemsize * len(counts)))
    for lo in range(0, max(counts), step):
        part = tuple(max(0, min(c, lo + step) - lo) for c in counts)
        staged = np.concatenate(
            [inp[s + lo : s + lo + m] for s, m in zip(starts, part, strict=True)]
        )
        yield {"in": staged, "out": out[lo : lo + part[rank]]}, {"counts": part}


class Path:
    """Routes, engine and shm group of one communicator, and the move every collective makes."""

    def __init__(
        self,
        world: World,
        comm_id: int,
        members: Sequence[int],
        hosts: tuple[int, ...],
        rank: int,
        recorder: FlightRecorder,
        poll: Callable[[], None],
        timeout: float,
    ) -> None:
        self.rank, self.size = rank, len(members)
        self._forced, self._deterministic = world.forced, world.deterministic
        self._topology = hosts if len(set(hosts)) > 1 else None
        self._recorder = recorder
        self.routes, self._shm = connect(world, comm_id, members, hosts, rank, poll, timeout)
        if self._shm is not None:
            self._shm.note = self._group_way
        direct = self.transport == "shm" and self.routes.local is not None and self.routes.local.direct
        self._engine = Engine(self.routes, DIRECT_SEGMENT_BYTES if direct else SEGMENT_BYTES)
        self._kinds: dict[int, tuple[Schedule, str]] = {}  # see _transport_of
        self._plans: dict[tuple[Any, ...], _Plan] = {}  # see move

    @property
    def transport(self) -> str:
        """ "shm" (every rank on this host), "tcp", "shm+tcp" or "self" (a single rank)."""
        if self.size == 1:
            return "self"
        if not self.routes.local_peers:
            return "tcp"
        return "shm" if len(self.routes.local_peers) == self.size - 1 else "shm+tcp"

    def move(
        self,
        call: Call,
        op: str,
        algo: str | None,
        bufs: dict[str, np.ndarray],
        rop: ReduceOp | None,
        deadline: float,
        **kw: Any,
    ) -> None:
        """Move a call's data: ``bufs`` are the engine's named flat buffers ("in", "out", "tmp"),
        ``kw`` what the op's schedule is built from (count, counts, root, …). A mean travels as
        a sum and is divided once where the result lands (by the shm group in cache).

        Everything that depends only on the call's shape (the algorithm, its schedule, the
        buffers it needs) is decided once per shape and kept, so a repeated call pays one
        dictionary lookup before the engine runs."""
        first = next(iter(bufs.values()))
        key = (op, algo, rop, first.dtype, "out" in bufs, *kw.items())
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key, op, algo, rop, first.itemsize, "out" in bufs, kw)
        if plan.shm:
            assert self._shm is not None
            self._shm.run(op, bufs, plan.sent, call.sig, deadline, plan.finish, **kw)
            return
        if plan.sched is None:  # a large reduce or reduce_scatter, piece by piece
            for k, (piece, piece_kw) in enumerate(_pieces(op, bufs, self.rank, **kw), 1):
                sched = _schedule(op, plan.algo, self.rank, self.size, self._topology, **piece_kw)
                self._run(call, k, plan, sched, _needs(sched), piece, deadline)
                piece.clear()  # free this piece's staging and scratch before the next is cut
        else:
            self._run(call, 0, plan, plan.sched, plan.needs, bufs, deadline)
        if plan.finish is not None:
            plan.finish(bufs["out"])

    def _plan(
        self,
        key: tuple[Any, ...],
        op: str,
        algo: str | None,
        rop: ReduceOp | None,
        itemsize: int,
        has_out: bool,
        kw: dict[str, Any],
    ) -> _Plan:
        """Decide, once per call shape, how a call moves (see :meth:`move`)."""
        root = kw.get("root")
        lands = has_out and rop is not None and (root is None or root == self.rank)
        finish = functools.partial(finish_mean, size=self.size) if rop is _MEAN and lands else None
        sent = wire_op(rop) if rop is not None else None
        forced = algo or self._forced.get(op)
        nbytes, local = calls.total(itemsize, **kw), self.routes.local
        chosen = select.select(
            op,
            self.size,
            nbytes,
            forced,
            hosts=self._topology,
            deterministic=self._deterministic,
            group=self._shm is not None,
            crowded_copy=local is not None and local.direct and local.crowded,
        )
        if chosen == select.GROUP:
            plan = _Plan(True, chosen, None, sent, finish, False, (0, 0, False))
        else:
            pieces = select.in_pieces(
                op, chosen, self.size, nbytes, PIECE_BYTES, self._topology, itemsize, **kw
            )
            sched = (
                None
                if pieces
                else _schedule(op, chosen, self.rank, self.size, self._topology, **kw)
            )
            keep = op in calls.SUMS_INTO_INPUT and root != self.rank
            needs = _needs(sched) if sched is not None else (0, 0, False)
            plan = _Plan(False, chosen, sched, sent, finish, keep, needs)
        if len(self._plans) >= 256:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _run(
        self,
        call: Call,
        piece: int,
        plan: _Plan,
        sched: Schedule,
        needs: tuple[int, int, bool],
        bufs: dict[str, np.ndarray],
        deadline: float,
    ) -> None:
        """Execute the schedule of one call, or of its ``piece`` (1, 2, …)."""
        self._recorder.note(plan.algo, sched, self._transport_of(sched))
        out_size, tmp_size, writes_out = needs
        if plan.keep_input and writes_out:
            bufs = {"out": bufs["out"].copy()}  # a non-root's input must come back unchanged
        dtype = next(iter(bufs.values())).dtype
        if "out" not in bufs or bufs["out"].size < out_size:
            bufs["out"] = np.empty(out_size, dtype)
        if tmp_size and ("tmp" not in bufs or bufs["tmp"].size < tmp_size):
            bufs["tmp"] = np.empty(tmp_size, dtype)
        sig = call.sig if not piece else (call.sig + piece * PIECE_SIG) & ((1 << 64) - 1)
        self._engine.run(sched, bufs, plan.sent, call.seq, sig, deadline)

    def _group_way(self, way: str) -> None:
        """The shm group tells which way a call goes (one_step, staged, single_copy)."""
        self._recorder.note(f"shm_group/{way}", None, "shm")

    def _transport_of(self, sched: Schedule) -> str:
        """Which transports a schedule's messages use on this rank: "shm", "tcp" or "shm+tcp".

        Kept per schedule object (schedules come from a cache, so a call repeats the same one):
        the fast path pays a dict lookup, not a walk over every round's peers."""
        known = self._kinds.get(id(sched))
        if known is not None and known[0] is sched:
            return known[1]
        kinds = "+".join(sorted({self.routes.kind(p) for p in sched.peers()})) or "self"
        if len(self._kinds) >= 512:
            self._kinds.clear()
        self._kinds[id(sched)] = (sched, kinds)  # holding sched keeps its id from being reused
        return kinds

    def abort(self, reason: str) -> None:
        """Tell every connected peer this communicator failed, so none waits on it."""
        self.routes.abort(reason)
        if self._shm is not None:
            self._shm.abort(reason)

    def close(self) -> None:
        self.routes.close()
        if self._shm is not None:
            self._shm.close()

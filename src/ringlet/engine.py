"""Runs a Schedule over a Transport: copies, rounds of messages, segmented reductions.

The engine owns everything an algorithm should not know about: buffers as bytes, cutting large
reducing rounds into segments so the scratch memory stays one segment per peer whatever the
message size, folding an ordered round's segments in rank order, and the deadline. Schedules
stay pure data (see ``schedules/base.py``).
"""

from __future__ import annotations

import numpy as np

from .ops import ReduceOp, binary, combine
from .schedules.base import Recv, Round, Schedule, fold_order
from .transport.base import Tag, Transport

#: Bytes per segment of a reducing round: the scratch a receive-and-reduce needs per peer.
SEGMENT_BYTES = 1 << 20
#: ...where every message is one kernel copy from the peer's memory (every rank on one host,
#: cross-memory attach): each segment then costs a hand-shake and the pinning of its pages, so
#: larger ones pay off. Forced ring / ordered folds over shm, interleaved against the shm group
#: (benchmarks/group_ab.py): 2 ranks all_reduce 16 / 64 MiB 1.25 / 1.46x the group's time with
#: 1 MiB segments, 0.97 / 1.05x with 4 MiB; 4 ranks ordered reduce_scatter 2.9 / 2.2x -> 1.7x.
DIRECT_SEGMENT_BYTES = 4 << 20


def as_bytes(a: np.ndarray) -> memoryview:
    """The array's memory as bytes, for any dtype (bfloat16 has no buffer-protocol format)."""
    return memoryview(a.view(np.uint8))  # type: ignore[arg-type]


class Engine:
    """Executes schedules for one communicator over its transport."""

    def __init__(self, transport: Transport, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.transport = transport
        self.segment_bytes = segment_bytes
        self._landing: list[np.ndarray] = []  # see _scratch
        self._areas: dict[
            tuple[np.dtype, tuple[int, ...]], list[tuple[np.ndarray, memoryview]]
        ] = {}

    def _scratch(self, dtype: np.dtype, counts: list[int]) -> list[tuple[np.ndarray, memoryview]]:
        """One landing area per reducing receive of a round (typed, and as bytes for the
        transport), at most one segment each, carved from byte buffers the engine keeps: a
        reducing round allocates (and faults in) nothing after the first, and the memory held
        stays one segment per peer received from at once. The views are kept per shape too."""
        key = (dtype, tuple(counts))
        known = self._areas.get(key)
        if known is not None:
            return known
        pool, need = self._landing, max(counts, default=0) * dtype.itemsize
        for i in range(len(counts)):
            if i == len(pool):
                pool.append(np.empty(max(need, self.segment_bytes), np.uint8))
            elif pool[i].size < need:  # an element wider than the segment size (tests)
                pool[i] = np.empty(need, np.uint8)
                self._areas.clear()  # views of the buffer replaced
        areas = [pool[i][: c * dtype.itemsize] for i, c in enumerate(counts)]
        made = [(a.view(dtype), as_bytes(a)) for a in areas]
        if len(self._areas) >= 256:
            self._areas.clear()
        self._areas[key] = made
        return made

    def run(
        self,
        sched: Schedule,
        bufs: dict[str, np.ndarray],
        op: ReduceOp | None,
        seq: int,
        sig: int,
        deadline: float,
    ) -> None:
        """Execute ``sched`` on the flat buffers ``bufs`` ("in", "out", "tmp")."""
        dtype = next(iter(bufs.values())).dtype
        isz = dtype.itemsize
        seg = max(1, self.segment_bytes // max(1, isz))
        views: dict[str, memoryview] = {}  # each buffer as bytes, made once per call
        for k, step in enumerate(_compiled(sched)):
            rnd, copies, folded = step
            for src_buf, src, dst_buf, dst, n in copies:  # one memmove each, any dtype
                _view(views, bufs, dst_buf)[dst * isz : (dst + n) * isz] = _view(
                    views, bufs, src_buf
                )[src * isz : (src + n) * isz]
            if not (rnd.sends or rnd.recvs):
                continue
            assert op is not None or not folded, "reduce needs an op"
            if folded > seg:
                self._round(rnd, bufs, dtype, seg, folded, op, Tag(seq, sig, k), deadline)
            else:
                self._whole(rnd, bufs, views, dtype, op, Tag(seq, sig, k), deadline)

    def _whole(
        self,
        rnd: Round,
        bufs: dict[str, np.ndarray],
        views: dict[str, memoryview],
        dtype: np.dtype,
        op: ReduceOp | None,
        tag: Tag,
        deadline: float,
    ) -> None:
        """A round whose folded messages fit one segment: every message in one exchange, cut
        from byte views of the buffers made once per call (the common case, kept short)."""
        isz = dtype.itemsize
        sends = [
            (m.peer, _view(views, bufs, m.buf)[m.start * isz : m.stop * isz]) for m in rnd.sends
        ]
        reduces: list[tuple[Recv, np.ndarray, np.ndarray]] = []
        recvs: list[tuple[int, memoryview]] = []
        folded = [v for v in rnd.recvs if v.reduce]
        areas = iter(self._scratch(dtype, [v.count for v in folded]) if folded else ())
        for v in rnd.recvs:
            if v.reduce:
                landing, raw = next(areas)
                reduces.append((v, bufs[v.buf][v.start : v.stop], landing))
                recvs.append((v.peer, raw))
            else:
                recvs.append((v.peer, _view(views, bufs, v.buf)[v.start * isz : v.stop * isz]))
        self.transport.exchange(sends, recvs, tag, deadline)
        if rnd.ordered:
            fold_ranges(op, self.transport.rank, reduces)  # type: ignore[arg-type]
            return
        for v, dest, landing in reduces:
            _fold(op, v, dest, landing, bufs, 0)  # type: ignore[arg-type]

    def _round(
        self,
        rnd: Round,
        bufs: dict[str, np.ndarray],
        dtype: np.dtype,
        seg: int,
        longest: int,
        op: ReduceOp | None,
        tag: Tag,
        deadline: float,
    ) -> None:
        """Move the round's messages (``seg`` elements a segment; ``longest``: its longest folded
        message, from the compiled schedule): a folded one (a reducing receive and the Send it meets) in
        segments, cut by its length alone so both sides cut alike, each landing in scratch and
        then combined (in rank order with the other receives of its range if the round is
        ordered); every other message whole, straight into place, with the first segment."""
        folded = [v for v in rnd.recvs if v.reduce]
        areas = self._scratch(dtype, [min(seg, v.count) for v in folded])
        scratch = {v.peer: a for v, (a, _) in zip(folded, areas, strict=True)}
        for s, lo in enumerate(range(0, longest, seg)):
            sends = [
                (m.peer, as_bytes(bufs[m.buf][m.start + lo : min(m.stop, m.start + lo + seg)]))
                if m.fold
                else (m.peer, as_bytes(bufs[m.buf][m.start : m.stop]))
                for m in rnd.sends
                if lo < m.count and (m.fold or not s)
            ]
            recvs: list[tuple[int, memoryview]] = []
            reduces: list[tuple[Recv, np.ndarray, np.ndarray]] = []
            for v in rnd.recvs:
                if not v.reduce:
                    if not s:
                        recvs.append((v.peer, as_bytes(bufs[v.buf][v.start : v.stop])))
                    continue
                if lo >= v.count:
                    continue
                dest = bufs[v.buf][v.start + lo : min(v.stop, v.start + lo + seg)]
                landing = scratch[v.peer][: dest.size]
                reduces.append((v, dest, landing))
                recvs.append((v.peer, as_bytes(landing)))
            self.transport.exchange(sends, recvs, Tag(tag.seq, tag.sig, tag.round, s), deadline)
            if rnd.ordered:
                fold_ranges(op, self.transport.rank, reduces)  # type: ignore[arg-type]
                continue
            for v, dest, landing in reduces:
                _fold(op, v, dest, landing, bufs, lo)  # type: ignore[arg-type]


def _fold(
    op: ReduceOp,
    v: Recv,
    dest: np.ndarray,
    landing: np.ndarray,
    bufs: dict[str, np.ndarray],
    lo: int,
) -> None:
    """Combine what landed for ``v`` (its segment from element ``lo``) into ``dest``: with
    ``dest``'s own elements, or with those of ``v.onto`` (read straight from the input, so the
    schedule needs no working copy of it)."""
    if v.onto is None:
        combine(op, dest, landing)
        return
    start = v.onto[1] + lo
    binary(op, dest.dtype)(bufs[v.onto[0]][start : start + dest.size], landing, dest)


def _view(views: dict[str, memoryview], bufs: dict[str, np.ndarray], name: str) -> memoryview:
    """Buffer ``name`` as bytes, made once per call and kept in ``views``."""
    got = views.get(name)
    if got is None:
        got = views[name] = as_bytes(bufs[name])
    return got


_Step = tuple[Round, tuple[tuple[str, int, str, int, int], ...], int]


_COMPILED: dict[int, tuple[Schedule, tuple[_Step, ...]]] = {}


def _compiled(sched: Schedule) -> tuple[_Step, ...]:
    """Per round: the round, its copies as plain tuples, and the longest folded message (0:
    none), so that running a cached schedule again walks no dataclass fields it need not.

    Kept by the schedule's identity (schedules come from caches; hashing one walks all of it);
    holding the schedule keeps its id from being reused."""
    known = _COMPILED.get(id(sched))
    if known is not None and known[0] is sched:
        return known[1]
    steps = []
    for rnd in sched.rounds:
        copies = tuple((c.src_buf, c.src, c.dst_buf, c.dst, c.count) for c in rnd.copies)
        folded = max(
            [s.count for s in rnd.sends if s.fold] + [v.count for v in rnd.recvs if v.reduce] + [0]
        )
        steps.append((rnd, copies, folded))
    if len(_COMPILED) >= 1024:
        _COMPILED.clear()
    _COMPILED[id(sched)] = (sched, tuple(steps))
    return tuple(steps)


def fold_ranges(
    op: ReduceOp, rank: int, reduces: list[tuple[Recv, np.ndarray, np.ndarray]]
) -> None:
    """Fold each range's landed segments and this rank's own value there strictly in rank order.

    ``combine(op, acc, x)`` computes ``acc op x``, so the accumulator is always the left operand:
    the result is exactly ``functools.reduce(op, [x_0, …, x_{p-1}])`` element by element.
    """
    by_range: dict[tuple[str, int, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
    for v, dest, landing in reduces:
        by_range.setdefault((v.buf, v.start, v.stop), (dest, {}))[1][v.peer] = landing
    for dest, landed in by_range.values():
        before, after = fold_order(rank, list(landed))
        if not before:  # own value first: fold straight into it
            for p in after:
                combine(op, dest, landed[p])
            continue
        acc = landed[before[0]]  # the lowest rank's segment accumulates, then lands in dest
        for p in before[1:]:
            combine(op, acc, landed[p])
        combine(op, acc, dest)
        for p in after:
            combine(op, acc, landed[p])
        dest[...] = acc

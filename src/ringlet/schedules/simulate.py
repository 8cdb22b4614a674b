"""Run every rank's schedule in one process on NumPy buffers: the reference the tests trust.

:func:`events` plays all ranks' rounds forward the way the engine could (a message moves once
its sender and receiver both are in the rounds that hold it; a round ends when all its messages
moved) and raises :class:`Deadlock` when no rank can move. :func:`run` applies those events to
buffers and :func:`replay` does everything for one collective call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import (
    Recv,
    Schedule,
    Send,
    check_aligned,
    check_hazards,
    extent,
    fold_order,
    validate,
)
from .select import build

Reduce = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: Where each op's input starts: the engine puts the caller's data in "out" for in-place ops.
INPUT_BUF: dict[str, str] = {"all_reduce": "out", "broadcast": "out", "reduce": "out"}


class Deadlock(AssertionError):
    """No rank can make progress although some have rounds left (a schedule bug)."""


@dataclass(frozen=True)
class Enter:
    """``rank`` starts round ``round`` (its copies happen now)."""

    rank: int
    round: int


@dataclass(frozen=True)
class Transfer:
    """A message moves: ``send`` of ``src`` (in its ``src_round``) into ``recv`` of ``dst``."""

    src: int
    src_round: int
    send: Send
    dst: int
    dst_round: int
    recv: Recv


@dataclass(frozen=True)
class Done:
    """Every message of ``rank``'s round ``round`` has moved."""

    rank: int
    round: int


Event = Enter | Transfer | Done


class _Player:
    """Per-rank progress through the rounds; messages keyed by (peer, n-th message of the pair)."""

    def __init__(self, schedules: Sequence[Schedule]) -> None:
        self.schedules = schedules
        self.cur = [0] * len(schedules)
        self.sends: list[dict[tuple[int, int], Send]] = [{} for _ in schedules]
        self.recvs: list[dict[tuple[int, int], Recv]] = [{} for _ in schedules]
        self.sent_to: list[dict[int, int]] = [{} for _ in schedules]
        self.got_from: list[dict[int, int]] = [{} for _ in schedules]

    def finished(self, rank: int) -> bool:
        return self.cur[rank] >= len(self.schedules[rank].rounds)

    def enter(self, rank: int) -> Iterator[Event]:
        """Start the current round of ``rank``, completing message-free rounds on the way."""
        while not self.finished(rank):
            rnd = self.schedules[rank].rounds[self.cur[rank]]
            yield Enter(rank, self.cur[rank])
            for s in rnd.sends:
                n = self.sent_to[rank].get(s.peer, 0)
                self.sent_to[rank][s.peer] = n + 1
                self.sends[rank][(s.peer, n)] = s
            for v in rnd.recvs:
                n = self.got_from[rank].get(v.peer, 0)
                self.got_from[rank][v.peer] = n + 1
                self.recvs[rank][(v.peer, n)] = v
            if rnd.sends or rnd.recvs:
                return
            yield Done(rank, self.cur[rank])
            self.cur[rank] += 1

    def describe(self) -> str:
        waits = []
        for rank in range(len(self.schedules)):
            if not self.finished(rank):
                sends = [f"send #{n} to {p}" for p, n in self.sends[rank]]
                recvs = [f"recv #{n} from {p}" for p, n in self.recvs[rank]]
                waits.append(f"rank {rank} in round {self.cur[rank]}: {', '.join(sends + recvs)}")
        return "; ".join(waits)


def events(schedules: Sequence[Schedule]) -> Iterator[Event]:
    """All ranks' rounds played forward, in an order the engine could run them.

    Raises Deadlock, naming what each stuck rank waits for, if no message can move.
    """
    size, play = len(schedules), _Player(schedules)
    for rank in range(size):
        yield from play.enter(rank)
    while not all(play.finished(r) for r in range(size)):
        moved = False
        for a in range(size):
            for (b, n), send in list(play.sends[a].items()):
                recv = play.recvs[b].pop((a, n), None)
                if recv is not None:  # the receiver is in the round holding the match
                    del play.sends[a][(b, n)]
                    yield Transfer(a, play.cur[a], send, b, play.cur[b], recv)
                    moved = True
        for r in range(size):
            if not play.finished(r) and not play.sends[r] and not play.recvs[r]:
                yield Done(r, play.cur[r])
                play.cur[r] += 1
                yield from play.enter(r)
                moved = True
        if not moved:
            raise Deadlock(f"no rank can progress: {play.describe()}")


def _view(buf: np.ndarray, start: int, stop: int, what: str) -> np.ndarray:
    """``buf[start:stop]``, refusing ranges NumPy would silently clip."""
    if not 0 <= start <= stop <= buf.size:
        raise AssertionError(f"{what}: range {start}:{stop} outside a buffer of {buf.size}")
    return buf[start:stop]


def run(
    schedules: Sequence[Schedule], bufs: Sequence[dict[str, np.ndarray]], reduce: Reduce
) -> None:
    """Execute all ranks' schedules on their buffers ("in", "out", "tmp" per rank).

    ``reduce(local, incoming)`` returns the combination a ``Recv(reduce=True)`` stores; an
    ordered round keeps what lands and folds it in rank order when the round is done.
    Raises Deadlock, or AssertionError for a range outside its buffer.
    """
    landed: dict[tuple[int, Recv], np.ndarray] = {}  # (receiver, ordered recv) -> its data
    for ev in events(schedules):
        if isinstance(ev, Enter):
            for c in schedules[ev.rank].rounds[ev.round].copies:
                where = f"rank {ev.rank} round {ev.round} copy"
                data = _view(bufs[ev.rank][c.src_buf], c.src, c.src + c.count, where).copy()
                _view(bufs[ev.rank][c.dst_buf], c.dst, c.dst + c.count, where)[:] = data
        elif isinstance(ev, Transfer):
            s, v = ev.send, ev.recv
            data = _view(bufs[ev.src][s.buf], s.start, s.stop, f"rank {ev.src} send").copy()
            into = _view(bufs[ev.dst][v.buf], v.start, v.stop, f"rank {ev.dst} recv")
            if v.reduce and schedules[ev.dst].rounds[ev.dst_round].ordered:
                landed[(ev.dst, v)] = data
            elif v.onto is not None:
                base = bufs[ev.dst][v.onto[0]]
                into[:] = reduce(_view(base, v.onto[1], v.onto[1] + v.count, "onto"), data)
            else:
                into[:] = reduce(into, data) if v.reduce else data
        elif schedules[ev.rank].rounds[ev.round].ordered:
            _fold(ev.rank, schedules[ev.rank].rounds[ev.round].recvs, bufs[ev.rank], landed, reduce)


def _fold(
    rank: int,
    recvs: Sequence[Recv],
    bufs: dict[str, np.ndarray],
    landed: dict[tuple[int, Recv], np.ndarray],
    reduce: Reduce,
) -> None:
    """Fold an ordered round's landed data with the rank's own value, range by range, in rank order."""
    by_range: dict[tuple[str, int, int], dict[int, np.ndarray]] = {}
    for v in recvs:
        if v.reduce:
            by_range.setdefault((v.buf, v.start, v.stop), {})[v.peer] = landed.pop((rank, v))
    for (buf, start, stop), got in by_range.items():
        before, after = fold_order(rank, list(got))
        values = [got[p] for p in before] + [bufs[buf][start:stop].copy()] + [got[p] for p in after]
        acc = values[0]
        for x in values[1:]:
            acc = reduce(acc, x)
        bufs[buf][start:stop] = acc


def result_count(op: str, rank: int, size: int, **kw: Any) -> int:
    """Elements of ``out`` that hold ``op``'s result on ``rank`` (0 where there is none)."""
    root = kw.get("root", rank)
    if op in ("all_reduce", "broadcast"):
        return int(kw["count"])
    if op == "reduce":
        return int(kw["count"]) if rank == root else 0
    if op in ("all_gather", "gather"):
        return sum(kw["counts"]) if rank == root else 0
    if op in ("scatter", "reduce_scatter"):
        return int(kw["counts"][rank])
    if op == "all_to_all":
        return sum(kw["recv_counts"])
    return 0


def _garbage(n: int, dtype: np.dtype[Any]) -> np.ndarray:
    """Scratch contents that show up in a result if a schedule reads what it never wrote."""
    if np.issubdtype(dtype, np.inexact):
        return np.full(n, np.nan, dtype)
    junk = np.empty(n, dtype)
    junk.view(np.uint8)[:] = 0xA5
    return junk


def _rank_kwargs(op: str, rank: int, kw: dict[str, Any]) -> dict[str, Any]:
    """The schedule arguments of one rank (all_to_all's counts differ between ranks)."""
    if op == "all_to_all" and "matrix" in kw:
        matrix = kw["matrix"]
        return {"send_counts": list(matrix[rank]), "recv_counts": [row[rank] for row in matrix]}
    return kw


def _buffers(op: str, sched: Schedule, data: np.ndarray, n_result: int) -> dict[str, np.ndarray]:
    """One rank's buffers as the engine sizes them, with the input where the engine puts it."""
    if INPUT_BUF.get(op, "in") == "in":
        n_out = max(extent(sched, "out"), n_result)
        return {
            "in": data.copy(),
            "out": _garbage(n_out, data.dtype),
            "tmp": _garbage(extent(sched, "tmp"), data.dtype),
        }
    out = _garbage(max(extent(sched, "out"), n_result, data.size), data.dtype)
    out[: data.size] = data  # the engine's working copy of the caller's data
    return {"in": data[:0].copy(), "out": out, "tmp": _garbage(extent(sched, "tmp"), data.dtype)}


def replay(
    op: str, algo: str, size: int, inputs: list[np.ndarray], reduce: Reduce, **kw: Any
) -> list[np.ndarray]:
    """Run ``op`` by ``algo`` on ``size`` simulated ranks; return each rank's result region.

    ``inputs[r]`` is rank r's data where the engine puts it (``out`` for all_reduce, broadcast
    and reduce, else ``in``). For all_to_all pass ``matrix`` (``matrix[i][j]`` elements go from
    rank i to rank j) instead of per-rank counts. The schedules are first validated and checked
    for aligned rounds and in-round hazards; ``in`` must come back unchanged. Scratch starts as
    garbage. Raises AssertionError (or Deadlock) for a broken schedule.
    """
    per_rank = [_rank_kwargs(op, r, kw) for r in range(size)]
    scheds = [build(op, algo, r, size, **per_rank[r]) for r in range(size)]
    validate(scheds)
    check_aligned(scheds)
    for r, sched in enumerate(scheds):
        check_hazards(sched, r)
    n_result = [result_count(op, r, size, **per_rank[r]) for r in range(size)]
    bufs = [_buffers(op, scheds[r], inputs[r], n_result[r]) for r in range(size)]
    originals = [b["in"].copy() for b in bufs]
    run(scheds, bufs, reduce)
    for r, b in enumerate(bufs):
        assert b["in"].tobytes() == originals[r].tobytes(), f"rank {r}: 'in' was written"
    return [b["out"][: n_result[r]].copy() for r, b in enumerate(bufs)]

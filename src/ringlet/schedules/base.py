"""The schedule vocabulary: what moves between ranks, as plain data.

A collective algorithm is a pure function returning a :class:`Schedule`: a list of rounds, each a
set of local copies, then sends and receives, of element ranges of three flat buffers: ``"in"``
(the caller's input, read-only), ``"out"`` (the result) and ``"tmp"`` (scratch). The engine sizes
``out`` and ``tmp`` to what the schedule touches (at least the op's result size for ``out``), runs
the schedule over a transport, and the unit tests replay all ranks' schedules on NumPy arrays
without processes.

Rules every schedule keeps (checked by :func:`validate`):
- within a round a rank sends at most one message to a peer and receives at most one from it;
- every Send of rank a to b in round k meets a Recv of b from a in b's k-th round with that peer,
  of the same length;
- ``Recv(reduce=True)`` combines the incoming elements into ``buf[start:stop]`` with the reduce op
  (``onto=(b, i)``: with ``b[i:i + count]`` instead of the range's own elements, so no working
  copy of the input is made; not in ordered rounds), and the Send it meets says so
  (``fold=True``): both ends cut a folded message into segments alike (the receiver's scratch is
  one segment), while any other message moves whole, straight into place;
- in a round with ``ordered=True``, the reducing receives that land on one range are folded
  together with this rank's own value there strictly in rank order,
  ``((x_0 op x_1) op x_2) … op x_{p-1}`` over the peers and this rank (deterministic reductions);
- a round's copies happen first, then its sends and receives (a copy never reads what the same
  round receives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Buf = Literal["in", "out", "tmp"]


@dataclass(frozen=True)
class Send:
    """Send elements ``buf[start:stop]`` to rank ``peer``; ``fold``: the peer combines them into
    its data (its Recv has ``reduce=True``)."""

    peer: int
    start: int
    stop: int
    buf: Buf = "out"
    fold: bool = False

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Recv:
    """Receive from ``peer`` into ``buf[start:stop]``; ``reduce`` combines, not overwrites: with
    the range's own elements, or ``onto``'s (a buffer and start) which are only read."""

    peer: int
    start: int
    stop: int
    reduce: bool = False
    buf: Buf = "out"
    onto: tuple[Buf, int] | None = None

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Copy:
    """``dst_buf[dst:dst+count] = src_buf[src:src+count]``, before the round's messages."""

    src: int
    dst: int
    count: int
    src_buf: Buf = "in"
    dst_buf: Buf = "out"


@dataclass(frozen=True)
class Round:
    """Messages that may proceed concurrently; the round ends when all of them completed.

    ``ordered``: reducing receives of one range fold with the rank's own value in rank order
    (``functools.reduce`` over ranks), not in arrival order; they may share the range.
    """

    sends: tuple[Send, ...] = ()
    recvs: tuple[Recv, ...] = ()
    copies: tuple[Copy, ...] = ()
    ordered: bool = False


@dataclass(frozen=True)
class Schedule:
    """An algorithm's plan for one rank: rounds in order."""

    rounds: tuple[Round, ...] = field(default_factory=tuple)
    name: str = ""

    def peers(self) -> set[int]:
        return {s.peer for r in self.rounds for s in r.sends} | {
            v.peer for r in self.rounds for v in r.recvs
        }


def schedule(rounds: Sequence[Round], name: str = "") -> Schedule:
    """Build a schedule, dropping empty rounds and zero-length messages."""
    kept = [_nonempty(r) for r in rounds]
    return Schedule(tuple(r for r in kept if r.sends or r.recvs or r.copies), name)


def _nonempty(r: Round) -> Round:
    """``r`` without zero-length messages and copies (an ordered round without messages is not)."""
    sends = tuple(s for s in r.sends if s.count > 0)
    recvs = tuple(v for v in r.recvs if v.count > 0)
    copies = tuple(c for c in r.copies if c.count > 0)
    return Round(sends, recvs, copies, r.ordered and bool(recvs))


def even_chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into ``parts`` contiguous (start, stop) ranges, first ones larger."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def offsets(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of the given sizes."""
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def validate(schedules: Sequence[Schedule]) -> None:
    """Check that every rank's sends meet a receive of the same length, in the same order.

    Raises AssertionError (an internal invariant: schedules are code, not user input).
    """
    size = len(schedules)
    # Per ordered pair (a -> b): the lengths a sends and b receives, in order, and whether folded.
    sent: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    got: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for rank, sched in enumerate(schedules):
        for rnd in sched.rounds:
            speers = [s.peer for s in rnd.sends]
            rpeers = [v.peer for v in rnd.recvs]
            assert len(set(speers)) == len(speers), f"rank {rank}: two sends to one peer in a round"
            assert len(set(rpeers)) == len(rpeers), (
                f"rank {rank}: two recvs from one peer in a round"
            )
            for s in rnd.sends:
                assert 0 <= s.peer < size and s.peer != rank, f"rank {rank}: bad peer {s.peer}"
                sent.setdefault((rank, s.peer), []).append((s.count, s.fold))
            for v in rnd.recvs:
                assert 0 <= v.peer < size and v.peer != rank, f"rank {rank}: bad peer {v.peer}"
                got.setdefault((v.peer, rank), []).append((v.count, v.reduce))
    assert sent == got, f"sends and receives do not pair up: {sent} != {got}"


def extent(sched: Schedule, buf: Buf) -> int:
    """How many elements of ``buf`` the schedule touches (the size the engine must allocate)."""
    end = 0
    for r in sched.rounds:
        for s in r.sends:
            if s.buf == buf:
                end = max(end, s.stop)
        for v in r.recvs:
            if v.buf == buf:
                end = max(end, v.stop)
            if v.onto is not None and v.onto[0] == buf:
                end = max(end, v.onto[1] + v.count)
        for c in r.copies:
            if c.src_buf == buf:
                end = max(end, c.src + c.count)
            if c.dst_buf == buf:
                end = max(end, c.dst + c.count)
    return end


# -- helpers for algorithms whose round k is the same step on every rank -------------------------
# The engine tags each message with its round number and the receiving side checks it, so a Send
# in round k must meet its Recv in the peer's round k: algorithms build one Round per global step
# (empty where a rank sits out) and :func:`timeline` keeps those placeholders.


def timeline(rounds: Sequence[Round], name: str = "") -> Schedule:
    """Build a schedule whose round k is step k on every rank.

    Drops zero-length messages and copies and the trailing empty rounds, but keeps interior empty
    rounds so that round numbers agree between peers (unlike :func:`schedule`).
    """
    kept = [_nonempty(r) for r in rounds]
    while kept and not (kept[-1].sends or kept[-1].recvs or kept[-1].copies):
        kept.pop()
    return Schedule(tuple(kept), name)


def first_copies(rounds: Sequence[Round], *copies: Copy) -> list[Round]:
    """``rounds`` with ``copies`` done at the start of the first round (one is added if none)."""
    if not rounds:
        return [Round(copies=copies)]
    head = rounds[0]
    return [Round(head.sends, head.recvs, copies + head.copies, head.ordered), *rounds[1:]]


def last_copies(rounds: Sequence[Round], *copies: Copy) -> list[Round]:
    """``rounds`` followed by a round of ``copies`` (they run after every message completed)."""
    return [*rounds, Round(copies=copies)] if copies else list(rounds)


def _overlap(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2] and a[1] < a[2] and b[1] < b[2]


def check_hazards(sched: Schedule, rank: int = -1) -> None:
    """Check one rank's rounds for ranges the engine could read and write at once.

    Within a round: nothing is written into ``"in"``; no receive overlaps a send or another
    receive (except reducing receives of the very same range in an ordered round, which fold
    together); no copy destination overlaps another copy's source or destination. Raises
    AssertionError (schedules are code, not user input).
    """
    for k, r in enumerate(sched.rounds):
        where = f"rank {rank} round {k}"
        written = [(v.buf, v.start, v.stop) for v in r.recvs]
        sent = [(s.buf, s.start, s.stop) for s in r.sends]
        assert all(w[0] != "in" for w in written), f"{where}: receives into 'in'"
        read = sent + [(v.onto[0], v.onto[1], v.onto[1] + v.count) for v in r.recvs if v.onto]
        assert not (r.ordered and len(read) > len(sent)), f"{where}: folds onto in an ordered round"
        for w in written:
            assert not any(_overlap(w, s) for s in read), f"{where}: receives into {w}, also read"
        # Reducing receives of an ordered round fold together: one range may take several.
        fold = {w for w, v in zip(written, r.recvs, strict=True) if r.ordered and v.reduce}
        alone = [w for w, v in zip(written, r.recvs, strict=True) if not (r.ordered and v.reduce)]
        ranges = alone + sorted(fold)
        for i, w in enumerate(ranges):
            assert not any(_overlap(w, o) for o in ranges[i + 1 :]), f"{where}: overlapping recvs"
        dsts = [(c.dst_buf, c.dst, c.dst + c.count) for c in r.copies]
        srcs = [(c.src_buf, c.src, c.src + c.count) for c in r.copies]
        assert all(d[0] != "in" for d in dsts), f"{where}: copies into 'in'"
        for i, d in enumerate(dsts):
            others = dsts[:i] + dsts[i + 1 :] + srcs[:i] + srcs[i + 1 :]
            assert not any(_overlap(d, o) for o in others), f"{where}: copies overlap at {d}"


def check_aligned(schedules: Sequence[Schedule]) -> None:
    """Check that every message is sent and received in rounds of the same number.

    The engine's frames carry the round number, so a peer one round ahead is a mismatch.
    Raises AssertionError.
    """
    sent: dict[tuple[int, int], list[tuple[int, int]]] = {}
    got: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rank, sched in enumerate(schedules):
        for k, rnd in enumerate(sched.rounds):
            for s in rnd.sends:
                sent.setdefault((rank, s.peer), []).append((k, s.count))
            for v in rnd.recvs:
                got.setdefault((v.peer, rank), []).append((k, v.count))
    assert sent == got, f"(round, length) of sends and receives differ: {sent} != {got}"


def fold_order(rank: int, peers: Sequence[int]) -> tuple[list[int], list[int]]:
    """The peers whose values an ordered round folds before and after this rank's own value."""
    return sorted(p for p in peers if p < rank), sorted(p for p in peers if p > rank)

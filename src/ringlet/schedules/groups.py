"""Sub-groups of a communicator: which ranks share a host, and a group's schedule in rank terms.

A hierarchical algorithm runs existing algorithms over sub-groups (the ranks of one host, or
one rank of every host) phase after phase. :func:`phase` builds this rank's part of one phase:
the group's schedule with peer indices mapped to the communicator's ranks and buffer ranges
moved to where the phase keeps its data, padded with empty rounds to the longest schedule of
any group in the phase, so that round k of a phase is the same global round on every rank
(the engine tags messages with their round number).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

from .base import Buf, Copy, Recv, Round, Schedule, Send, even_chunks

#: Where a group schedule's buffers live in ours: its buffer -> (our buffer, offset).
Place = Mapping[Buf, tuple[Buf, int]]
Rounds = Callable[..., "Schedule | list[Round]"]
F = TypeVar("F", bound=Callable[..., Any])

#: Phase lengths algorithms declare (:func:`spans`): algorithm -> length(size, **kw).
SPANS: dict[Callable[..., Any], Callable[..., int]] = {}


class Group(NamedTuple):
    """One group of a phase: its ranks (group index i is ``members[i]``), arguments, place."""

    members: tuple[int, ...]
    kw: Mapping[str, Any]
    place: Place


def host_members(hosts: Sequence[int]) -> list[tuple[int, ...]]:
    """The ranks of each host in rank order, hosts in order of first appearance."""
    by_host: dict[int, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    return [tuple(ranks) for ranks in by_host.values()]


def locate(members: Sequence[Sequence[int]], rank: int) -> tuple[int, int]:
    """(host index, index among the host's ranks) of ``rank``."""
    for h, ranks in enumerate(members):
        if rank in ranks:
            return h, list(ranks).index(rank)
    raise ValueError(f"rank {rank} is on no host")


def spans_hosts(hosts: Sequence[int] | None) -> bool:
    """True if ranks sit on more than one host and some host holds more than one of them."""
    if hosts is None:
        return False
    n = len(set(hosts))
    return 1 < n < len(hosts)


def lift(rounds: Sequence[Round], members: Sequence[int], place: Place) -> list[Round]:
    """A group's rounds in communicator terms: peer i is ``members[i]``, ranges moved by place."""

    def at(buf: Buf, lo: int) -> tuple[Buf, int]:
        ours, offset = place.get(buf, (buf, 0))
        return ours, lo + offset

    def send(s: Send) -> Send:
        buf, lo = at(s.buf, s.start)
        return Send(members[s.peer], lo, lo + s.count, buf, s.fold)

    def recv(v: Recv) -> Recv:
        buf, lo = at(v.buf, v.start)
        return Recv(members[v.peer], lo, lo + v.count, v.reduce, buf, v.onto and at(*v.onto))

    def copy(c: Copy) -> Copy:
        (sb, src), (db, dst) = at(c.src_buf, c.src), at(c.dst_buf, c.dst)
        return Copy(src, dst, c.count, sb, db)

    return [
        Round(
            tuple(map(send, r.sends)),
            tuple(map(recv, r.recvs)),
            tuple(map(copy, r.copies)),
            r.ordered,
        )
        for r in rounds
    ]


def _rounds(made: Schedule | list[Round]) -> list[Round]:
    return list(made.rounds) if isinstance(made, Schedule) else made


def spans(length: Callable[..., int]) -> Callable[[F], F]:
    """Declare ``length(size, **kw)``: the rounds of the decorated algorithm's longest member
    schedule over a group of ``size``, so :func:`span` need not build every member's (O(p²)
    for a ring across p hosts). tests/unit/test_plan_scale.py checks each against building."""

    def mark(fn: F) -> F:
        SPANS[fn] = length
        return fn

    return mark


@lru_cache(maxsize=4096)
def span(fn: Rounds, size: int, kw: tuple[tuple[str, Any], ...]) -> int:
    """Rounds of the longest member schedule of ``fn`` over a group of ``size``."""
    known = SPANS.get(fn)
    return known(size, **dict(kw)) if known is not None else built_span(fn, size, kw)


def built_span(fn: Rounds, size: int, kw: tuple[tuple[str, Any], ...]) -> int:
    """:func:`span` by building every member's schedule (the reference for declared ones)."""
    return max(len(_rounds(fn(i, size, **dict(kw)))) for i in range(size))


def phase(fn: Rounds, groups: Sequence[Group], rank: int) -> list[Round]:
    """This rank's rounds of one phase running ``fn(i, len(members), **kw)`` in every group.

    Arguments must be hashable (tuples, not lists): the phase lengths are cached.
    """
    length = max((span(fn, len(g.members), tuple(sorted(g.kw.items()))) for g in groups), default=0)
    mine: list[Round] = []
    for g in groups:
        if rank in g.members:
            made = fn(g.members.index(rank), len(g.members), **g.kw)
            mine = lift(_rounds(made), g.members, g.place)
    return mine + [Round()] * (length - len(mine))


class Lanes(NamedTuple):
    """Per-rank blocks cut for K lanes: host h's blocks (its ranks in rank order) form D_h, split
    evenly into K parts; lane k's slice L_k is part k of every host, in host order."""

    host: list[int]  # [rank] -> host index
    home: list[int]  # [rank] -> offset of the rank's block in its host's D_h
    part: list[list[tuple[int, int]]]  # [host][lane] -> range in D_h
    pos: list[list[int]]  # [lane][host] -> where the part sits, lane after lane
    lane: list[tuple[int, int]]  # [lane] -> range of L_k, lane after lane


def lanes_layout(members: Sequence[Sequence[int]], counts: Sequence[int], k: int) -> Lanes:
    """The lane-major layout of blocks of ``counts`` for ``k`` lanes over hosts ``members``."""
    host, home = [0] * len(counts), [0] * len(counts)
    for h, ranks in enumerate(members):
        at = 0
        for r in ranks:
            host[r], home[r], at = h, at, at + counts[r]
    part = [even_chunks(sum(counts[r] for r in ranks), k) for ranks in members]
    pos: list[list[int]] = []
    lane: list[tuple[int, int]] = []
    at = 0
    for j in range(k):
        lane_start = at
        pos.append([])
        for h in range(len(members)):
            pos[j].append(at)
            at += part[h][j][1] - part[h][j][0]
        lane.append((lane_start, at))
    return Lanes(host, home, part, pos, lane)


def pieces(lay: Lanes, counts: Sequence[int], rank: int) -> list[tuple[int, int, int, int]]:
    """(lane, offset in the rank's block, lane-major offset, length) of each non-empty piece."""
    h, lo, hi = lay.host[rank], lay.home[rank], lay.home[rank] + counts[rank]
    found = []
    for j, (plo, phi) in enumerate(lay.part[h]):
        a, b = max(lo, plo), min(hi, phi)
        if a < b:
            found.append((j, a - lo, lay.pos[j][h] + a - plo, b - a))
    return found


def _occupied(starts: Sequence[int], lengths: Sequence[int], offset: int) -> list[range]:
    """Global rounds each phase of a piece that starts at ``offset`` occupies."""
    return [range(offset + s, offset + s + n) for s, n in zip(starts, lengths, strict=True)]


def stride(lengths: Sequence[int], kinds: Sequence[str], pieces: int) -> int:
    """The fewest rounds between the starts of consecutive pieces so that no two pieces are ever
    in phases of the same kind in one round (phases of one kind talk to the same peers)."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total = sum(lengths)
    for d in range(1, total + 1):
        busy: dict[tuple[str, int], int] = {}
        clash = False
        for j in range(pieces):
            for kind, rounds in zip(kinds, _occupied(starts, lengths, j * d), strict=True):
                for g in rounds:
                    clash |= busy.setdefault((kind, g), j) != j
        if not clash:
            return d
    return total


def pipeline(pieces: Sequence[Sequence[Sequence[Round]]], kinds: Sequence[str]) -> list[Round]:
    """Run pieces (each a list of phases of rounds, alike in length on every rank) overlapped:
    piece j starts :func:`stride` rounds after piece j-1, so one piece's inter-host phase runs in
    the same rounds as another's intra-host phase. Pieces must touch disjoint buffer ranges."""
    if not pieces:
        return []
    lengths = [len(p) for p in pieces[0]]
    assert all([len(p) for p in piece] == lengths for piece in pieces), "pieces differ in shape"
    d = stride(lengths, kinds, len(pieces))
    merged: list[list[Round]] = [[] for _ in range((len(pieces) - 1) * d + sum(lengths))]
    for j, piece in enumerate(pieces):
        for i, rnd in enumerate(r for ph in piece for r in ph):
            assert not rnd.ordered, "ordered rounds cannot share a round with another piece"
            merged[j * d + i].append(rnd)
    return [
        Round(
            tuple(s for r in rs for s in r.sends),
            tuple(v for r in rs for v in r.recvs),
            tuple(c for r in rs for c in r.copies),
        )
        for rs in merged
    ]

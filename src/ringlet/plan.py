"""Predict a collective before it runs: the schedules the engine would execute, timed by a model.

:func:`predict` builds the real schedules (``schedules.select.build``) of an op, algorithm, size
and host layout and plays them through a round-by-round simulation: a round of a rank starts
when it and each peer it talks to in that round have finished their previous round (the engine
tags frames with the round number), and lasts

    max(local alpha + local beta · bytes to/from ranks of its host,
        net alpha + net beta · bytes the host's one NIC carries that round, all its ranks together)
    + reduce rate · bytes folded + copy rate · bytes copied,

the whole call adding a fixed per-call cost. Parameters come from :mod:`ringlet.calibrate`
(measured on this machine) or the documented presets of :data:`LINKS`.

Up to :data:`EXACT_RANKS` ranks every rank's schedule is built and simulated. Above, building
O(p)-round schedules for every rank costs O(p²), so only the ranks of a few representative hosts
are built (the root's host, hosts 1 and 2, the last host) and the call takes as long as the sum
over rounds of the slowest representative round (all ranks in step: exact when equivalent ranks
do the same in every round, as in rings, trees from the root, doubling). Pipelines (chain
broadcast/reduce, hier's chain between hosts) run host h's rounds (h-1)·s rounds after host 1's,
where s is read off hosts 1 and 2. tests/unit/test_plan.py checks both paths agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .bench_cases import OPS, bus_factor
from .plan_params import Params
from .schedules.base import Schedule
from .schedules.cost import even_args
from .schedules.groups import spans_hosts
from .schedules.hier import HIER_SMALL
from .schedules.select import (
    ALGORITHMS,
    HIER_MODEL_MAX,
    RANK_ORDER,
    TOPOLOGICAL,
    build,
    select,
)

#: Up to this many ranks the model builds and simulates every rank's schedule.
EXACT_RANKS = 64
#: Above this many ranks, select's own topology model (run for small messages across hosts)
#: builds every rank's schedule: too slow to ask it for the "chosen" column.
SELECT_MODEL_RANKS = 512
#: Ops the model covers: every collective with a schedule (barrier too).
PLAN_OPS = (*OPS, "barrier")


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one algorithm."""

    op: str
    algo: str
    nbytes: int
    hosts: int
    ranks_per_host: int
    time_us: float
    busbw: float  # GB/s, nccl-tests convention (bench_cases.bus_factor)
    link_bytes: int  # bytes on the slowest link in its busier direction (a NIC, or one rank's)
    steps: int  # message rounds on the critical path
    chosen: bool  # select's choice for this call
    best: bool = False  # the model's fastest
    exact: bool = True  # every rank simulated (else representative hosts)
    ranks: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", self.hosts * self.ranks_per_host)


# -- per-round cost -------------------------------------------------------------------------------


@dataclass
class _Rounds:
    """Per rank and round of a set of ranks: the round's duration and whether it has messages."""

    dur: list[np.ndarray]
    busy: list[np.ndarray]
    peers: list[list[tuple[int, ...]]]
    link: int = 0  # elements the busiest link (a host's NIC; on one host a rank's) carries
    senders: list[list[tuple[int, ...]]] = field(default_factory=list)  # whom each round waits for


def _round_costs(
    scheds: dict[int, Schedule], hosts: Sequence[int], p: Params, itemsize: int
) -> _Rounds:
    """Durations of the rounds of ``scheds`` (rank -> schedule, all ranks of their hosts)."""
    load_out: dict[tuple[int, int], int] = {}
    load_in: dict[tuple[int, int], int] = {}
    per: dict[
        int, list[tuple[int, int, int, int, int, int, int, tuple[int, ...], tuple[int, ...]]]
    ] = {}
    for rank, sched in scheds.items():
        me, rows = hosts[rank], []
        for k, rnd in enumerate(sched.rounds):
            lo = li = no = ni = red = 0
            peers: set[int] = set()
            for s in rnd.sends:
                peers.add(s.peer)
                if hosts[s.peer] == me:
                    lo += s.stop - s.start
                else:
                    no += s.stop - s.start
            for v in rnd.recvs:
                peers.add(v.peer)
                if hosts[v.peer] == me:
                    li += v.stop - v.start
                else:
                    ni += v.stop - v.start
                if v.reduce:
                    red += v.stop - v.start
            cp = sum(c.count for c in rnd.copies) if rnd.copies else 0
            if no:
                load_out[(me, k)] = load_out.get((me, k), 0) + no
            if ni:
                load_in[(me, k)] = load_in.get((me, k), 0) + ni
            many = max(len(rnd.sends), len(rnd.recvs))
            rows.append(
                (lo, li, no, ni, red, cp, many, tuple(peers), tuple(v.peer for v in rnd.recvs))
            )
        per[rank] = rows
    one_host = len(set(hosts)) == 1
    totals: dict[tuple[int, int], int] = {}
    for rank, rows in per.items():
        key = rank if one_host else hosts[rank]
        sent = sum(row[0] + row[2] if one_host else row[2] for row in rows)
        got = sum(row[1] + row[3] if one_host else row[3] for row in rows)
        totals[(key, 0)] = totals.get((key, 0), 0) + sent
        totals[(key, 1)] = totals.get((key, 1), 0) + got
    out = _Rounds([], [], [], max(totals.values(), default=0))
    order = sorted(scheds)
    per_host = {h: hosts.count(h) for h in {hosts[r] for r in order}}
    for rank in order:
        me = hosts[rank]
        # More ranks than cores: local copies, folds and loopback transfers share the CPUs.
        cpu = max(1.0, per_host[me] / p.cores) if p.cores else 1.0
        durs: list[float] = []
        busy: list[bool] = []
        talks: list[tuple[int, ...]] = []
        waits: list[tuple[int, ...]] = []
        for k, (lo, li, no, ni, red, cp, many, pr, src) in enumerate(per[rank]):
            t = 0.0
            if lo or li:
                t = cpu * (p.local.alpha + p.local.beta * itemsize * max(lo, li))
            if no or ni:
                link = max(load_out.get((me, k), 0), load_in.get((me, k), 0))
                t = max(t, p.net.alpha + p.net.beta * itemsize * link)
            if many > 1:  # every message past the first costs its posting and completion
                t += p.gap * (many - 1)
            t += cpu * itemsize * (p.reduce * red + p.copy * cp)
            durs.append(t)
            busy.append(bool(pr))
            talks.append(pr)
            waits.append(src)
        out.dur.append(np.array(durs))
        out.busy.append(np.array(busy, dtype=bool))
        out.peers.append(talks)
        out.senders.append(waits)
    return out


def _simulate(rounds: _Rounds, size: int) -> tuple[float, int]:
    """(finish time, steps) of all ranks' rounds: a round starts once this rank and every peer
    it receives from in the round finished their previous round (sends are eager: the engine
    hands them to the transport without waiting for the receiver)."""
    length = max((len(d) for d in rounds.dur), default=0)
    ready, steps = np.zeros(size), np.zeros(size)
    for k in range(length):
        start, sstart = ready.copy(), steps.copy()
        for r in range(size):
            if k < len(rounds.dur[r]):
                for q in rounds.senders[r][k]:
                    start[r] = max(start[r], ready[q])
                    sstart[r] = max(sstart[r], steps[q])
        for r in range(size):
            if k < len(rounds.dur[r]):
                ready[r] = start[r] + rounds.dur[r][k]
                steps[r] = sstart[r] + rounds.busy[r][k]
    return float(ready.max(initial=0.0)), int(steps.max(initial=0))


def _in_step(parts: Sequence[Part]) -> tuple[float, int]:
    """(time, steps) with all ranks in step: the sum over rounds of the slowest round of any
    representative rank, each rank's rounds moved by each of its host's shifts (rounds moved
    before round 0 are dropped: they are the pipeline's idle ones)."""
    length = max((len(d) + max(shifts) for durs, _, shifts in parts for d in durs), default=0)
    slow, busy = np.zeros(max(length, 0)), np.zeros(max(length, 0), dtype=bool)
    for durs, busies, shifts in parts:
        for d, b in zip(durs, busies, strict=True):
            for s in shifts:
                cut = max(0, -s)
                d2, b2, at = d[cut:], b[cut:], max(0, s)
                np.maximum(slow[at : at + len(d2)], d2, out=slow[at : at + len(d2)])
                busy[at : at + len(b2)] |= b2
    return float(slow.sum()), int(busy.sum())


# -- layouts and arguments ------------------------------------------------------------------------


def layout(hosts: int, ranks_per_host: int) -> tuple[int, ...]:
    """Host of each rank: ranks host after host (what launchers do)."""
    return tuple(r // ranks_per_host for r in range(hosts * ranks_per_host))


def elements(op: str, nbytes: int, size: int, itemsize: int) -> int:
    """Elements of the whole vector for ``nbytes`` (select's convention; all_to_all: one rank's
    buffer), at least one per rank for the ops that split it."""
    n = max(0, nbytes // itemsize)
    if op in ("all_gather", "gather", "scatter", "reduce_scatter", "all_to_all"):
        n = max(size, n - n % size)
    return n


def _kwargs(op: str, size: int, n: int) -> dict[str, Any]:
    kw = even_args(op, size, n)
    if op == "all_to_all":  # n is one rank's buffer, split evenly among the ranks
        each = [n // size] * size
        kw = {"send_counts": each, "recv_counts": each}
    return kw


def algorithms_for(
    op: str, hosts: int, ranks_per_host: int, deterministic: bool = False
) -> list[str]:
    """The algorithms of ``op`` that apply to the layout: hier only across hosts with several
    ranks on a host, the rank-order folds only for ``deterministic`` (the only mode using them)."""
    if op not in ALGORITHMS:
        raise ValueError(f"no collective named {op!r}; choose one of {', '.join(PLAN_OPS)}")
    span = hosts > 1 and ranks_per_host > 1
    return [
        a
        for a in ALGORITHMS[op]
        if (a not in TOPOLOGICAL or span) and (deterministic or a not in RANK_ORDER.get(op, ()))
    ]


def _build(op: str, algo: str, rank: int, hosts: tuple[int, ...], kw: dict[str, Any]) -> Schedule:
    if algo in TOPOLOGICAL:
        return build(op, algo, rank, len(hosts), hosts=hosts, **kw)
    return build(op, algo, rank, len(hosts), **kw)


#: Algorithms whose hosts run the same rounds one or more rounds after the previous host's.
PIPELINES = frozenset(
    {("broadcast", "chain"), ("reduce", "chain"), ("broadcast", "hier"), ("reduce", "hier")}
)
#: Algorithms for which the root's host (0) stands for all: every host runs alike (rings,
#: pairwise, Bruck, dissemination, hier's all-ranks ops), or the root's host is the busiest in
#: every round (scatter + ring, ring reduce: a ring plus the root's scatter or gather).
ROOT_HOST_ENOUGH = frozenset(
    {
        ("all_reduce", "ring"),
        ("all_gather", "ring"),
        ("reduce_scatter", "ring"),
        ("all_to_all", "pairwise"),
        ("barrier", "dissemination"),
        ("all_reduce", "hier"),
        ("all_gather", "hier"),
        ("reduce_scatter", "hier"),
        ("barrier", "hier"),
        ("broadcast", "scatter_ring"),
        ("reduce", "ring"),
        ("all_reduce", "ordered"),
        ("reduce_scatter", "ordered"),
        ("reduce", "ordered"),
    }
)


def _first_net_round(rounds: _Rounds, ranks: Sequence[int], hosts: Sequence[int]) -> int:
    """The first round in which a rank of ``ranks`` talks to another host."""
    first = [
        k
        for i, r in enumerate(ranks)
        for k in [
            next((k for k, pr in enumerate(rounds.peers[i]) if _far(pr, hosts[r], hosts)), -1)
        ]
        if k >= 0
    ]
    return min(first, default=0)


def _far(peers: Sequence[int], me: int, hosts: Sequence[int]) -> bool:
    return any(hosts[q] != me for q in peers)


def model_time(
    op: str,
    algo: str,
    nbytes: int,
    hosts_n: int,
    m: int,
    p: Params,
    itemsize: int = 4,
    exact: bool | None = None,
) -> tuple[float, int, int, bool]:
    """(seconds, steps, bytes on the slowest link, exact) of one call by the schedules.

    ``exact``: simulate every rank (True), representative hosts (False), or by world size.
    """
    hosts = layout(hosts_n, m)
    size = len(hosts)
    kw = _kwargs(op, size, elements(op, nbytes, size, itemsize))
    if size == 1:
        return p.call, 0, 0, True
    if exact or (exact is None and size <= EXACT_RANKS):
        scheds = {r: _build(op, algo, r, hosts, kw) for r in range(size)}
        rounds = _round_costs(scheds, hosts, p, itemsize)
        t, steps = _simulate(rounds, size)
        return t + p.call, steps, rounds.link * itemsize, True
    # Representative hosts: root's (0), 1, 2 and the last; the others run like host 1. Where
    # every host runs alike or the root's host is the busiest in every round, host 0 alone (not
    # for vectors with fewer elements than ranks: most chunks are empty, a pipeline is left).
    n = elements(op, nbytes, size, itemsize)
    alike = (op, algo) in ROOT_HOST_ENOUGH and n >= size and (algo != "hier" or n > HIER_SMALL)
    reps = [0] if alike else sorted({0, 1, 2, hosts_n - 1})
    group = {h: [r for r in range(size) if hosts[r] == h] for h in reps}
    built: dict[int, _Rounds] = {}
    for h in reps:
        mine = {r: _build(op, algo, r, hosts, kw) for r in group[h]}
        built[h] = _round_costs(mine, hosts, p, itemsize)
    pipe = (op, algo) in PIPELINES and hosts_n >= 4
    parts: list[Part] = [(built[h].dur, built[h].busy, [0]) for h in reps if h != 1 or not pipe]
    if pipe:
        parts += _middle_hosts(built[1], built[2], group[1], group[2], hosts, hosts_n)
    t, steps = _in_step(parts)
    return t + p.call, steps, max(b.link for b in built.values()) * itemsize, False


Part = tuple[list[np.ndarray], list[np.ndarray], Sequence[int]]


def _middle_hosts(
    one: _Rounds,
    two: _Rounds,
    ranks1: Sequence[int],
    ranks2: Sequence[int],
    hosts: Sequence[int],
    hosts_n: int,
) -> list[Part]:
    """Hosts 1 … H-2 as host 1's rounds: the rounds where hosts 1 and 2 differ are a pipeline's,
    and host 1+i runs them i·s rounds later (s: how much later host 2 first talks to another
    host than host 1; negative for a pipeline towards host 0); the others are the same rounds."""
    shift = _first_net_round(two, ranks2, hosts) - _first_net_round(one, ranks1, hosts)
    moved_d, moved_b, kept_d, kept_b = [], [], [], []
    for d1, b1, d2 in zip(one.dur, one.busy, two.dur, strict=True):
        length = max(len(d1), len(d2))
        a, b = np.zeros(length), np.zeros(length)
        a[: len(d1)], b[: len(d2)] = d1, d2
        differ = (a != b)[: len(d1)] if shift else np.zeros(len(d1), dtype=bool)
        moved_d.append(np.where(differ, d1, 0.0))
        moved_b.append(b1 & differ)
        kept_d.append(np.where(differ, 0.0, d1))
        kept_b.append(b1 & ~differ)
    return [
        (kept_d, kept_b, [0]),
        (moved_d, moved_b, [i * shift for i in range(max(1, hosts_n - 2))]),
    ]


def chosen_algo(op: str, nbytes: int, hosts_n: int, m: int) -> str | None:
    """select's choice for the layout, or None where asking would build every rank's schedule
    (select's own model for small messages across many hosts)."""
    hosts = layout(hosts_n, m)
    span = spans_hosts(hosts)
    if span and len(hosts) > SELECT_MODEL_RANKS and (nbytes <= HIER_MODEL_MAX or op == "barrier"):
        return None
    return select(op, len(hosts), nbytes, hosts=hosts if span else None)


def predict(
    op: str,
    nbytes: int,
    hosts: int,
    ranks_per_host: int,
    params: Params,
    algos: Sequence[str] | None = None,
    itemsize: int = 4,
    deterministic: bool = False,
) -> list[Prediction]:
    """One prediction per algorithm of ``op`` (``algos``: those only), fastest marked ``best``,
    select's choice marked ``chosen``. Raises ValueError for an unknown op or algorithm."""
    names = list(algos) if algos else algorithms_for(op, hosts, ranks_per_host, deterministic)
    size = hosts * ranks_per_host
    chosen = chosen_algo(op, nbytes, hosts, ranks_per_host)
    found = []
    for algo in names:
        if algo not in ALGORITHMS.get(op, {}):
            raise ValueError(f"{op}: no algorithm named {algo!r}")
        t, steps, link, exact = model_time(
            op, algo, nbytes, hosts, ranks_per_host, params, itemsize
        )
        busbw = nbytes / t / 1e9 * bus_factor(op, size) if op in OPS and t > 0 else 0.0
        found.append(
            Prediction(
                op,
                algo,
                nbytes,
                hosts,
                ranks_per_host,
                t * 1e6,
                busbw,
                link,
                steps,
                algo == chosen,
                exact=exact,
            )
        )
    fair = [f for f in found if f.algo not in RANK_ORDER.get(op, ())] or found
    best = min(fair, key=lambda f: f.time_us).algo
    return [_mark(f, best) for f in found]


def _mark(f: Prediction, best: str) -> Prediction:
    fields = {k: v for k, v in asdict(f).items() if k != "ranks"}
    return Prediction(**{**fields, "best": f.algo == best})

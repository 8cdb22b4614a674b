"""Predict a collective before it runs: the schedules the engine would execute, timed by a model.

:func:`predict` builds the real schedules (``schedules.select.build``) of an op, algorithm, size
and host layout and plays them through a round-by-round simulation: a round of a rank starts
when it and each peer it talks to in that round have finished their previous round (the engine
tags frames with the round number), and lasts

    max(local alpha + local beta · bytes to/from ranks of its host,
        net alpha + net beta · bytes the host's one NIC carries that round, all its ranks together)
    + reduce rate · bytes folded + copy rate · bytes copied + alpha per extra segment (the engine
    cuts folded messages) + a wake-up when ranks outnumber cores,

the whole call adding a fixed per-call cost; the local link and the rates depend on the message
and vector sizes (:meth:`Params.local_link`, :meth:`Params.rates`). Parameters come from
:mod:`ringlet.calibrate` (measured on this machine) or the presets of :data:`LINKS`.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .bench_cases import OPS, bus_factor
from .plan_params import Params
from .plan_rounds import Part, Rounds, busiest, in_step, round_costs, simulate
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
    in_pieces,
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


def _hashable(kw: dict[str, Any]) -> dict[str, Any]:
    """Schedule arguments with lists as tuples (select's caches need them hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


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


#: Rings with fewer elements than ranks: each element hops from rank to rank in every round,
#: so all rounds are on the critical path though most ranks idle in most (round counts).
SPARSE_RINGS = {
    ("all_reduce", "ring"): lambda p, n: 2 * (p - 1),
    ("reduce", "ring"): lambda p, n: p,
    ("broadcast", "scatter_ring"): lambda p, n: p - 1 + (n - 1).bit_length(),  # + the scatter
    ("broadcast", "chain"): lambda p, n: p - 1,
    ("reduce", "chain"): lambda p, n: p - 1,
}
#: Ops with a root that waits for no one: called back to back, the next call overlaps.
ROOTED = frozenset({"broadcast", "reduce", "gather", "scatter"})
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


def _first_net_round(rounds: Rounds, ranks: Sequence[int], hosts: Sequence[int]) -> int:
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
    back_to_back: bool = False,
) -> tuple[float, int, int, bool]:
    """(seconds, steps, bytes on the slowest link, exact) of one call by the schedules.

    ``exact``: simulate every rank (True), representative hosts (False), or by world size.
    ``back_to_back``: the time per call of a rooted op called over and over (what `ringlet
    bench` measures): its busiest rank's own rounds, not the critical path.
    A reduce or reduce_scatter above ``p.piece`` bytes runs as that many equal pieces, one
    schedule each, a reduce_scatter's piece first gathered into one buffer, where the call path
    cuts it (select.in_pieces).
    """
    hosts = layout(hosts_n, m)
    size = len(hosts)
    kw = _kwargs(op, size, elements(op, nbytes, size, itemsize))
    topology = hosts if hosts_n > 1 else None
    cut = in_pieces(op, algo, size, nbytes, p.piece, topology, itemsize, **_hashable(kw))
    pieces = -(-nbytes // p.piece) if cut else 1
    if pieces > 1:
        t, steps, link, ex = model_time(op, algo, nbytes // pieces, hosts_n, m,
                                        replace(p, piece=0), itemsize, exact, back_to_back)  # fmt: skip
        staged = p.rates(nbytes)[1] * nbytes if op == "reduce_scatter" else 0.0
        return pieces * (t - p.call) + p.call + staged, pieces * steps, pieces * link, ex
    if size == 1:
        return p.call, 0, 0, True
    if exact or (exact is None and size <= EXACT_RANKS):
        scheds = {r: _build(op, algo, r, hosts, kw) for r in range(size)}
        rounds = round_costs(scheds, hosts, p, itemsize, nbytes)
        t, steps = simulate(rounds, size)
        t = busiest(rounds) if back_to_back and op in ROOTED else t
        return t + p.call, steps, rounds.link * itemsize, True
    # Representative hosts: root's (0), 1, 2 and the last; the others run like host 1. Where
    # every host runs alike or the root's host is the busiest in every round, host 0 alone (not
    # for vectors with fewer elements than ranks: most chunks are empty, a pipeline is left).
    n = elements(op, nbytes, size, itemsize)
    alike = (op, algo) in ROOT_HOST_ENOUGH and n >= size and (algo != "hier" or n > HIER_SMALL)
    every = SPARSE_RINGS[(op, algo)](size, n) if (op, algo) in SPARSE_RINGS and n < size else 0
    reps = [0] if alike or every else sorted({0, 1, 2, hosts_n - 1})
    group = {h: [r for r in range(size) if hosts[r] == h] for h in reps}
    built: dict[int, Rounds] = {}
    for h in reps:
        mine = {r: _build(op, algo, r, hosts, kw) for r in group[h]}
        built[h] = round_costs(mine, hosts, p, itemsize, nbytes)
    pipe = (op, algo) in PIPELINES and hosts_n >= 4 and not every
    parts: list[Part] = [(built[h].dur, built[h].busy, [0]) for h in reps if h != 1 or not pipe]
    if pipe:
        parts += _middle_hosts(built[1], built[2], group[1], group[2], hosts, hosts_n)
    t, steps = in_step(parts, every)
    if back_to_back and op in ROOTED:
        t = max(busiest(b) for b in built.values())
    return t + p.call, steps, max(b.link for b in built.values()) * itemsize, False


def _middle_hosts(
    one: Rounds,
    two: Rounds,
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

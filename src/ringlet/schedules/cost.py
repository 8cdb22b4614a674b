"""Alpha-beta cost of an algorithm, read off its schedules, and the table in docs/algorithms.md.

Model (Hockney): a round of a rank starts when its previous round ended and, for each message,
the peer's round holding it has started; it lasts alpha + beta·max(elements sent, elements
received) in that round (one full-duplex link per rank). The collective ends with its last
round. Steps = that time with alpha=1, beta=0: the rounds on the critical path. Local copies
are free. Because the costs come from the schedules the engine runs, the docs cannot drift.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import Round, Schedule
from .select import (
    ALGORITHMS,
    DIRECT,
    DIRECT_MAX,
    HIER_OPS,
    MODEL_INTER,
    MODEL_INTRA,
    ORDERED,
    PARAMS,
    TOPOLOGICAL,
    build,
    select,
)
from .simulate import Done, Enter, Transfer, events

#: Model parameters for the docs table: a TCP-like link. Illustrative, not measured.
DOC_ALPHA = 20e-6  # seconds per message round
DOC_BANDWIDTH = 1.25e9  # bytes per second per direction (10 Gbit/s)
DOC_SIZES = (5, 8)  # world sizes in the table: one that is not a power of two, one that is
DOC_BYTES = (1 << 10, 1 << 20, 64 << 20)  # message sizes of the modeled-time columns


@dataclass(frozen=True)
class Cost:
    """What one call of an algorithm costs, from its schedules."""

    steps: int  # rounds with messages on the critical path (the alpha term)
    sent: int  # most elements any one rank sends
    received: int  # most elements any one rank receives


def modeled_time(
    schedules: list[Schedule],
    alpha: float,
    beta: float,
    hosts: Sequence[int] | None = None,
    inter: tuple[float, float] | None = None,
) -> float:
    """Finish time of the last round under the alpha-beta model (``beta`` per element).

    With ``hosts`` (the host of each rank), messages between hosts cost ``inter`` = (alpha,
    beta) (default: the same as inside a host), and all the inter-host elements a host's ranks
    send (or receive) in one round share its one link; a round lasts the longer of its local
    part and its share of the link.
    """
    where = list(hosts) if hosts is not None else [0] * len(schedules)
    link = _link_load(schedules, where)
    far_alpha, far_beta = inter if inter is not None else (alpha, beta)
    start: dict[tuple[int, int], float] = {}  # (rank, round) -> when it could start
    ready: dict[int, float] = {}  # rank -> when its previous round ended
    for ev in events(schedules):
        if isinstance(ev, Enter):
            start[(ev.rank, ev.round)] = ready.get(ev.rank, 0.0)
        elif isinstance(ev, Transfer):  # both ends wait for the later of the two
            both = max(start[(ev.src, ev.src_round)], start[(ev.dst, ev.dst_round)])
            start[(ev.src, ev.src_round)] = start[(ev.dst, ev.dst_round)] = both
        elif isinstance(ev, Done):
            rnd, me = schedules[ev.rank].rounds[ev.round], where[ev.rank]
            busy = _local_time(rnd, me, where, alpha, beta)
            if (me, ev.round) in link:  # this host's link, shared by its ranks' messages
                busy = max(busy, far_alpha + far_beta * link[(me, ev.round)])
            ready[ev.rank] = start[(ev.rank, ev.round)] + busy
    return max(ready.values(), default=0.0)


def _local_time(rnd: Round, me: int, hosts: Sequence[int], alpha: float, beta: float) -> float:
    """How long a round's messages inside the host take (one full-duplex link per rank)."""
    sends = [s.count for s in rnd.sends if hosts[s.peer] == me]
    recvs = [v.count for v in rnd.recvs if hosts[v.peer] == me]
    return alpha + beta * max(sum(sends), sum(recvs)) if sends or recvs else 0.0


def _link_load(schedules: Sequence[Schedule], hosts: Sequence[int]) -> dict[tuple[int, int], int]:
    """(host, round) -> elements the host's link carries that round, the busier direction."""
    out: dict[tuple[int, int], int] = {}
    into: dict[tuple[int, int], int] = {}
    for rank, sched in enumerate(schedules):
        for k, rnd in enumerate(sched.rounds):
            key = (hosts[rank], k)
            for s in rnd.sends:
                if hosts[s.peer] != hosts[rank]:
                    out[key] = out.get(key, 0) + s.count
            for v in rnd.recvs:
                if hosts[v.peer] != hosts[rank]:
                    into[key] = into.get(key, 0) + v.count
    return {key: max(out.get(key, 0), into.get(key, 0)) for key in out.keys() | into.keys()}


def host_traffic(schedules: Sequence[Schedule], hosts: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Host -> (elements its ranks send to, receive from other hosts) over the whole call."""
    sent = dict.fromkeys(hosts, 0)
    got = dict.fromkeys(hosts, 0)
    for rank, sched in enumerate(schedules):
        for rnd in sched.rounds:
            sent[hosts[rank]] += sum(s.count for s in rnd.sends if hosts[s.peer] != hosts[rank])
            got[hosts[rank]] += sum(v.count for v in rnd.recvs if hosts[v.peer] != hosts[rank])
    return {h: (sent[h], got[h]) for h in sent}


def cost(op: str, algo: str, size: int, **kw: Any) -> Cost:
    """Steps and per-rank volumes of ``op`` by ``algo`` with the given arguments."""
    scheds = [build(op, algo, r, size, **kw) for r in range(size)]
    sent = [sum(s.count for rnd in sc.rounds for s in rnd.sends) for sc in scheds]
    got = [sum(v.count for rnd in sc.rounds for v in rnd.recvs) for sc in scheds]
    return Cost(round(modeled_time(scheds, 1.0, 0.0)), max(sent), max(got))


def even_args(op: str, size: int, n: int, root: int = 0) -> dict[str, Any]:
    """Arguments for ``op`` moving a vector of ``n`` elements split evenly (see select's nbytes)."""
    base, extra = divmod(n, size)
    counts = [base + (1 if i < extra else 0) for i in range(size)]
    every = {
        "count": n,
        "root": root,
        "counts": counts,
        "send_counts": counts,
        "recv_counts": counts,
    }
    return {name: every[name] for name in PARAMS[op]}


def _human(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _chosen_for(op: str, algo: str, size: int) -> str:
    """The message sizes (powers of two up to 1 GiB) for which select picks ``algo``."""
    picked = [1 << e for e in range(31) if select(op, size, 1 << e) == algo]
    if ORDERED.get(op) == algo:
        return "deterministic=True" + (f", n > {_human(DIRECT_MAX)}" if op in DIRECT else "")
    if DIRECT.get(op) == algo:
        return f"deterministic=True, n ≤ {_human(DIRECT_MAX)}"
    if not picked:
        return "on request"
    if len(picked) == 31:
        return "always"
    lo, hi = picked[0], picked[-1]
    if lo == 1:
        return f"n ≤ {_human(hi)}"
    return f"n > {_human(lo // 2)}" if hi == 1 << 30 else f"{_human(lo // 2)} < n ≤ {_human(hi)}"


def _seconds(t: float) -> str:
    return f"{t * 1e6:.0f} µs" if t < 1e-3 else f"{t * 1e3:.1f} ms"


def _row(op: str, algo: str) -> str:
    """One table row: steps, volumes (as multiples of n) and modeled times at the doc sizes."""
    big = 1 << 20  # elements for the volume columns, large enough that rounding vanishes
    costs = {p: cost(op, algo, p, **even_args(op, p, big)) for p in DOC_SIZES}
    steps = " / ".join(str(costs[p].steps) for p in DOC_SIZES)
    sent = " / ".join(f"{costs[p].sent / big:.2f}" for p in DOC_SIZES)
    got = " / ".join(f"{costs[p].received / big:.2f}" for p in DOC_SIZES)
    p = DOC_SIZES[-1]
    times = []
    for nbytes in DOC_BYTES:  # one-byte elements, so elements are bytes
        scheds = [build(op, algo, r, p, **even_args(op, p, nbytes)) for r in range(p)]
        times.append(_seconds(modeled_time(scheds, DOC_ALPHA, 1 / DOC_BANDWIDTH)))
    by_size = {q: _chosen_for(op, algo, q) for q in DOC_SIZES}
    if len(set(by_size.values())) == 1:
        chosen = by_size[p]
    else:
        chosen = "; ".join(f"p={q}: {text}" for q, text in by_size.items())
    return f"| {algo} | {steps} | {sent} | {got} | {' | '.join(times)} | {chosen} |"


def _summary(fn: Any) -> str:
    """The docstring of a schedule function, joined into one paragraph."""
    return " ".join(
        line.strip() for line in (inspect.getdoc(fn) or "").splitlines() if line.strip()
    )


_P = DOC_SIZES[-1]
_INTRO = f"""# Collective algorithms

Generated by `benchmarks/gen_algorithms_doc.py` from the schedules the engine runs
(`ringlet.schedules.cost`); do not edit by hand.

Every algorithm is a pure function `(rank, size, counts…) -> Schedule`. The columns are read
off those schedules: *steps* is the number of message rounds on the critical path; *sent* /
*received* are the most elements one rank sends / receives, divided by the vector size n (the
reduced vector, the gathered result, or one rank's all-to-all input). Modeled times use the
alpha-beta model with alpha = {DOC_ALPHA * 1e6:.0f} µs and {DOC_BANDWIDTH / 1e9:.2f} GB/s per
direction: an illustration of the trade-offs at p={_P}, not a measurement. *Chosen for* is
the range of message sizes for which `select` picks the algorithm, per p where they differ
(thresholds and the measurements behind them in `ringlet/schedules/select.py`).
"""


def render_markdown() -> str:
    """docs/algorithms.md: per op, a cost table and each algorithm's steps and bytes."""
    ps = " / ".join(f"p={p}" for p in DOC_SIZES)
    times = " | ".join(f"time {_human(b)}" for b in DOC_BYTES)
    lines = [_INTRO]
    for op, algos in ALGORITHMS.items():
        lines += [f"## {op}", ""]
        lines += [f"| algorithm | steps ({ps}) | sent / n | received / n | {times} | chosen for |"]
        lines += ["|---" * (5 + len(DOC_BYTES)) + "|"]
        flat = {algo: fn for algo, fn in algos.items() if algo not in TOPOLOGICAL}
        lines += [_row(op, algo) for algo in flat]
        lines += [""]
        lines += [f"- **{algo}** (`{fn.__name__}`): {_summary(fn)}" for algo, fn in flat.items()]
        lines += [""]
    return "\n".join(lines + _across_hosts())


#: Host layouts of the topology tables: 2 hosts x 4 ranks and 4 hosts x 2.
DOC_LAYOUTS = ((0, 0, 0, 0, 1, 1, 1, 1), (0, 0, 1, 1, 2, 2, 3, 3))


def _topo_row(op: str, algo: str, hosts: tuple[int, ...]) -> str:
    """Steps, the busiest host link's elements per direction / n, modeled times, over ``hosts``."""
    p, big = len(hosts), 1 << 20
    scheds = [build(op, algo, r, p, hosts=hosts, **even_args(op, p, big)) for r in range(p)]
    steps = round(modeled_time(scheds, 1.0, 0.0, hosts, (1.0, 0.0)))
    link = max(max(t) for t in host_traffic(scheds, hosts).values()) / big
    times = []
    for nbytes in DOC_BYTES:
        kw = even_args(op, p, nbytes)
        scheds = [build(op, algo, r, p, hosts=hosts, **kw) for r in range(p)]
        times.append(_seconds(modeled_time(scheds, *MODEL_INTRA, hosts, MODEL_INTER)))
    picked = [b for b in DOC_BYTES if select(op, p, b, hosts=hosts) == algo]
    chosen = ", ".join(_human(b) for b in picked) or "-"
    return f"| {algo} | {steps} | {link:.2f} | {' | '.join(times)} | {chosen} |"


def _across_hosts() -> list[str]:
    """The hierarchical algorithms next to the flat choice, on two host layouts."""
    (ia, ib), (xa, xb) = MODEL_INTRA, MODEL_INTER
    times = " | ".join(f"time {_human(b)}" for b in DOC_BYTES)
    lines = [
        "## Across hosts",
        "",
        "Ranks on several hosts: the hierarchical algorithm (*hier*) next to the flat one select "
        "would take on one host, modeled with intra-host links of "
        f"{ia * 1e6:.0f} µs and {1 / ib / 1e9:.0f} GB/s and one link per host to the others of "
        f"{xa * 1e6:.0f} µs and {1 / xb / 1e9:.2f} GB/s, shared by the host's ranks. *link / n* "
        "is the most elements one host's link carries in one direction, over n; *chosen at* "
        "lists the sizes of the time columns at which `select(..., hosts=…)` takes the row.",
        "",
    ]
    for hosts in DOC_LAYOUTS:
        shape = f"{len(set(hosts))} hosts x {len(hosts) // len(set(hosts))} ranks"
        lines += [f"### {shape}: hosts = {hosts}", ""]
        lines += [f"| op / algorithm | steps | link / n | {times} | chosen at |"]
        lines += ["|---" * (4 + len(DOC_BYTES)) + "|"]
        for op in HIER_OPS:
            flat = select(op, len(hosts), 1 << 20)
            for algo in ("hier", flat):
                lines += [
                    _topo_row(op, algo, hosts).replace(f"| {algo} |", f"| {op} / {algo} |", 1)
                ]
        lines += [""]
    lines += [
        f"- **{op} / hier** (`{ALGORITHMS[op]['hier'].__name__}`): {_summary(ALGORITHMS[op]['hier'])}"
        for op in HIER_OPS
    ]
    return [*lines, ""]

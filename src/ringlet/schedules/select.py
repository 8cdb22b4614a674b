"""Which algorithm runs each collective: the registry, the size thresholds, and a builder.

Small messages are latency-bound, so they take the log2 p-step algorithms (doubling, trees);
large ones are bandwidth-bound and take the ring (or Rabenseifner in between). The thresholds
are initial guesses from the alpha-beta model, to be measured on real transports and tuned.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from functools import lru_cache
from typing import Any

from .base import Schedule, extent
from .doubling import (
    bruck_all_gather,
    dissemination_barrier,
    halving_doubling_all_reduce,
    halving_reduce_scatter,
    recursive_doubling_all_reduce,
)
from .groups import spans_hosts
from .hier import (
    hier_all_gather,
    hier_all_reduce,
    hier_barrier,
    hier_broadcast,
    hier_reduce,
    hier_reduce_scatter,
)
from .linear import direct_all_gather, linear_broadcast, linear_gather, linear_scatter
from .ordered import (
    direct_all_reduce,
    direct_reduce,
    ordered_all_reduce,
    ordered_reduce,
    ordered_reduce_scatter,
)
from .pairwise import direct_all_to_all, pairwise_all_to_all
from .ring import (
    chain_broadcast,
    chain_reduce,
    ring_all_gather,
    ring_all_reduce,
    ring_reduce,
    ring_reduce_scatter,
    scatter_ring_broadcast,
)
from .tree import binomial_broadcast, binomial_gather, binomial_reduce, binomial_scatter

#: op -> algorithm name -> schedule function. Every function of one op takes the same keywords.
ALGORITHMS: dict[str, dict[str, Callable[..., Schedule]]] = {
    "all_reduce": {
        "ring": ring_all_reduce,
        "doubling": recursive_doubling_all_reduce,
        "halving_doubling": halving_doubling_all_reduce,
        "ordered": ordered_all_reduce,
        "direct": direct_all_reduce,
        "hier": hier_all_reduce,
    },
    "broadcast": {
        "tree": binomial_broadcast,
        "linear": linear_broadcast,
        "scatter_ring": scatter_ring_broadcast,
        "chain": chain_broadcast,
        "hier": hier_broadcast,
    },
    "reduce": {
        "tree": binomial_reduce,
        "ring": ring_reduce,
        "chain": chain_reduce,
        "ordered": ordered_reduce,
        "direct": direct_reduce,
        "hier": hier_reduce,
    },
    "all_gather": {
        "ring": ring_all_gather,
        "bruck": bruck_all_gather,
        "direct": direct_all_gather,
        "hier": hier_all_gather,
    },
    "gather": {"tree": binomial_gather, "linear": linear_gather},
    "scatter": {"tree": binomial_scatter, "linear": linear_scatter},
    "reduce_scatter": {
        "ring": ring_reduce_scatter,
        "halving": halving_reduce_scatter,
        "ordered": ordered_reduce_scatter,
        "hier": hier_reduce_scatter,
    },
    "all_to_all": {"pairwise": pairwise_all_to_all, "direct": direct_all_to_all},
    "barrier": {"dissemination": dissemination_barrier, "hier": hier_barrier},
}

#: The algorithm of each reduction that folds every element in rank order (deterministic mode).
ORDERED: dict[str, str] = {
    "all_reduce": "ordered",
    "reduce": "ordered",
    "reduce_scatter": "ordered",
}
#: ...and the one-step rank-order folds it takes instead up to DIRECT_MAX bytes: every rank's
#: vector straight to the folding rank(s), one round instead of two (latency-bound sizes).
DIRECT: dict[str, str] = {"all_reduce": "direct", "reduce": "direct"}
DIRECT_MAX = 16 << 10
#: Every algorithm of each reduction that folds in rank order (what deterministic mode accepts).
RANK_ORDER: dict[str, frozenset[str]] = {
    op: frozenset({algo, *([DIRECT[op]] if op in DIRECT else [])}) for op, algo in ORDERED.items()
}

#: What select answers for a call the one-host shm group (transport/shm.py) runs: its own
#: one-step, staged and single-copy collectives, used by default when every rank of a communicator
#: shares this host, for the ops in GROUP_OPS. Not a schedule and never forced; an op leaves the
#: set once its schedules over the shared-memory transport are measured at least as fast
#: (benchmarks/README.md), and the group goes when the set is empty.
GROUP = "shm_group"
GROUP_OPS: frozenset[str] = frozenset(ALGORITHMS) - {"all_to_all"}
#: Where every rank shares this host, more ranks than cores, and the shared-memory transport
#: copies large messages straight from the sender's memory (``crowded_copy``), the ops here
#: leave the group from this many bytes for a one-round schedule: each rank reads its data from
#: the root's buffer with one kernel copy, once it runs, where the group's staged steps each wait
#: for every rank to be scheduled. benchmarks/group_ab.py, 4 ranks on 2 cores (load 2-3):
#: broadcast 16 / 64 MiB 0.85 / 0.62x the group's time, scatter 0.54 / 0.61x, gather 0.79 /
#: 0.96x (4 MiB: 1.10, 0.77, 0.76x). With a core per rank the group's in-cache stages are as
#: fast or faster (2 ranks: broadcast 4 MiB 2.2x slower by linear, 64 MiB 1.00x), so it stays.
GROUP_LEAVES: dict[str, tuple[int, str]] = {
    "broadcast": (8 << 20, "linear"),
    "scatter": (8 << 20, "linear"),
    "gather": (16 << 20, "linear"),  # 8 MiB: 1.03x once, load 3
}
#: all_to_all within one host (``hosts`` None): every block in one round, each pair through its
#: own mailbox, large blocks by single copy; 2-4 ranks, interleaved in one job against the shm
#: group, 0.58-1.14x its time at 8 B-64 MiB, most cells below 1 (benchmarks/README.md). Between
#: hosts pairwise, which gives each host's link one message each way per step.
ONE_HOST_ALL_TO_ALL = "direct"

#: Algorithms that take the topology as a keyword ``hosts`` after their :data:`PARAMS`.
TOPOLOGICAL: frozenset[str] = frozenset({"hier"})

#: The ops with a hierarchical algorithm, which select takes whenever the ranks span hosts and
#: some host holds several of them, for messages above HIER_MODEL_MAX bytes; at or below it (and
#: for barrier) the
#: cost model with MODEL_INTRA / MODEL_INTER (alpha, beta per byte) decides between hier and the
#: flat choice (a flat recursive doubling on host-contiguous ranks is already hierarchical).
HIER_MODEL_MAX = 64 << 10
MODEL_INTRA = (2e-6, 1e-10)  # shared memory: 2 µs a round, 10 GB/s (illustrative)
MODEL_INTER = (20e-6, 8e-10)  # between hosts: 20 µs a round, 1.25 GB/s per host (10 Gbit/s)
HIER_OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "barrier")

#: The keyword arguments (after rank and size) each op's schedule functions take.
PARAMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("count",),
    "broadcast": ("count", "root"),
    "reduce": ("count", "root"),
    "all_gather": ("counts",),
    "gather": ("counts", "root"),
    "scatter": ("counts", "root"),
    "reduce_scatter": ("counts",),
    "all_to_all": ("send_counts", "recv_counts"),
    "barrier": (),
}

# Thresholds in bytes of the whole vector (see `select`). Checked over TCP at 2 ranks with
# benchmarks/algorithms.py (doubling fastest up to 16 KiB; halving-doubling and ring within noise of
# each other above 64 KiB; tree and linear alike at 2 ranks). At 4 and 8 ranks on this 2-core
# machine loopback favours whatever takes the fewest steps (linear broadcast, tree reduce), which
# a real network with one link per host would not: only choices that win in both are taken.
ALL_REDUCE_DOUBLING_MAX = 16 << 10  # below: recursive doubling (log p steps, n·log p bytes)
ALL_REDUCE_HALVING_MAX = 1 << 20  # below: Rabenseifner; above: ring (only neighbour links)
# ...except for a power-of-two number of ranks (2 included), where Rabenseifner needs no fold: the
# same bytes as the ring in 2 log p steps instead of 2(p - 1), so it takes every size above doubling
# (4 ranks over TCP: 16 MiB in 29.9 ms vs 38.1 ms for the ring; 8 ranks: 4 MiB 19.1 vs 22.8, 16 MiB
# even).
BROADCAST_TREE_MAX = 256 << 10  # below: binomial tree; above: pipelined chain
# (4 ranks over TCP, 1/4/16/64 MiB: chain 0.7/4.4/13.1/64 ms, scatter + ring 1.3/6.1/18.7/79 ms;
# on a network with a link per host the chain is also the one that sends each byte once a link)
REDUCE_TREE_MAX = 256 << 10  # below: binomial tree; above: pipelined chain
# (4 ranks over TCP, 4/16/64 MiB: chain 4.0/18.7/66.6 ms, tree 5.2/18.6/77.0, ring 5.5/20.9/78.7)
ALL_GATHER_BRUCK_MAX = 256 << 10  # below: Bruck (log p steps); above: ring
GATHER_TREE_MAX = 64 << 10  # below: binomial tree; above: flat (root receives n anyway)
SCATTER_TREE_MAX = 64 << 10  # below: binomial tree; above: flat (root sends n anyway)
REDUCE_SCATTER_HALVING_MAX = 256 << 10  # below: recursive halving; above: ring
# At most this many ranks every algorithm but all_reduce's is one exchange of the same bytes: take
# the simplest. (all_reduce's recursive doubling would send and fold the whole vector where
# halving-doubling moves halves: 2 ranks over TCP, 1 MiB 0.36 ms vs 1.98, 16 MiB 9.3 vs 13.9.)
SMALL_WORLD = 2
#: ...where one of them is also the one that needs no scratch: Bruck rotates into a scratch copy
#: of the whole output on rank 1 (256 MiB for a 128 MiB input each); the ring lands in place, and
#: its reduce-scatter folds the peer's half onto the input straight into the result (halving
#: first copies the whole input into scratch).
_SMALL = {"all_gather": "ring", "reduce_scatter": "ring"}

#: (threshold, algorithm at or below it, algorithm above it) per op with a choice.
_RULES: dict[str, tuple[tuple[int, str], ...]] = {
    "all_reduce": (
        (ALL_REDUCE_DOUBLING_MAX, "doubling"),
        (ALL_REDUCE_HALVING_MAX, "halving_doubling"),
    ),
    "broadcast": ((BROADCAST_TREE_MAX, "tree"),),
    "reduce": ((REDUCE_TREE_MAX, "tree"),),
    "all_gather": ((ALL_GATHER_BRUCK_MAX, "bruck"),),
    "gather": ((GATHER_TREE_MAX, "tree"),),
    "scatter": ((SCATTER_TREE_MAX, "tree"),),
    "reduce_scatter": ((REDUCE_SCATTER_HALVING_MAX, "halving"),),
}
_LARGE = {
    "all_reduce": "ring",
    "broadcast": "chain",
    "reduce": "chain",
    "all_gather": "ring",
    "gather": "linear",
    "scatter": "linear",
    "reduce_scatter": "ring",
}


def select(
    op: str,
    size: int,
    nbytes: int,
    override: str | None = None,
    *,
    hosts: Sequence[int] | None = None,
    deterministic: bool = False,
    group: bool = False,
    crowded_copy: bool = False,
) -> str:
    """The algorithm name for ``op`` over ``size`` ranks moving a vector of ``nbytes``.

    ``nbytes`` is the size of the whole vector: the reduced vector (all_reduce, reduce,
    broadcast), the concatenated result (all_gather, gather) or input (scatter,
    reduce_scatter), or one rank's input (all_to_all). ``hosts``: the host index of each rank
    (None: one host, or not known). ``deterministic`` picks the rank-order folds (:data:`ORDERED`);
    ``group``/``crowded_copy``: all ranks on this host, see :data:`GROUP` and :data:`GROUP_LEAVES`.
    ``override`` (for example from RINGLET_ALGO) wins if it names an algorithm of ``op`` (an
    ordered one for a reduction in deterministic mode). Raises ValueError for an unknown op or
    override, naming the choices.
    """
    choices = algorithms(op)
    if override is not None:
        return _checked_override(op, override, choices, deterministic)
    if group and op in GROUP_OPS:
        return _one_host(op, nbytes, crowded_copy)
    if deterministic and op in ORDERED:
        return DIRECT[op] if op in DIRECT and nbytes <= DIRECT_MAX else ORDERED[op]
    if op == "all_to_all":
        return ONE_HOST_ALL_TO_ALL if hosts is None else "pairwise"
    if op in HIER_OPS and spans_hosts(hosts):
        assert hosts is not None
        return _spanning(op, tuple(hosts), nbytes)
    return _flat(op, size, nbytes)


def _one_host(op: str, nbytes: int, crowded_copy: bool) -> str:
    """The group, or the schedule an op leaves it for at this size (:data:`GROUP_LEAVES`)."""
    leaves = GROUP_LEAVES.get(op)
    return leaves[1] if crowded_copy and leaves and nbytes >= leaves[0] else GROUP


def _spanning(op: str, hosts: tuple[int, ...], nbytes: int) -> str:
    """The choice for ranks spread over hosts: hier above HIER_MODEL_MAX, else the model's."""
    if nbytes > HIER_MODEL_MAX and op != "barrier":
        return "hier"
    return _modeled(op, hosts, nbytes)


@lru_cache(maxsize=1024)
def _modeled(op: str, hosts: tuple[int, ...], nbytes: int) -> str:
    """Hier or the flat choice, whichever the topology cost model finishes first (ties: hier).

    Latency-bound sizes only, rounded up to a power of two so that the cache stays small.
    """
    from .cost import even_args, modeled_time  # the model reads schedules built here

    size, n = len(hosts), 1 << max(0, nbytes - 1).bit_length()
    kw = even_args(op, size, n)
    times = {}
    for algo in ("hier", _flat(op, size, n)):
        scheds = [build(op, algo, r, size, hosts=hosts, **kw) for r in range(size)]
        times[algo] = modeled_time(scheds, *MODEL_INTRA, hosts, MODEL_INTER)
    return min(times, key=lambda a: (times[a], a != "hier"))


def _flat(op: str, size: int, nbytes: int) -> str:
    """The choice by message size and world size alone (one host, or one rank per host)."""
    choices = ALGORITHMS[op]
    if op not in _RULES:
        return next(iter(choices))  # only one algorithm
    if op == "all_reduce" and nbytes > ALL_REDUCE_DOUBLING_MAX and size & (size - 1) == 0:
        return "halving_doubling"
    if size <= SMALL_WORLD:
        return _SMALL.get(op, _RULES[op][0][1])
    for limit, algo in _RULES[op]:
        if nbytes <= limit:
            return algo
    return _LARGE[op]


def _checked_override(op: str, override: str, choices: Collection[str], deterministic: bool) -> str:
    """``override`` if ``op`` has it (and it folds in rank order when that is asked for)."""
    if override not in choices:
        raise ValueError(
            f"{op}: no algorithm named {override!r} (from RINGLET_ALGO or the caller); "
            f"choose one of {', '.join(sorted(choices))}"
        )
    if deterministic and op in ORDERED and override not in RANK_ORDER[op]:
        raise ValueError(
            f"{op}: deterministic mode needs an algorithm that folds in rank order, not "
            f"{override!r}; choose {' or '.join(map(repr, sorted(RANK_ORDER[op])))} or leave the "
            "algorithm unforced"
        )
    return override


def algorithms(op: str) -> dict[str, Callable[..., Schedule]]:
    """The algorithms of ``op`` by name. Raises ValueError for an unknown op."""
    if op not in ALGORITHMS:
        raise ValueError(f"no collective named {op!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[op]


def build(
    op: str, algo: str, rank: int, size: int, *, hosts: Sequence[int] | None = None, **kw: Any
) -> Schedule:
    """Rank ``rank``'s schedule of ``op`` by algorithm ``algo``; ``kw`` as in :data:`PARAMS`.

    ``hosts`` (the host index of each rank; pass a tuple so the call can be cached) goes to the
    algorithms that use the topology. Raises ValueError for an unknown op or algorithm, missing
    or unexpected keywords, counts of the wrong length or negative, or a root or rank out of range.
    """
    select(op, size, 0, override=algo)  # raises for an unknown op or algorithm
    fn = ALGORITHMS[op][algo]
    if sorted(kw) != sorted(PARAMS[op]):
        raise ValueError(f"{op} takes {', '.join(PARAMS[op]) or 'no arguments'}, got {sorted(kw)}")
    _check_args(op, rank, size, kw)
    if hosts is not None and len(hosts) != size:
        raise ValueError(f"{op}: hosts names {len(hosts)} ranks, the world has {size}")
    if algo in TOPOLOGICAL:
        return fn(rank, size, **kw, hosts=tuple(hosts) if hosts is not None else (0,) * size)
    return fn(rank, size, **kw)


#: Ops whose large calls may run in pieces (path.py), each a call of the same op on slices.
PIECED = ("reduce", "reduce_scatter")
#: The most ranks whose schedules :func:`in_pieces` builds to look for scratch.
PIECE_LOOK_MAX = 16


@lru_cache(maxsize=256)
def in_pieces(
    op: str, algo: str, size: int, nbytes: int, piece: int, hosts: tuple[int, ...] | None,
    itemsize: int, **kw: Any,
) -> bool:
    """Whether a call of ``nbytes`` runs as pieces of about ``piece`` bytes: a large reduce
    always (a non-root sums into a working copy), a large reduce_scatter unless no rank's
    schedule needs more than ``piece`` bytes of scratch (the 2-rank ring and the ordered fold
    land straight in the result, so cutting them would only add a staging copy of each piece).
    The same answer on every rank: it looks at every rank's schedule (up to PIECE_LOOK_MAX)."""
    if op not in PIECED or not piece or nbytes <= piece:
        return False
    if op == "reduce" or size > PIECE_LOOK_MAX:
        return True
    need = max(extent(build(op, algo, r, size, hosts=hosts, **kw), "tmp") for r in range(size))
    return need * itemsize > piece  # fmt: skip


def _check_args(op: str, rank: int, size: int, kw: dict[str, Any]) -> None:
    """Ranges of rank, root and counts (the schedule functions trust them)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"{op}: rank {rank} is not in a world of {size} ranks")
    if "root" in kw and not 0 <= kw["root"] < size:
        raise ValueError(f"{op} on rank {rank}: root {kw['root']} is not in 0..{size - 1}")
    if kw.get("count", 0) < 0:
        raise ValueError(f"{op} on rank {rank}: negative count {kw['count']}")
    for name in ("counts", "send_counts", "recv_counts"):
        counts: Sequence[int] | None = kw.get(name)
        if counts is not None and (len(counts) != size or min(counts) < 0):
            raise ValueError(
                f"{op} on rank {rank}: {name} must be {size} non-negative numbers, got {counts}"
            )


def forced(value: str) -> dict[str, str]:
    """RINGLET_ALGO as op -> algorithm: ``op=name,op=name`` per op, or a bare name for every op
    that has it. Raises ValueError for an op or algorithm that does not exist, so a typo is an
    error on every rank and every transport, never silently ignored."""
    chosen: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        name, _, algo = (part.strip() for part in item.partition("="))
        if algo:
            select(name, 2, 0, algo)  # raises for an unknown op or algorithm
            chosen[name] = algo
            continue
        ops = [op for op, algos in ALGORITHMS.items() if name in algos]
        if not ops:
            raise ValueError(
                f"RINGLET_ALGO={value!r}: no collective has an algorithm named {name!r}; use "
                "op=name pairs, e.g. all_reduce=ring"
            )
        chosen.update(dict.fromkeys(ops, name))
    return chosen

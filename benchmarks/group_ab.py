"""One host: the shm group's collectives against schedules over the shared-memory transport,
interleaved in one job.

    ringlet run -n 2 python benchmarks/group_ab.py --ops gather,scatter --sizes 8,64K,1M,16M
    ringlet run -n 4 python benchmarks/group_ab.py --algos all_gather=ring,bruck

Each round times every variant of a cell back to back (the default, which on one host is the shm
group for the ops still in ``select.GROUP_OPS``, then each forced algorithm), so a swing of this
machine's speed hits all of them alike; a cell's time is the slowest rank's, its figure the median
over rounds. Printed: each variant's time and its ratio to the default (below 1: faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ringlet
from ringlet.bench_cases import parse_sizes

#: Forced algorithms compared with the default, per op, unless --algos says otherwise.
CANDIDATES = {
    "all_reduce": ["doubling", "halving_doubling"],
    "reduce": ["tree", "direct"],
    "broadcast": ["linear", "tree"],
    "all_gather": ["ring", "bruck"],
    "gather": ["linear", "tree"],
    "scatter": ["linear", "tree"],
    "reduce_scatter": ["halving", "ring"],
    "barrier": ["dissemination"],
}


def call_of(comm: Any, op: str, nbytes: int, algo: str | None) -> Callable[[], Any]:
    """One call of ``op`` moving ``nbytes`` of float32 per rank (at least one element)."""
    n = max(1, nbytes // 4)
    x = np.zeros(n * (comm.size if op in ("reduce_scatter", "scatter") else 1), np.float32)
    kw: dict[str, Any] = {} if algo is None else {"algo": algo}
    if op == "barrier":
        return comm.barrier
    if op == "scatter":
        return lambda: comm.scatter(x if comm.rank == 0 else None, root=0, **kw)
    if op in ("broadcast", "reduce", "gather"):
        return lambda: getattr(comm, op)(x, root=0, **kw)
    return lambda: getattr(comm, op)(x, **kw)


def timed(comm: Any, fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call, the slowest rank's."""
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    mine = np.array([(time.perf_counter() - t0) / iters])
    comm.all_reduce(mine, op="max")
    return float(mine[0])


def cell(comm: Any, op: str, nbytes: int, algos: list[str], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant ("default" and each algorithm), interleaved."""
    variants = {"default": call_of(comm, op, nbytes, None)}
    variants.update({a: call_of(comm, op, nbytes, a) for a in algos})
    for fn in variants.values():
        fn()  # warm: plans, schedules, mailboxes
    iters = max(3, min(2000, int(0.03 / max(timed(comm, variants["default"], 3), 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(comm, fn, iters))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default="gather,scatter,all_gather,broadcast")
    parser.add_argument("--sizes", default="8,64K,1M,16M")
    parser.add_argument("--algos", nargs="*", default=[], help="op=algo,algo (replaces defaults)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    chosen = dict(CANDIDATES)
    for item in args.algos:
        op, _, names = item.partition("=")
        chosen[op] = names.split(",")
    with ringlet.init() as comm:
        for op in args.ops.split(","):
            for nbytes in parse_sizes(args.sizes):
                got = cell(comm, op, nbytes, chosen[op], args.rounds)
                if comm.rank == 0:
                    base = got["default"]
                    row = "  ".join(
                        f"{k} {v * 1e6:9.1f} us ({v / base:4.2f})" for k, v in got.items()
                    )
                    print(f"n={comm.size} {op:14s} {nbytes:>9d} B  {row}", flush=True)


if __name__ == "__main__":
    main()

"""Time every TCP algorithm of every op at each size, to set the thresholds in schedules/select.py.

Run (the numbers in docs/algorithms.md come from these):
    RINGLET_TRANSPORT=tcp ringlet run -n 2 python benchmarks/algorithms.py
    RINGLET_TRANSPORT=tcp ringlet run -n 4 python benchmarks/algorithms.py
Prints, per op and size, the median time of each algorithm in µs and which one select() picks.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import ringlet
from ringlet.schedules.select import ALGORITHMS, select


def _call(comm: ringlet.Communicator, op: str, algo: str, nbytes: int) -> None:
    count = max(1, nbytes // 4)
    n = comm.size
    x = np.ones(count, np.float32)
    if op == "all_reduce":
        comm.all_reduce(x, algo=algo)
    elif op == "broadcast":
        comm.broadcast(x, root=0, algo=algo)
    elif op == "reduce":
        comm.reduce(x, root=0, algo=algo)
    elif op == "all_gather":
        comm.all_gather(np.ones(max(1, count // n), np.float32), algo=algo)
    elif op == "gather":
        comm.gather(np.ones(max(1, count // n), np.float32), root=0, algo=algo)
    elif op == "scatter":
        comm.scatter(np.ones(max(n, count - count % n), np.float32) if comm.rank == 0 else None,
                     root=0, algo=algo)
    elif op == "reduce_scatter":
        comm.reduce_scatter(np.ones(max(n, count - count % n), np.float32), algo=algo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8,1K,16K,64K,256K,1M,4M,16M")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = [int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s) for s in args.sizes.split(",")]
    with ringlet.init() as comm:
        for op, algos in ALGORITHMS.items():
            if len(algos) < 2:
                continue
            for nbytes in sizes:
                row = {}
                for algo in algos:
                    iters = max(2, args.iters if nbytes < (4 << 20) else args.iters // 3)
                    _call(comm, op, algo, nbytes)  # warm up (connections, caches)
                    times = []
                    for _ in range(iters):
                        comm.barrier()
                        t = time.perf_counter()
                        _call(comm, op, algo, nbytes)
                        times.append(time.perf_counter() - t)
                    worst = comm.all_reduce(np.array([np.median(times)]), op="max")[0]
                    row[algo] = worst * 1e6
                if comm.rank == 0:
                    best = min(row, key=row.__getitem__)
                    cells = "  ".join(f"{a}={t:9.1f}" for a, t in row.items())
                    print(f"n={comm.size} {op:15s} {nbytes:>9d} B  {cells}  best={best:16s} "
                          f"select={select(op, comm.size, nbytes)}", flush=True)


if __name__ == "__main__":
    main()

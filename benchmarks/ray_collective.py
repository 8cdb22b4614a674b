"""ray.util.collective between Ray actors: backend "ringlet" against Ray's own "gloo" (torch's Gloo).

A local Ray cluster starts N actors (default 2, one host) and forms one collective group of each
backend over them; both groups live in the same actors, so they meet the same machine. For every
op and size, each backend runs ``--iters`` timed calls (after ``--warmup``) on CPU float32 torch
tensors, in ``--rounds`` rounds that alternate which backend goes first, so a busy machine slows
both alike. A call's time is the slowest rank's; the table shows the median over all timed calls
and gloo's time divided by ringlet's (above 1: ringlet is faster).

Run:
    python benchmarks/ray_collective.py                    # 2 actors
    python benchmarks/ray_collective.py -n 3 --sizes 4K,1M --ops allreduce
Options: -n, --ops (allreduce,allgather,broadcast), --sizes, --iters, --warmup, --rounds, --json FILE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from typing import Any

import numpy as np
import ray
import ray.util.collective as col
import torch

import ringlet.ray  # noqa: F401  registers "ringlet" on the driver

BACKENDS = ("ringlet", "gloo")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4K`` / ``1M`` / ``512`` as a number of bytes."""
    text = text.strip().upper().removesuffix("B")
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


@ray.remote(num_cpus=1)
class Rank:
    """One rank of both groups; times each call between barriers."""

    def __init__(self) -> None:
        importlib.import_module("ringlet.ray")  # registers "ringlet" in this actor's process
        torch.set_num_threads(1)

    def run(self, backend: str, op: str, nbytes: int, iters: int, warmup: int) -> list[float]:
        group = f"bench-{backend}"
        n = col.get_collective_group_size(group)
        if n < 0:  # not formed in this process yet: the first call forms it
            col.barrier(group)
            n = col.get_collective_group_size(group)
        count = max(1, nbytes // 4)
        x = torch.ones(count, dtype=torch.float32)
        outs = [torch.empty(count, dtype=torch.float32) for _ in range(n)]
        calls = {
            "allreduce": lambda: col.allreduce(x, group),
            "allgather": lambda: col.allgather(outs, x, group),
            "broadcast": lambda: col.broadcast(x, 0, group),
        }
        call = calls[op]
        times = []
        for i in range(warmup + iters):
            col.barrier(group)
            start = time.perf_counter()
            call()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2, help="actors (ranks)")
    parser.add_argument("--ops", default="allreduce,allgather,broadcast")
    parser.add_argument("--sizes", default="4K,256K,4M,32M", help="bytes per rank")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ops, sizes = args.ops.split(","), [parse_size(s) for s in args.sizes.split(",")]

    ray.init(num_cpus=args.n, include_dashboard=False, log_to_driver=False)
    ranks = [Rank.remote() for _ in range(args.n)]
    for backend in BACKENDS:
        col.create_collective_group(
            ranks, args.n, list(range(args.n)), backend=backend, group_name=f"bench-{backend}"
        )
    samples: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
        for op in ops:
            for nbytes in sizes:
                for backend in order:
                    per_rank = ray.get(
                        [a.run.remote(backend, op, nbytes, args.iters, args.warmup) for a in ranks]
                    )
                    slowest = np.max(np.array(per_rank), axis=0)  # each call: its slowest rank
                    samples.setdefault((backend, op, nbytes), []).extend(slowest.tolist())
    ray.shutdown()

    rows: list[dict[str, Any]] = []
    print(
        f"\n{args.n} Ray actors on one host, float32 CPU torch tensors, median of "
        f"{args.rounds * args.iters} calls (slowest rank each)\n"
    )
    print("| op | bytes per rank | ringlet ms | gloo ms | gloo / ringlet |")
    print("| --- | --- | --- | --- | --- |")
    for op in ops:
        for nbytes in sizes:
            ms = {b: 1e3 * statistics.median(samples[(b, op, nbytes)]) for b in BACKENDS}
            ratio = ms["gloo"] / ms["ringlet"]
            print(f"| {op} | {nbytes:,} | {ms['ringlet']:.3f} | {ms['gloo']:.3f} | {ratio:.2f}x |")
            rows.append({"op": op, "bytes": nbytes, "ms": ms, "gloo_over_ringlet": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "iters": args.iters, "rounds": args.rounds, "rows": rows}, f)


if __name__ == "__main__":
    main()

"""Peak extra memory of a large all_reduce: it must be a few chunks, not the message size.

Run: ringlet run -n 4 python benchmarks/memory.py --mib 256           (shared memory when on one host)
     RINGLET_TRANSPORT=tcp ringlet run -n 4 python benchmarks/memory.py --mib 256
Each rank prints its peak RSS before and after the call; the difference is what ringlet added.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np

import ringlet


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--op", default="all_reduce", choices=["all_reduce", "broadcast", "reduce"])
    args = parser.parse_args()
    with ringlet.init() as comm:
        comm.all_reduce(np.ones(1024, np.float32))  # connections and segments exist before measuring
        x = np.full(args.mib * (1 << 20) // 4, comm.rank + 1, np.float32)  # touched: resident
        before = peak_mib()
        getattr(comm, args.op)(x)
        after = peak_mib()
        extra = comm.all_gather(np.array([after - before]))
        ok = args.op != "all_reduce" or bool((x == comm.size * (comm.size + 1) / 2).all())
        if comm.rank == 0:
            print(f"{args.op} of {args.mib} MiB on {comm.size} ranks: extra peak RSS per rank (MiB) "
                  f"{np.round(extra, 1).tolist()}, max {extra.max():.1f}; result correct: {ok}")


if __name__ == "__main__":
    main()

"""Peak extra memory per rank of one large collective: it must be a few chunks, not the message size.

One op on one communicator:
    ringlet run -n 4 python benchmarks/memory.py --op all_reduce --mib 256
The table of every op x transport x world size (each cell its own job, so peaks do not mix):
    python benchmarks/memory.py --table --mib 256 --ranks 2 4
"Extra" is the rise of a rank's peak RSS during the call minus the result the call must return
(all_gather's output, scatter's part, …): what ringlet itself allocated on the way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

import ringlet
from ringlet.calls import result_nbytes

OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "reduce_scatter",
       "all_to_all")  # fmt: skip


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(op: str, mib: int) -> None:
    """Run ``op`` once on ``mib`` MiB of float32 per rank; rank 0 prints one JSON line."""
    with ringlet.init() as comm:
        getattr(comm, op)(np.ones(comm.size * 256, np.float32))  # connections, segments, schedules
        x = np.full(mib * (1 << 20) // 4, comm.rank + 1, np.float32)  # touched: resident
        before = peak_mib()
        if op == "scatter":
            out = comm.scatter(x if comm.rank == 0 else None)
        elif op in ("reduce", "broadcast", "gather"):
            out = getattr(comm, op)(x, 0)
        else:
            out = getattr(comm, op)(x)
        result = result_nbytes(op, x.nbytes, comm.rank, comm.size) / (1 << 20)
        extra = peak_mib() - before - result
        if op == "all_reduce":
            assert (out == comm.size * (comm.size + 1) / 2).all()
        extras = comm.all_gather(np.array([max(extra, 0.0)]))
        if comm.rank == 0:
            print(json.dumps({"op": op, "ranks": comm.size, "transport": comm.transport,
                              "mib": mib, "extra": [round(float(e), 1) for e in extras]}))


def table(mib: int, ranks: list[int]) -> None:
    """Every op x transport x world size as its own job; prints a markdown table of max extra."""
    rows = []
    for n in ranks:
        for transport in ("shm", "tcp"):
            env = {**os.environ, "RINGLET_TRANSPORT": transport}
            for op in OPS:
                cmd = [sys.executable, "-m", "ringlet", "run", "-n", str(n), sys.argv[0],
                       "--op", op, "--mib", str(mib)]  # fmt: skip
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                lines = [ln[ln.index("{"):] for ln in out.stdout.splitlines() if "{" in ln]
                if not lines:
                    print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{op} on {n} ranks over {transport} failed")
                rows.append(json.loads(lines[-1]))
                print(f"  {op:15s} {n} ranks {transport}: {rows[-1]['extra']}", file=sys.stderr)
    print(f"\nExtra peak RSS per rank (MiB, the worst rank) for one {mib} MiB call:\n")
    cols = [(n, t) for n in ranks for t in ("shm", "tcp")]
    print("| op | " + " | ".join(f"{n} ranks {t}" for n, t in cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for op in OPS:
        cells = {(r["ranks"], r["transport"]): max(r["extra"]) for r in rows if r["op"] == op}
        print(f"| {op} | " + " | ".join(f"{cells.get(c, float('nan')):.0f}" for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--op", default="all_reduce", choices=OPS)
    parser.add_argument("--table", action="store_true", help="every op, transport and --ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    if args.table:
        table(args.mib, args.ranks)
    else:
        measure(args.op, args.mib)


if __name__ == "__main__":
    main()

"""Peak extra memory per rank of one large collective: it must be a few chunks, not the message size.

One op on one communicator:
    ringlet run -n 4 python benchmarks/memory.py --op all_reduce --mib 256
The table of every op x transport x world size (each cell its own job, so peaks do not mix):
    python benchmarks/memory.py --table --mib 128 --ranks 2 4 8
"Extra" is the rise of a rank's peak RSS during the call minus the result the call must return
(all_gather's output, scatter's part, …): what ringlet itself allocated on the way. Transports:
shm, tcp, and shm+tcp, where the ranks are split over two simulated hosts (--hosts 2 sets each
rank's RINGLET_HOST_ID: shared memory inside a host, TCP between them). scatter_list is scatter
from a root's list of one array per rank.
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

OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "scatter_list",
       "reduce_scatter", "all_to_all")  # fmt: skip
TRANSPORTS = ("shm", "tcp", "shm+tcp")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(op: str, mib: int, hosts: int) -> None:
    """Run ``op`` once on ``mib`` MiB of float32 per rank; rank 0 prints one JSON line. With
    ``hosts`` > 1 the ranks are spread over that many simulated hosts, in blocks of ranks."""
    if hosts > 1:
        rank, size = int(os.environ["RINGLET_RANK"]), int(os.environ["RINGLET_WORLD_SIZE"])
        os.environ["RINGLET_HOST_ID"] = f"h{rank * hosts // size}"
    with ringlet.init() as comm:
        kind = op.removesuffix("_list")
        getattr(comm, kind)(
            np.ones(comm.size * 256, np.float32)
        )  # connections, segments, schedules
        x = np.full(mib * (1 << 20) // 4 // comm.size * comm.size, comm.rank + 1, np.float32)
        parts = np.split(x, comm.size) if op == "scatter_list" else None  # views: no new memory
        before = peak_mib()  # x is touched: resident before the call
        if op == "scatter":
            out = comm.scatter(x if comm.rank == 0 else None)
        elif op == "scatter_list":
            out = comm.scatter(parts if comm.rank == 0 else None)
        elif op in ("reduce", "broadcast", "gather"):
            out = getattr(comm, op)(x, 0)
        else:
            out = getattr(comm, op)(x)
        result = result_nbytes(kind, x.nbytes, comm.rank, comm.size) / (1 << 20)
        extra = peak_mib() - before - result
        if op == "all_reduce":
            assert (out == comm.size * (comm.size + 1) / 2).all()
        extras = comm.all_gather(np.array([max(extra, 0.0)]))
        if comm.rank == 0:
            worst = [round(float(e), 1) for e in extras]
            record = {"op": op, "ranks": comm.size, "transport": comm.transport, "mib": mib}
            print(json.dumps({**record, "extra": worst}))


def table(mib: int, ranks: list[int], transports: list[str]) -> None:
    """Every op x transport x world size as its own job; prints a markdown table of max extra."""
    rows = []
    cols = [(n, t) for n in ranks for t in transports if t != "shm+tcp" or n >= 3]
    for n, transport in cols:  # shm+tcp needs a host with two ranks; at 2 ranks it is TCP
        env = dict(os.environ)
        env.pop("RINGLET_TRANSPORT", None)
        if transport != "shm+tcp":
            env["RINGLET_TRANSPORT"] = transport
        hosts = "2" if transport == "shm+tcp" else "1"
        for op in OPS:
            cmd = [sys.executable, "-m", "ringlet", "run", "-n", str(n), sys.argv[0],
                   "--op", op, "--mib", str(mib), "--hosts", hosts]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            lines = [ln[ln.index("{") :] for ln in out.stdout.splitlines() if "{" in ln]
            if not lines:
                print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{op} on {n} ranks over {transport} failed")
            rows.append({**json.loads(lines[-1]), "asked": transport})
            print(f"  {op:15s} {n} ranks {transport}: {rows[-1]['extra']}", file=sys.stderr)
    print(f"\nExtra peak RSS per rank (MiB, the worst rank) for one {mib} MiB call:\n")
    print("| op | " + " | ".join(f"{n} ranks {t}" for n, t in cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for op in OPS:
        cells = {(r["ranks"], r["asked"]): max(r["extra"]) for r in rows if r["op"] == op}
        print(
            f"| {op} | " + " | ".join(f"{cells[c]:.0f}" if c in cells else "–" for c in cols) + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--op", default="all_reduce", choices=OPS)
    parser.add_argument("--table", action="store_true", help="every op, transport and --ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--hosts", type=int, default=1, help="simulated hosts the ranks span")
    args = parser.parse_args()
    if args.table:
        table(args.mib, args.ranks, args.transports)
    else:
        measure(args.op, args.mib, args.hosts)


if __name__ == "__main__":
    main()

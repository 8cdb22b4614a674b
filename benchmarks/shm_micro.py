"""Micro-benchmark of ringlet's shared-memory collectives, with MPI on the same machine for scale.

    python benchmarks/shm_micro.py                      # 2 and 4 ranks, all_reduce, default sizes
    python benchmarks/shm_micro.py -n 2 --ops all_reduce,all_gather,broadcast,reduce_scatter
    python benchmarks/shm_micro.py --sizes 8,1M --tuning stage_bytes=262144,use_cma=0
    mpiexec -n 2 python benchmarks/shm_micro.py --mpi  # the same table through mpi4py

Ranks are spawned processes that join one ShmGroup directly (no communicator, no store), so the
numbers are the transport's own. Each size runs a warm-up, then ``--reps`` timed repetitions of
enough iterations to last about ``--seconds``; the table shows the median repetition. Bandwidths
follow nccl-tests: algbw = message bytes / time (all_gather: the output bytes), busbw = algbw x
2(n-1)/n for all_reduce, (n-1)/n for all_gather and reduce_scatter, 1 for broadcast. The table
shows the median and the best repetition; on a machine shared with other work the best is the
one that tells what the code can do.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SIZES = "8,1K,64K,1M,16M,64M"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def busbw_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def make_call(op: str, size: int, rank: int, nbytes: int, group: Any) -> Callable[[float], None]:
    """One collective of ``nbytes`` (float32, at least one element) on the shm group."""
    n = max(nbytes // 4, 1)
    sig = 0x5EED
    if op == "all_reduce":
        buf = np.zeros(n, np.float32)  # zeros: summing in place forever must not overflow
        return lambda d: group.all_reduce(buf, "sum", sig, d)
    if op == "broadcast":
        buf = np.ones(n, np.float32)
        return lambda d: group.broadcast(buf, 0, sig, d)
    if op == "all_gather":  # nbytes is the output size, as in nccl-tests
        part = max(n // size, 1)
        inp, out = np.ones(part, np.float32), np.empty(part * size, np.float32)
        return lambda d: group.all_gather(inp, out, [part] * size, sig, d)
    if op == "reduce_scatter":
        part = max(n // size, 1)
        inp, out = np.zeros(part * size, np.float32), np.empty(part, np.float32)
        return lambda d: group.reduce_scatter(inp, out, [part] * size, "sum", sig, d)
    raise SystemExit(f"unknown op {op}")


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait


def wait_idle(limit: float) -> None:
    """On a machine shared with other work: wait up to ``limit`` seconds until the CPUs are at
    least 90% idle over 0.2 s (the other ranks wait in a barrier meanwhile, asleep)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        total, idle = _cpu_times()
        time.sleep(0.2)
        total2, idle2 = _cpu_times()
        if (idle2 - idle) >= 0.9 * max(total2 - total, 1):
            return


# -- ringlet ranks -----------------------------------------------------------------------------
class _FileExchange:
    def __init__(self, directory: str, rank: int, size: int) -> None:
        self.dir, self.rank, self.size, self.round = Path(directory), rank, size, 0

    def __call__(self, value: bytes) -> list[bytes]:
        self.round += 1
        tmp = self.dir / f"{self.round}.{self.rank}.tmp"
        tmp.write_bytes(value)
        tmp.rename(self.dir / f"{self.round}.{self.rank}")
        out = []
        for q in range(self.size):
            path = self.dir / f"{self.round}.{q}"
            while not path.exists():
                time.sleep(0.001)
            out.append(path.read_bytes())
        return out


def _ringlet_rank(
    rank: int, size: int, directory: str, args: argparse.Namespace, results: Any
) -> None:
    from ringlet.transport.shm import ShmGroup, ShmTuning

    tuning = ShmTuning(**args.tuning) if args.tuning else None
    exchange = _FileExchange(directory, rank, size)
    group = ShmGroup.open(rank, size, job="bench", exchange=exchange, timeout=60, tuning=tuning)
    seq = iter(range(1 << 30))

    def barrier() -> None:
        group.barrier(next(seq) | 1 << 40, time.monotonic() + 600)

    # Agree on iteration counts: rank 0 measures, the others adopt its numbers via the group.
    rows = []
    for op in args.ops:
        for nbytes in args.sizes:
            call = make_call(op, size, rank, nbytes, group)
            for _ in range(3):
                call(time.monotonic() + 600)
            count = np.zeros(1, np.int64)
            if rank == 0:
                barrier()
                t0 = time.perf_counter()
                call(time.monotonic() + 600)
                count[0] = max(int(args.seconds / max(time.perf_counter() - t0, 1e-7)), 3)
            else:
                barrier()
                call(time.monotonic() + 600)
            group.broadcast(count, 0, 0xC0047, time.monotonic() + 600)
            samples = []
            for _ in range(args.reps):
                if rank == 0:
                    wait_idle(args.wait_idle)
                barrier()
                t0 = time.perf_counter()
                deadline = time.monotonic() + 600
                for _ in range(int(count[0])):
                    call(deadline)
                samples.append((time.perf_counter() - t0) / int(count[0]))
            rows.append((op, nbytes, statistics.median(samples), min(samples)))
    if rank == 0:
        results.put({"rows": rows, "cma": group.uses_cma})
    group.close()


def run_ringlet(size: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ringlet-bench-") as directory:
        procs = [
            ctx.Process(target=_ringlet_rank, args=(r, size, directory, args, results))
            for r in range(size)
        ]
        for p in procs:
            p.start()
        out: dict[str, Any] = results.get(timeout=3600)
        for p in procs:
            p.join()
    return out


# -- MPI ---------------------------------------------------------------------------------------
def make_mpi_call(op: str, comm: Any, nbytes: int) -> Callable[[], None]:
    """The same collective through mpi4py's buffer interface."""
    from mpi4py import MPI

    size = comm.Get_size()
    n = max(nbytes // 4, 1)
    part = max(n // size, 1)
    if op == "all_reduce":
        buf = np.zeros(n, np.float32)
        return lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    if op == "broadcast":
        buf = np.ones(n, np.float32)
        return lambda: comm.Bcast(buf, root=0)
    if op == "all_gather":
        inp, out = np.ones(part, np.float32), np.empty(part * size, np.float32)
        return lambda: comm.Allgather(inp, out)
    inp, out = np.zeros(part * size, np.float32), np.empty(part, np.float32)
    return lambda: comm.Reduce_scatter_block(inp, out, op=MPI.SUM)


def run_mpi(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for op in args.ops:
        for nbytes in args.sizes:
            call = make_mpi_call(op, comm, nbytes)
            for _ in range(3):
                call()
            comm.Barrier()
            t0 = time.perf_counter()
            call()
            count = comm.bcast(max(int(args.seconds / max(time.perf_counter() - t0, 1e-7)), 3))
            samples = []
            for _ in range(args.reps):
                if rank == 0:
                    wait_idle(args.wait_idle)
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(count):
                    call()
                samples.append((time.perf_counter() - t0) / count)
            rows.append((op, nbytes, statistics.median(samples), min(samples)))
    if rank == 0:
        print_table(
            f"MPI ({MPI.Get_library_version().splitlines()[0].strip()}), {size} ranks", rows, size
        )


def print_table(title: str, rows: list[tuple[str, int, float, float]], size: int) -> None:
    """Median and best repetition: on a shared machine the best shows the code, the median
    the neighbours too."""
    print(f"\n{title}")
    print(
        f"{'op':>15} {'bytes':>10} {'median us':>10} {'busbw GB/s':>10} {'best us':>10} "
        f"{'busbw GB/s':>10}"
    )
    for op, nbytes, median, best in rows:
        factor = busbw_factor(op, size) * max(nbytes, 4) / 1e9
        print(
            f"{op:>15} {nbytes:>10} {median * 1e6:>10.2f} {factor / median:>10.3f} "
            f"{best * 1e6:>10.2f} {factor / best:>10.3f}"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--ranks", default="2,4", help="world sizes, comma-separated")
    parser.add_argument(
        "--ops", default="all_reduce", help="all_reduce,broadcast,all_gather,reduce_scatter"
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="message bytes: 8,1K,1M,16M")
    parser.add_argument("--seconds", type=float, default=0.3, help="target seconds per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tuning", default="", help="ShmTuning fields: stage_bytes=262144,...")
    parser.add_argument("--mpi", action="store_true", help="measure mpi4py (run under mpiexec)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each repetition wait up to this long for the machine to be idle",
    )
    args = parser.parse_args(argv)
    args.ops = args.ops.split(",")
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    tuning: dict[str, Any] = {}
    for item in filter(None, args.tuning.split(",")):
        key, _, value = item.partition("=")
        tuning[key] = bool(int(value)) if key == "use_cma" else int(value)
    args.tuning = tuning
    if args.mpi:
        run_mpi(args)
        return
    for size in (int(s) for s in args.ranks.split(",")):
        result = run_ringlet(size, args)
        cma = "cross-memory attach" if result["cma"] else "segment only"
        print_table(
            f"ringlet shm, {size} ranks on {os.cpu_count()} cores ({cma}"
            f"{', ' + args.tuning.__repr__() if args.tuning else ''})",
            result["rows"],
            size,
        )
        if args.json:
            print(json.dumps(result["rows"]))


if __name__ == "__main__":
    main()

"""One rank of a multi-host correctness job: every collective, dtype and size, checked against NumPy.

Started by test_multihost.py on a simulated host with RINGLET_RANK/WORLD_SIZE/MASTER/SECRET set.
Every rank rebuilds every rank's input from the same seeds, so it can compute the NumPy reference
of any call locally. Output (stdout, JSON lines): first what the rank sees of the topology, then
one line of wrong results and the digests of the results every rank must hold bit for bit. A wrong
result is reported and the run goes on; an exception ends the rank with its traceback on stderr.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

import ringlet

SEED = 20261
DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.int32),
    np.dtype(ml_dtypes.bfloat16),
]
#: Elements per rank: none, a few (odd, so no chunking divides them evenly), about 3 MiB of float32.
SIZES = {"empty": 0, "few": 7, "mib": (3 << 20) // 4 + 5}
TAG = 7


def data(case: str, rank: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Rank `rank`'s input to `case`: unique per rank and element, exact to sum in its dtype.

    bfloat16 holds halves in [-4, 4] and int32 integers below 2^20, so their sums are exact; float32
    and float64 hold normal draws and are compared with a tolerance.
    """
    key = [SEED, rank, *hashlib.sha1(case.encode()).digest()[:4]]
    rng = np.random.default_rng(key)
    if dtype.kind == "i":
        return rng.integers(-(1 << 20), 1 << 20, size=shape).astype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return (rng.integers(-8, 9, size=shape) * 0.5).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def reduce_ref(parts: list[np.ndarray], op: str, dtype: np.dtype) -> np.ndarray:
    """op over the ranks' arrays, in float64 (int64 for integers) before rounding to `dtype`."""
    wide = np.stack([p.astype(np.int64 if dtype.kind == "i" else np.float64) for p in parts])
    if op == "max":
        return wide.max(axis=0).astype(dtype)
    total = wide.sum(axis=0)
    if op == "mean":
        total = total // len(parts) if dtype.kind == "i" else total / len(parts)
    return total.astype(dtype)


class Checker:
    """Compares results with references and keeps what differed and the digests to compare."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []
        self.digests: dict[str, str] = {}

    def same(self, case: str, got: Any, want: np.ndarray, *, exact: bool = False,
             digest: bool = False) -> None:  # fmt: skip
        """Record a failure unless `got` equals `want` in dtype, shape and values (within a
        tolerance for float32/float64 sums); `digest` keeps its bytes' hash for a cross-rank check."""
        if not isinstance(got, np.ndarray) or got.dtype != want.dtype or got.shape != want.shape:
            kind = f"{got.dtype} {got.shape}" if isinstance(got, np.ndarray) else type(got).__name__
            self.failures.append(f"{case}: got {kind}, expected {want.dtype} {want.shape}")
            return
        if digest:
            self.digests[case] = hashlib.sha1(got.tobytes()).hexdigest()
        a, b = got.astype(np.float64), want.astype(np.float64)
        if exact or got.dtype.kind == "i" or got.dtype == np.dtype(ml_dtypes.bfloat16):
            tol = 0.0 if exact or got.dtype.kind == "i" else 1e-2  # bfloat16 mean over 3 rounds
            bad = np.abs(a - b) > tol * np.maximum(1.0, np.abs(b))
        else:
            rtol = 1e-5 if got.dtype == np.float32 else 1e-12
            bad = ~np.isclose(a, b, rtol=rtol, atol=rtol * 4)
        if bad.any():
            i = int(np.argmax(bad.reshape(-1)))
            self.failures.append(
                f"{case}: {int(bad.sum())} of {bad.size} elements differ; first at flat index {i}: "
                f"got {a.reshape(-1)[i]!r}, expected {b.reshape(-1)[i]!r}"
            )

    def none(self, case: str, got: Any) -> None:
        if got is not None:
            self.failures.append(f"{case}: expected None on rank {self.rank}, got {type(got)}")


def run_cases(comm: Any, check: Checker) -> None:
    """Every collective at every dtype and size, in the same order on every rank (the ~3 MiB size
    only at the dtypes MULTIHOST_MIB_DTYPES names)."""
    rank, n = comm.rank, comm.size
    big = os.environ.get("MULTIHOST_MIB_DTYPES", "float32,bfloat16").split(",")
    for dtype in DTYPES:
        for label, count in SIZES.items():
            if label == "mib" and dtype.name not in big:
                continue  # the big size at every dtype costs seconds; the test picks where
            for run in CASES:
                run(comm, check, f"{run.__name__}/{dtype.name}/{label}", rank, n, count, dtype)
    comm.barrier()
    comm.barrier(timeout=30.0)


def all_reduce(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
               dtype: np.dtype) -> None:  # fmt: skip
    for op in ("sum", "mean", "max"):
        name = f"{case}/{op}"
        parts = [data(name, r, (count,), dtype) for r in range(n)]
        x = parts[rank].copy()
        out = comm.all_reduce(x, op=op)
        check.same(name, out, reduce_ref(parts, op, dtype), digest=True)
        if out is not x:
            check.failures.append(f"{name}: all_reduce did not return its argument")


def reduce(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
           dtype: np.dtype) -> None:  # fmt: skip
    root = n - 1
    parts = [data(case, r, (count,), dtype) for r in range(n)]
    x = parts[rank].copy()
    comm.reduce(x, root=root, op="sum")
    want = reduce_ref(parts, "sum", dtype) if rank == root else parts[rank]
    check.same(case, x, want, exact=rank != root)


def broadcast(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
              dtype: np.dtype) -> None:  # fmt: skip
    root = 1 % n
    want = data(case, root, (count,), dtype)
    x = want.copy() if rank == root else np.zeros(count, dtype)
    check.same(case, comm.broadcast(x, root=root), want, exact=True)


def _rows(rank: int, count: int) -> int:
    """Uneven first dimensions: rank r passes r-dependent rows, rank 1 none at all."""
    return 0 if rank == 1 else (count // 3) * (rank + 1) // 2 + rank


def all_gather(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
               dtype: np.dtype) -> None:  # fmt: skip
    parts = [data(case, r, (_rows(r, count), 3), dtype) for r in range(n)]
    check.same(case, comm.all_gather(parts[rank]), np.concatenate(parts), exact=True)


def gather(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
           dtype: np.dtype) -> None:  # fmt: skip
    root = n - 1
    parts = [data(case, r, (_rows(r, count), 3), dtype) for r in range(n)]
    out = comm.gather(parts[rank], root=root)
    if rank == root:
        check.same(case, out, np.concatenate(parts), exact=True)
    else:
        check.none(case, out)


def scatter(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
            dtype: np.dtype) -> None:  # fmt: skip
    rows = count // 2  # each rank's part: rows x 2, about `count` elements
    whole = data(case, 0, (n * rows, 2), dtype)
    out = comm.scatter(whole.copy() if rank == 0 else None, root=0)
    check.same(case, out, whole[rank * rows : (rank + 1) * rows], exact=True)


def reduce_scatter(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
                   dtype: np.dtype) -> None:  # fmt: skip
    block = max(1, count // n) if count else 0  # each rank passes about `count` elements
    parts = [data(case, r, (n * block,), dtype) for r in range(n)]
    out = comm.reduce_scatter(parts[rank].copy(), op="sum")
    want = reduce_ref(parts, "sum", dtype)[rank * block : (rank + 1) * block]
    check.same(case, out, want)


def all_to_all(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
               dtype: np.dtype) -> None:  # fmt: skip
    block = max(1, count // n) if count else 0
    parts = [data(case, r, (n * block,), dtype) for r in range(n)]
    want = np.concatenate([p[rank * block : (rank + 1) * block] for p in parts])
    check.same(case, comm.all_to_all(parts[rank].copy()), want, exact=True)


def send_recv(comm: Any, check: Checker, case: str, rank: int, n: int, count: int,
              dtype: np.dtype) -> None:  # fmt: skip
    """A ring: every rank sends to its right and receives from its left (crossing hosts)."""
    if n == 1:
        return
    right, left = (rank + 1) % n, (rank - 1) % n
    sent = comm.send(data(case, rank, (count, 2), dtype), right, tag=TAG, async_op=True)
    got = comm.recv(None, left, tag=TAG)
    sent.wait()
    check.same(case, got, data(case, left, (count, 2), dtype), exact=True)
    comm.barrier()


CASES: list[Callable[..., None]] = [
    all_reduce, reduce, broadcast, all_gather, gather, scatter, reduce_scatter, all_to_all,
    send_recv,
]  # fmt: skip


def main() -> int:
    faulthandler.register(signal.SIGUSR1)  # the test asks for a stack dump before killing a hang
    with ringlet.init() as comm:
        seen = {"rank": comm.rank, "size": comm.size, "local_rank": comm.local_rank,
                "local_size": comm.local_size, "hostname": socket.gethostname()}  # fmt: skip
        print(json.dumps({"topology": seen}), flush=True)
        check = Checker(comm.rank)
        if os.environ.get("MULTIHOST_CASES", "all") == "all":
            run_cases(comm, check)
        else:
            comm.barrier()
        print(json.dumps({"failures": check.failures, "digests": check.digests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

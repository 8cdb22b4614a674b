"""Every collective × every algorithm it has (and the default choice) × dtypes × sizes × roots, on
real ranks, against NumPy.

Each world size is one job (spawning is the slow part): the body runs every case, recomputes the
inputs of all ranks locally and compares with a NumPy reference, and returns the failures.
"""

from __future__ import annotations

import itertools
import os

import ml_dtypes
import numpy as np
import pytest

import spmd
from ringlet.schedules.select import ALGORITHMS

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [
    np.dtype(t)
    for t in (
        "float32",
        "float64",
        "int32",
        "int64",
        "uint8",
        "int8",
        "float16",
        "bool",
        "complex64",
    )
] + [BF16]
REDUCE_OPS = ["sum", "mean", "max", "min", "prod", "band", "bor", "bxor"]


def _valid(op: str, dtype: np.dtype) -> bool:
    if op in ("band", "bor", "bxor"):
        return dtype.kind in "iub"
    if op in ("max", "min"):
        return dtype.kind != "c"
    return not (op == "mean" and dtype.kind == "b")


def data(rank: int, count: int, dtype: np.dtype, salt: int = 0) -> np.ndarray:
    """Per-rank, per-element values; small integers so float reductions are exact in any order."""
    rng = np.random.default_rng(1000 * rank + 7 * count + salt)
    if dtype.kind == "b":
        return rng.integers(0, 2, count).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, count, dtype=np.int64).astype(dtype)
    vals = rng.integers(-3, 4, count).astype(np.float64)
    if dtype.kind == "c":
        return (vals + 1j * rng.integers(-3, 4, count)).astype(dtype)
    return vals.astype(dtype)


def reference(op: str, inputs: list[np.ndarray]) -> np.ndarray:
    """What reducing the inputs gives, computed with NumPy in rank order."""
    dt = inputs[0].dtype
    if op in ("sum", "mean"):
        total = inputs[0].copy()
        for a in inputs[1:]:
            if dt.kind == "b":
                np.logical_or(total, a, out=total)
            else:
                np.add(total, a, out=total, dtype=dt)
        if op == "mean" and dt.kind in "iu":
            total = total // len(inputs)
        elif op == "mean" and dt.kind == "c":  # parts divided separately: correctly rounded
            total = (total.real / len(inputs) + 1j * (total.imag / len(inputs))).astype(dt)
        elif op == "mean":
            total = (total / len(inputs)).astype(dt)
        return total
    fn = {
        "max": np.maximum,
        "min": np.minimum,
        "prod": np.multiply,
        "band": np.bitwise_and,
        "bor": np.bitwise_or,
        "bxor": np.bitwise_xor,
    }[op]
    out = inputs[0].copy()
    for a in inputs[1:]:
        out = fn(out, a).astype(dt)
    return out


def _reduced(memo: dict[str, np.ndarray], op: str, inputs: list[np.ndarray]) -> np.ndarray:
    """reference(op, inputs), computed once per case and op for all the algorithms checked."""
    if op not in memo:
        memo[op] = reference(op, inputs)
    return memo[op]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality; for floats by value (the sign of a zero product depends on the order)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "c":
        return bool(
            np.array_equal(a.astype(np.complex128), b.astype(np.complex128), equal_nan=True)
        )
    if a.dtype.kind == "f" or a.dtype == BF16:
        return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))
    return bool(np.array_equal(a, b))


#: Above one engine segment (1 MiB), so every algorithm's segmented rounds run too.
MULTI_SEGMENT = 3 * (1 << 18) + 5


def _counts(size: int) -> list[int]:
    return sorted({0, 1, 7, size + 1, 256, 3 * 1024 + 5, MULTI_SEGMENT})


def algos(comm, op: str) -> list[str | None]:  # type: ignore[no-untyped-def]
    """The default choice (None) and every algorithm of ``op`` worth running here: "hier" only
    where ranks span hosts (on one host it is the local phases alone), and "ordered" only in
    deterministic mode (its bits are checked against NumPy's fold in test_topology and
    tests/unit/test_sched_ordered.py)."""
    spans = len(set(comm.hosts)) > 1
    return [None] + [a for a in ALGORITHMS[op] if (a != "hier" or spans) and a != "ordered"]


def run_cases(comm, fast: bool) -> list[str]:  # type: ignore[no-untyped-def]
    """Run all cases on this rank; return a description of every wrong result."""
    n, me = comm.size, comm.rank
    bad: list[str] = []
    dtypes = [*DTYPES[:4], BF16] if fast else DTYPES
    for count, dtype in itertools.product(_counts(n), dtypes):
        big = count >= MULTI_SEGMENT
        if big and dtype.name != "int64":
            continue
        roots = [n - 1] if big else sorted({0, n - 1, n // 2})
        inputs = [data(r, count, dtype) for r in range(n)]
        mine = inputs[me]
        memo: dict[str, np.ndarray] = {}
        case = f"{dtype.name} count={count}"
        for algo in algos(comm, "all_reduce"):
            for op in REDUCE_OPS:
                if not _valid(op, dtype) or ((fast or big) and op not in ("sum", "max", "bxor")):
                    continue
                got = comm.all_reduce(mine.copy(), op=op, algo=algo)
                if not _same(got, _reduced(memo, op, inputs)):
                    bad.append(f"all_reduce {algo} {op} {case}")
        for algo, root in itertools.product(algos(comm, "broadcast"), roots):
            got = comm.broadcast(mine.copy(), root=root, algo=algo)
            if not _same(got, inputs[root]):
                bad.append(f"broadcast {algo} root={root} {case}")
        for algo, root in itertools.product(algos(comm, "reduce"), roots):
            op = "max" if dtype.kind != "c" else "sum"
            got = comm.reduce(mine.copy(), root=root, op=op, algo=algo)
            want = _reduced(memo, op, inputs) if me == root else mine
            if not _same(got, want):
                bad.append(f"reduce {algo} root={root} {case}")
        # uneven first dimensions: rank r contributes count + r rows
        uneven = [data(r, count + r, dtype, salt=1) for r in range(n)]
        for algo in algos(comm, "all_gather"):
            if not _same(comm.all_gather(uneven[me], algo=algo), np.concatenate(uneven)):
                bad.append(f"all_gather {algo} {case}")
        for algo, root in itertools.product(algos(comm, "gather"), roots):
            got = comm.gather(uneven[me], root=root, algo=algo)
            if (me == root and not _same(got, np.concatenate(uneven))) or (
                me != root and got is not None
            ):
                bad.append(f"gather {algo} root={root} {case}")
        whole = np.concatenate([data(r, count, dtype, salt=2) for r in range(n)])
        for algo, root in itertools.product(algos(comm, "scatter"), roots):
            got = comm.scatter(whole if me == root else None, root=root, algo=algo)
            if not _same(got, whole[me * count : (me + 1) * count]):
                bad.append(f"scatter {algo} root={root} {case}")
        # rank r's reduce_scatter / all_to_all input is n chunks, chunk j made from a seed of its
        # own, so this rank makes only the chunks its result depends on: chunk `me` of each rank
        block = np.concatenate([data(me, count, dtype, salt=13 + 10 * j) for j in range(n)])
        mine_of = [data(r, count, dtype, salt=13 + 10 * me) for r in range(n)]
        op = "sum" if dtype.kind != "b" else "bor"
        want = reference(op, mine_of)
        for algo in algos(comm, "reduce_scatter"):
            if not _same(comm.reduce_scatter(block, op=op, algo=algo), want):
                bad.append(f"reduce_scatter {algo} {case}")
        if not _same(comm.all_to_all(block), np.concatenate(mine_of)):
            bad.append(f"all_to_all {case}")
    comm.barrier()
    return bad


def _run(n: int, transport: str, fast: bool) -> None:
    results = spmd.run(run_cases, n, fast, env={"RINGLET_TRANSPORT": transport}, timeout=600)
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:50])


@pytest.mark.parametrize(
    "n", [*spmd.WORLD_SIZES[:-1], pytest.param(8, marks=pytest.mark.long)]  # 8: auto by default
)
def test_every_collective_tcp(n: int) -> None:
    _run(n, "tcp", fast=n > 4)


@pytest.mark.parametrize("n", spmd.WORLD_SIZES)
def test_every_collective_auto(n: int) -> None:
    """Ranks on one host: the default choice takes the host's shm group, a forced algorithm runs
    as a schedule over the shared-memory transport."""
    pytest.importorskip("ringlet.transport.shm")
    _run(n, "auto", fast=n > 4)


def large_cases(comm, mib: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Sizes of many MiB: results exact, and bit-identical on every rank for random floats."""
    n, me = comm.size, comm.rank
    count = mib * (1 << 20) // 4
    bad = []
    ints = (np.arange(count, dtype=np.int32) % 1000) * (me + 1)
    comm.all_reduce(ints)
    if not np.array_equal(ints, (np.arange(count, dtype=np.int32) % 1000) * (n * (n + 1) // 2)):
        bad.append("all_reduce int32 sum")
    floats = np.random.default_rng(me).standard_normal(count).astype(np.float32)
    comm.all_reduce(floats)
    digests = comm.all_gather(
        np.frombuffer(floats.tobytes()[:4096] + floats.tobytes()[-4096:], np.uint8)
    )
    if len({digests[i * 8192 : (i + 1) * 8192].tobytes() for i in range(n)}) != 1:
        bad.append("all_reduce float32 not identical on all ranks")
    want = sum(
        np.random.default_rng(r).standard_normal(count).astype(np.float32).astype(np.float64)
        for r in range(n)
    )
    if not np.allclose(floats, want, atol=1e-4 * n):
        bad.append("all_reduce float32 wrong")
    b = np.full(count, me, np.float32)
    comm.broadcast(b, root=n - 1)
    if not (b == n - 1).all():
        bad.append("broadcast")
    return bad


#: Large messages by default at 2 ranks over shm, 3 over TCP and 8 over shm; the rest with -m long.
LARGE = [(2, "auto"), (3, "tcp"), (8, "auto")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n", "transport"),
    [
        (n, t) if (n, t) in LARGE else pytest.param(n, t, marks=pytest.mark.long)
        for n in (2, 3, 8)
        for t in ("tcp", "auto")
    ],
)
def test_large_messages(n: int, transport: str) -> None:
    if transport == "auto":
        pytest.importorskip("ringlet.transport.shm")
    mib = 32 if n <= 3 else 16  # past the 16 MiB piece size of reduce and reduce_scatter
    results = spmd.run(large_cases, n, mib, env={"RINGLET_TRANSPORT": transport}, timeout=600)
    assert results == [[]] * n


def float_identity(comm) -> bytes:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(comm.rank).standard_normal(10_001)
    for algo in ALGORITHMS["all_reduce"]:
        comm.all_reduce(x, algo=algo)
    return x.tobytes()


@pytest.mark.parametrize("n", [3, 5])
def test_float_results_identical_on_every_rank(n: int) -> None:
    outs = spmd.run(float_identity, n, env={"RINGLET_TRANSPORT": os.environ.get("T", "tcp")})
    assert len(set(outs)) == 1

"""Every ShmGroup collective against NumPy references computed in the parent.

One spawn per (world size, tuning) runs a whole batch of cases — op x dtype x size x root — so
the suite stays quick; each rank returns its results (bytes, or a digest for big ones) and the
parent compares every rank's with the reference. Three tunings cover the three paths: the
defaults (one-step and pipelined through the segment, cross-memory attach from 64-256 KiB),
a 4 KiB staging buffer without cross-memory attach (many pipelined chunks and remainders),
and cross-memory attach for everything with a tiny scratch buffer (many fold chunks).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import ml_dtypes
import numpy as np
import pytest
from test_shm_spmd import run_group

from ringlet.ops import ReduceOp, finish_mean
from ringlet.transport.shm import ShmGroup, ShmTuning
from ringlet.transport.shm_tuning import OPS

DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.uint8),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
]
UFUNCS = {
    "sum": np.add,
    "prod": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
    "band": np.bitwise_and,
    "bor": np.bitwise_or,
    "bxor": np.bitwise_xor,
}
SIZES = [0, 1, 7, 1000, 5003]
BIG = (3 << 20) // 4 + 3  # elements of float32: 3 MiB and an odd remainder
TUNINGS = {
    "default": ShmTuning(),
    "staged": ShmTuning(stage_bytes=4096, use_cma=False),
    "cma": ShmTuning(
        stage_bytes=4096,
        flat_reduce_bytes=0,
        scratch_bytes=1024,
        cma_min_bytes=dict.fromkeys(OPS, 0),
    ),
}


def ops_for(dtype: np.dtype) -> list[str]:
    if dtype.kind in "biu":
        return ["sum", "prod", "max", "min", "band", "bor", "bxor"]
    if dtype.kind == "c":
        return ["sum", "prod"]
    return ["sum", "prod", "max", "min"]


def make(seed: int, rank: int, dtype: np.dtype, n: int) -> np.ndarray:
    """Data unique per case, rank and element."""
    rng = np.random.default_rng([seed, rank])
    if dtype.kind == "b":
        return rng.random(n) < 0.5
    if dtype.kind == "u":
        return rng.integers(0, 256, n).astype(dtype)
    if dtype.kind == "i":
        return rng.integers(-1000, 1000, n).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    return (rng.standard_normal(n) * 3).astype(dtype)


def split(n: int, size: int, rank: int, salt: int) -> list[int]:
    """Uneven counts (some zero) that every rank computes alike."""
    return [(n * (q + 1) + salt * rank) % (n + 3) if n else 0 for q in range(size)]


@dataclass(frozen=True)
class Case:
    kind: str
    dtype: np.dtype
    n: int
    op: str = "sum"
    root: int = 0
    seed: int = 0


def cases(size: int, big: int = BIG) -> list[Case]:
    """The batch for one world size; ``big`` elements for the few large float32 cases."""
    out: list[Case] = []
    roots = sorted({0, size - 1, size // 2})
    seed = iter(range(1, 1 << 30))
    for dtype in DTYPES:
        for i, n in enumerate(SIZES):
            ops = ops_for(dtype)
            for op in (ops[0], ops[i % len(ops)]) if i % len(ops) else (ops[0],):
                out.append(Case("all_reduce", dtype, n, op, seed=next(seed)))
            root = roots[i % len(roots)]
            if dtype.kind != "b":  # sum, then each reduced piece divided before it is shared
                out.append(Case("all_reduce", dtype, n, "mean", seed=next(seed)))
            out.append(Case("reduce", dtype, n, ops[(i + 1) % len(ops)], root, next(seed)))
            out.append(Case("broadcast", dtype, n, root=root, seed=next(seed)))
            out.append(Case("all_gather", dtype, n, seed=next(seed)))
            out.append(Case("gather", dtype, n, root=roots[(i + 1) % len(roots)], seed=next(seed)))
            out.append(Case("scatter", dtype, n, root=root, seed=next(seed)))
            out.append(Case("reduce_scatter", dtype, n, ops[i % len(ops)], seed=next(seed)))
    f32 = np.dtype(np.float32)
    for kind in ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter"):
        out.append(Case(kind, f32, big, root=size - 1, seed=next(seed)))
    out.append(Case("all_reduce", f32, big, "mean", seed=next(seed)))
    out.append(Case("barrier", f32, 0))
    return out


def signature(case: Case) -> int:
    raw = f"{case.kind}/{case.seed}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def digest(a: np.ndarray | None) -> bytes | None:
    """Small results travel whole (so a near-miss can be told from a wrong answer), big ones
    as a hash."""
    if a is None:
        return None
    raw = np.ascontiguousarray(a).tobytes()
    return raw if len(raw) <= EXACT_BYTES else hashlib.sha256(raw).digest()


EXACT_BYTES = 1 << 16


def counts_of(case: Case, size: int) -> list[int]:
    return split(case.n, size, 0, case.seed % 5)


def run_case(group: ShmGroup, case: Case) -> tuple[bytes | None, bytes | None]:
    """Run one case on this rank: (result digest, input digest after the call)."""
    r, size, dt, n = group.rank, group.size, case.dtype, case.n
    sig = signature(case)
    deadline = time.monotonic() + 30
    if case.kind == "barrier":
        group.barrier(sig, deadline)
        return None, None
    if case.kind in ("all_reduce", "reduce", "broadcast"):
        x = make(case.seed, r, dt, n)
        if case.kind == "all_reduce" and case.op == "mean":
            group.all_reduce(x, ReduceOp.SUM, sig, deadline, partial(finish_mean, size=size))
            return digest(x), None
        if case.kind == "all_reduce":
            group.all_reduce(x, case.op, sig, deadline)  # type: ignore[arg-type]
            return digest(x), None
        if case.kind == "broadcast":
            group.broadcast(x, case.root, sig, deadline)
            return digest(x), None
        out = x if r == case.root else None
        group.reduce(x, out, case.root, case.op, sig, deadline)  # type: ignore[arg-type]
        return digest(out), digest(x)
    counts = counts_of(case, size)
    if case.kind in ("all_gather", "gather"):
        inp = make(case.seed, r, dt, counts[r])
        out = np.empty(sum(counts), dt)
        if case.kind == "all_gather":
            group.all_gather(inp, out, counts, sig, deadline)
            return digest(out), digest(inp)
        group.gather(inp, out if r == case.root else None, counts, case.root, sig, deadline)
        return (digest(out) if r == case.root else None), digest(inp)
    if case.kind == "scatter":
        inp = make(case.seed, r, dt, sum(counts)) if r == case.root else None
        out = np.empty(counts[r], dt)
        group.scatter(inp, out, counts, case.root, sig, deadline)
        return digest(out), digest(inp)
    assert case.kind == "reduce_scatter", case.kind
    inp = make(case.seed, r, dt, sum(counts))
    out = np.empty(counts[r], dt)
    group.reduce_scatter(inp, out, counts, case.op, sig, deadline)  # type: ignore[arg-type]
    return digest(out), digest(inp)


def run_batch(group: ShmGroup, big: int) -> list[tuple[bytes | None, bytes | None]]:
    return [run_case(group, case) for case in cases(group.size, big)]


def fold(ufunc: np.ufunc, xs: list[np.ndarray]) -> np.ndarray:
    """x_0 op x_1 op ... in rank order, accumulating in place as ringlet.ops.combine does (for
    complex products NumPy's in-place loop rounds differently from its out-of-place one)."""
    acc = xs[0].copy()
    with np.errstate(all="ignore"):
        for x in xs[1:]:
            ufunc(acc, x, out=acc)
    return acc


def expected(case: Case, size: int) -> list[tuple[bytes | None, bytes | None]]:
    """The reference (result digest, input digest) of every rank, computed without ringlet; each
    rank's input is made once per case (not once per rank and case: that was most of the time)."""
    dt, n, ranks = case.dtype, case.n, range(size)
    if case.kind == "barrier":
        return [(None, None)] * size
    if case.kind in ("all_reduce", "reduce", "broadcast"):
        xs = [make(case.seed, q, dt, n) for q in ranks]
        if case.kind == "broadcast":
            return [(digest(xs[case.root]), None)] * size
        total = fold(UFUNCS["sum" if case.op == "mean" else case.op], xs)
        if case.op == "mean":
            return [(digest(mean_of(total, size)), None)] * size
        if case.kind == "all_reduce":
            return [(digest(total), None)] * size
        # the root's input is its output; the others keep their input
        return [(digest(total), None) if r == case.root else (None, digest(xs[r])) for r in ranks]
    counts = counts_of(case, size)
    if case.kind in ("all_gather", "gather"):
        xs = [make(case.seed, q, dt, counts[q]) for q in ranks]
        whole = digest(np.concatenate(xs))
        return [
            (whole if case.kind == "all_gather" or r == case.root else None, digest(xs[r]))
            for r in ranks
        ]
    displs = np.cumsum([0, *counts])
    if case.kind == "scatter":
        whole_in = make(case.seed, case.root, dt, sum(counts))
        return [
            (
                digest(whole_in[displs[r] : displs[r + 1]]),
                digest(whole_in) if r == case.root else None,
            )
            for r in ranks
        ]
    assert case.kind == "reduce_scatter", case.kind
    xs = [make(case.seed, q, dt, sum(counts)) for q in ranks]
    total = fold(UFUNCS[case.op], xs)
    return [(digest(total[displs[r] : displs[r + 1]]), digest(xs[r])) for r in ranks]


def mean_of(total: np.ndarray, size: int) -> np.ndarray:
    """The sum divided by the ranks, rounded once in its dtype (integers: floor division)."""
    if total.dtype.kind in "iu":
        return total // size
    if total.dtype.kind == "c":
        return (total.real / size + 1j * (total.imag / size)).astype(total.dtype)
    return (total / size).astype(total.dtype)


def inexact(case: Case) -> bool:
    """Complex products: NumPy's complex multiply rounds differently in its vector loop and in
    its scalar tail, so the bits depend on where an array is cut into chunks; the result is then
    the same on every rank but only within a rounding error of the whole-array reference."""
    return (
        case.op == "prod"
        and case.dtype.kind == "c"
        and case.kind in ("all_reduce", "reduce", "reduce_scatter")
    )


def close(case: Case, got: bytes | None, want: bytes | None) -> bool:
    if got is None or want is None or len(want) > EXACT_BYTES or len(got) != len(want):
        return got == want
    a, b = np.frombuffer(got, case.dtype), np.frombuffer(want, case.dtype)
    return bool(np.allclose(a, b, rtol=1e-5, atol=0))


def mismatches(
    size: int, big: int, results: list[list[tuple[bytes | None, bytes | None]]]
) -> Iterator[str]:
    for i, case in enumerate(cases(size, big)):
        outputs = {results[rank][i][0] for rank in range(size)} - {None}
        if case.kind in ("all_reduce", "broadcast", "all_gather") and len(outputs) > 1:
            yield f"{case}: ranks differ"
        wants = expected(case, size)
        for rank in range(size):
            want = wants[rank]
            got = results[rank][i]
            if got[0] != want[0] and not (inexact(case) and close(case, got[0], want[0])):
                yield f"{case} rank {rank}: wrong result"
            if want[1] is not None and got[1] != want[1]:
                yield f"{case} rank {rank}: input changed"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("size", "tuning"),
    [(1, "default")] + [(n, t) for n in (2, 3, 4, 5) for t in TUNINGS],
)
def test_every_op_dtype_size_and_root_matches_numpy(size: int, tuning: str) -> None:
    # A few MiB with the default tuning; with the 4 KiB stages 80 KB already takes dozens of steps.
    big = BIG if tuning == "default" else 20011
    outcomes = run_group(run_batch, size, big, tuning=TUNINGS[tuning], timeout=110)
    bad = list(mismatches(size, big, [o.value for o in outcomes]))
    assert not bad, f"{len(bad)} mismatches, first: " + "\n".join(bad[:10])


def few(size: int, big: int) -> list[Case]:
    """A smaller batch for 8 ranks: two dtypes, three sizes, every op."""
    keep = (np.dtype(np.float32), np.dtype(np.int64))
    return [c for c in cases(size, big) if c.dtype in keep and c.n in (0, 7, 1000, big)]


def run_few(group: ShmGroup, big: int) -> list[tuple[bytes | None, bytes | None]]:
    return [run_case(group, case) for case in few(group.size, big)]


@pytest.mark.timeout(120)
def test_eight_ranks() -> None:
    # 4 KiB stages: the one-step paths for the tiny sizes, many pipelined steps for the rest.
    big = 20011
    outcomes = run_group(run_few, 8, big, tuning=TUNINGS["staged"], timeout=110)
    results = [o.value for o in outcomes]
    batch = few(8, big)
    bad = [
        f"{case} rank {rank}"
        for i, case in enumerate(batch)
        for rank, (want, _) in enumerate(expected(case, 8))
        if results[rank][i][0] != want
        and not (inexact(case) and close(case, results[rank][i][0], want))
    ]
    assert not bad, f"{len(bad)} mismatches, first: " + "\n".join(bad[:10])

"""Small all_gather, gather and scatter in one exchange (eager.py): the payloads travel with the
row counts (scatter: in the root's header), and the results are exactly those of the two-step way.

Every rank builds the inputs of all ranks (the same on each) and checks its result against NumPy
and the flight recorder's name for the way the call went: payloads exactly at the capacity, one
byte and one element over, one rank over while the others fit, ranks with no rows, uneven rows,
trailing dimensions, dtypes float32 / int64 / bfloat16 / bool / float16 / complex64, gather to a
non-zero root, scatter from a list and from a strided array, async calls, a forced algorithm.
One job per world size and transport (spawning is the slow part).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from test_topology import hosted

import ringlet
import spmd
from ringlet.eager import capacity, scatter_capacity

DTYPES = [np.dtype(t) for t in ("float32", "int64", "bool", "float16", "complex64")]
DTYPES.append(np.dtype(ml_dtypes.bfloat16))


def _block(r: int, n: int, dtype: np.dtype, salt: int = 0) -> np.ndarray:
    """``n`` values unique to rank ``r`` and element, exact in every dtype."""
    vals = (np.arange(n) * 7 + r * 131 + salt) % 97
    if dtype.kind == "b":
        return (vals % 2).astype(bool)
    return vals.astype(dtype)


def _rows(r: int, rows: int, trailing: tuple[int, ...], dtype: np.dtype, salt: int) -> np.ndarray:
    n = rows * int(np.prod(trailing, dtype=np.int64))
    return _block(r, n, dtype, salt).reshape(rows, *trailing)


def _gather_cases(size: int) -> list[tuple[str, list[np.ndarray], bool]]:
    """(name, every rank's input, whether it goes eager), the same on every rank."""
    cap = capacity(size)
    cases: list[tuple[str, list[np.ndarray], bool]] = []
    for k, dt in enumerate(DTYPES):
        at_cap = cap // dt.itemsize
        cases.append(
            (f"{dt.name} at capacity", [_block(r, at_cap, dt, k) for r in range(size)], True)
        )
        over = [_block(r, at_cap + 1, dt, k) for r in range(size)]
        cases.append((f"{dt.name} one element over", over, False))
        mixed = [_block(r, at_cap + (r == size - 1), dt, k) for r in range(size)]
        cases.append((f"{dt.name} last rank over", mixed, False))
        uneven = [_rows(r, (r * 5 + k) % 4, (3, 2), dt, k) for r in range(size)]  # 0 rows too
        cases.append((f"{dt.name} uneven, trailing (3, 2)", uneven, True))
        cases.append(
            (f"{dt.name} 8 B", [_block(r, 8 // dt.itemsize, dt, k) for r in range(size)], True)
        )
    u8 = np.dtype("uint8")
    cases.append(("1 byte over", [_block(r, cap + 1, u8) for r in range(size)], False))
    cases.append(
        ("1 byte over on rank 0", [_block(r, cap + (r == 0), u8) for r in range(size)], False)
    )
    cases.append(("all empty", [np.zeros((0, 4), np.float32) for _ in range(size)], True))
    cases.append(("0-d", [np.array(r + 0.5) for r in range(size)], True))
    cases.append(("large", [_block(r, 1 << 14, np.dtype("float32")) for r in range(size)], False))
    return cases


def _way(comm: Any) -> str:
    return str(comm._recorder.entries[-1].algorithm)


def _check(bad: list[str], name: str, got: Any, want: np.ndarray | None) -> None:
    if want is None:
        if got is not None:
            bad.append(f"{name}: expected None, got {type(got).__name__}")
        return
    same = got is not None and got.dtype == want.dtype and got.shape == want.shape
    raw = np.ascontiguousarray
    if not (same and np.array_equal(raw(got).view(np.uint8), raw(want).view(np.uint8))):
        shape = None if got is None else (got.dtype, got.shape)
        bad.append(f"{name}: got {shape}, want {(want.dtype, want.shape)}")


def _gathers(comm: Any) -> list[str]:
    bad: list[str] = []
    me, n = comm.rank, comm.size
    for name, inputs, eager in _gather_cases(n):
        want = np.concatenate([a if a.ndim else a.reshape(1) for a in inputs])
        calls: list[tuple[str, Callable[[], Any], np.ndarray | None]] = [
            ("all_gather", lambda x=inputs[me]: comm.all_gather(x), want),
            (
                "async all_gather",
                lambda x=inputs[me]: comm.all_gather(x, async_op=True).wait(),
                want,
            ),
        ]
        for root in sorted({0, n - 1}):
            calls.append(
                (
                    f"gather root={root}",
                    lambda x=inputs[me], root=root: comm.gather(x, root),
                    want if me == root else None,
                )
            )
        for what, fn, expected in calls:
            _check(bad, f"{what} {name}", fn(), expected)
            if _way(comm).startswith("eager") != eager:
                bad.append(f"{what} {name}: went {_way(comm)!r}, eager expected: {eager}")
    forced = comm.all_gather(inputs[me], algo="ring")  # a forced algorithm runs as asked
    _check(bad, "forced ring", forced, want)
    if _way(comm) != "ring":
        bad.append(f"forced ring went {_way(comm)!r}")
    return bad


def _scatter_cases(size: int) -> list[tuple[str, Any, list[np.ndarray], bool]]:
    """(name, what the root passes, each rank's part, whether it goes eager)."""
    cap = scatter_capacity(size)
    cases: list[tuple[str, Any, list[np.ndarray], bool]] = []
    for k, dt in enumerate(DTYPES):
        per = cap // dt.itemsize // size
        whole = _block(0, per * size, dt, k)
        cases.append((f"{dt.name} array", whole, np.split(whole, size), True))
        over = _block(0, (per + 1) * size, dt, k)
        cases.append((f"{dt.name} array over", over, np.split(over, size), False))
        parts = [_rows(r, (r * 3 + k) % 4, (2, 3), dt, k) for r in range(size)]  # 0 rows too
        cases.append((f"{dt.name} list", parts, parts, True))
        strided = _rows(1, 4 * size, (4, 2), dt, k)[:, ::2]  # not contiguous
        cases.append((f"{dt.name} strided", strided, np.split(strided, size), True))
        big = _rows(2, 3 * size, (cap // dt.itemsize,), dt, k)[:, ::2]  # strided, over
        cases.append((f"{dt.name} strided over", big, np.split(big, size), False))
    u8 = np.dtype("uint8")
    exact = [_block(r, cap // size + (r < cap % size), u8) for r in range(size)]
    cases.append(("list at capacity", exact, exact, True))
    one_over = [_block(r, len(exact[r]) + (r == size - 1), u8) for r in range(size)]
    cases.append(("list 1 byte over", one_over, one_over, False))
    empty = [np.zeros((0, 2), np.float32) for _ in range(size)]
    cases.append(("all empty", empty, empty, True))
    scalars = [np.array(r + 0.5) for r in range(size)]
    cases.append(("scalars", scalars, [np.array([r + 0.5]) for r in range(size)], True))
    return cases


def _scatters(comm: Any) -> list[str]:
    bad: list[str] = []
    me, n = comm.rank, comm.size
    for root in sorted({0, n - 1}):
        for name, given, parts, eager in _scatter_cases(n):
            kept = [np.array(p, copy=True) for p in given] if isinstance(given, list) else None
            for how, async_op in (("", False), ("async ", True)):
                got = comm.scatter(given if me == root else None, root, async_op=async_op)
                got = got.wait() if async_op else got
                _check(bad, f"{how}scatter root={root} {name}", got, parts[me])
                if _way(comm).startswith("eager") != eager:
                    bad.append(f"scatter root={root} {name}: went {_way(comm)!r}, eager: {eager}")
            same = kept is None or all(map(np.array_equal, kept, given))
            if me == root and not same:
                bad.append(f"scatter {name}: the root's input changed")
    small = np.arange(2 * n, dtype=np.float32)
    _check(
        bad,
        "forced tree",
        comm.scatter(small if me == 0 else None, algo="tree"),
        small[2 * me : 2 * me + 2],
    )
    if _way(comm) != "tree":
        bad.append(f"forced tree went {_way(comm)!r}")
    return bad


def _eager_cases(comm: Any) -> list[str]:
    return _gathers(comm) + _scatters(comm)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", spmd.WORLD_SIZES)
def test_eager_results_match_numpy(n: int) -> None:
    for rank, bad in enumerate(spmd.run(_eager_cases, n, timeout=150)):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3])
def test_eager_results_match_numpy_tcp(n: int) -> None:
    for rank, bad in enumerate(
        spmd.run(_eager_cases, n, env={"RINGLET_TRANSPORT": "tcp"}, timeout=150)
    ):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.timeout(180)
def test_eager_results_match_numpy_across_hosts() -> None:
    for rank, bad in enumerate(spmd.run(_eager_cases, 4, timeout=150, **hosted((0, 0, 1, 1)))):
        assert not bad, f"rank {rank}: {bad}"


def _mismatched(comm: Any) -> list[str]:
    """An eager call whose ranks differ is a MismatchError on every rank, never a wrong result."""
    outcomes = []
    for name, fn in (
        ("dtype", lambda sub: sub.all_gather(np.ones(2, np.float32 if sub.rank else np.int32))),
        ("trailing", lambda sub: sub.gather(np.ones((1, 2 + (sub.rank == 1)), np.float32))),
        ("op", lambda sub: sub.all_gather(np.ones(2)) if sub.rank else sub.gather(np.ones(2))),
    ):
        sub = comm.dup()
        try:
            fn(sub)
            outcomes.append(f"{name}: no error")
        except ringlet.MismatchError:
            pass
        except Exception as exc:  # reported back to the test
            outcomes.append(f"{name}: {type(exc).__name__}: {exc}")
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_eager_mismatch_is_an_error_on_every_rank(transport: str) -> None:
    env = {"RINGLET_TIMEOUT": "20"} | ({"RINGLET_TRANSPORT": "tcp"} if transport == "tcp" else {})
    for rank, bad in enumerate(spmd.run(_mismatched, 3, env=env, timeout=100)):
        assert not bad, f"rank {rank}: {bad}"

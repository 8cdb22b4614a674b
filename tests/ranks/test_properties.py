"""Property tests on real ranks: hypothesis draws shapes, uneven first dimensions and dtypes.

Spawning ranks is the slow part, so each hypothesis example is one job that runs a whole list of
drawn cases on 3 ranks and compares every result with NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spmd

N = 3
DTYPES = ["float32", "float64", "int16", "uint8", "int64", "bool"]

case = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "trailing": st.lists(st.integers(0, 4), max_size=3).map(tuple),
        "rows": st.lists(st.integers(0, 9), min_size=N, max_size=N),  # per rank: uneven
        "root": st.integers(0, N - 1),
        "transposed": st.booleans(),  # a non-contiguous view as input
    }
)


def _data(rank: int, rows: int, trailing: tuple[int, ...], dtype: str, salt: int) -> np.ndarray:
    rng = np.random.default_rng(salt * 31 + rank)
    return rng.integers(0, 100, (rows, *trailing)).astype(dtype)


def run_drawn(comm, cases: list[dict]) -> list[str]:  # type: ignore[no-untyped-def,type-arg]
    bad = []
    for i, c in enumerate(cases):
        tr, dt, rows = c["trailing"], c["dtype"], c["rows"]
        parts = [_data(r, rows[r], tr, dt, i) for r in range(N)]
        if c["transposed"] and parts[comm.rank].ndim == 2:
            mine = np.ascontiguousarray(parts[comm.rank].T).T  # same values, Fortran order
        else:
            mine = parts[comm.rank]
        if not np.array_equal(comm.all_gather(mine), np.concatenate(parts)):
            bad.append(f"all_gather {c}")
        got = comm.gather(mine, root=c["root"])
        if comm.rank == c["root"] and not np.array_equal(got, np.concatenate(parts)):
            bad.append(f"gather {c}")
        same = [_data(r, rows[0], tr, dt, i) for r in range(N)]  # equal shapes for reductions
        x = same[comm.rank].copy()
        op = "bor" if dt == "bool" else "max"
        comm.all_reduce(x, op=op)
        want = same[0]
        for s in same[1:]:
            want = np.maximum(want, s) if op == "max" else (want | s)
        if not np.array_equal(x, want):
            bad.append(f"all_reduce {c}")
        b = same[comm.rank].copy()
        comm.broadcast(b, root=c["root"])
        if not np.array_equal(b, same[c["root"]]):
            bad.append(f"broadcast {c}")
    return bad


@pytest.mark.parametrize("transport", ["tcp", "auto"])
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(case, min_size=1, max_size=12))
def test_drawn_shapes_and_uneven_sizes(transport: str, cases: list[dict]) -> None:  # type: ignore[type-arg]
    results = spmd.run(run_drawn, N, cases, env={"RINGLET_TRANSPORT": transport}, timeout=120)
    assert results == [[]] * N, results


message = st.tuples(st.integers(0, 3), st.integers(0, 40), st.sampled_from(DTYPES))


def run_tagged(comm, sent: list[tuple], order: list[int], into: list[bool]) -> list[str]:  # type: ignore[no-untyped-def,type-arg]
    """Rank 0 sends ``sent`` (tag, length, dtype) in order; rank 1 receives them by tag in the
    drawn ``order``: with one tag, messages must come in the order they were sent."""
    data = [(np.arange(n) + i).astype(dt) for i, (_, n, dt) in enumerate(sent)]
    if comm.rank == 0:
        for (tag, _, _), x in zip(sent, data, strict=True):
            comm.send(x, 1, tag=tag)
        return []
    queues: dict[int, list[np.ndarray]] = {}
    for (tag, _, _), x in zip(sent, data, strict=True):
        queues.setdefault(tag, []).append(x)
    bad = []
    for k, i in enumerate(order):
        tag = sent[i][0]
        want = queues[tag].pop(0)
        buf = np.empty_like(want) if into[k % len(into)] else None
        got = comm.recv(buf, 0, tag=tag)
        if got.dtype != want.dtype or not np.array_equal(got, want):
            bad.append(f"recv #{k} tag {tag}: {got} instead of {want}")
    return bad


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_drawn_tags_match_like_mpi(data: st.DataObject) -> None:
    sent = data.draw(st.lists(message, min_size=1, max_size=12))
    order = data.draw(st.permutations(range(len(sent))))
    into = data.draw(st.lists(st.booleans(), min_size=1, max_size=4))
    results = spmd.run(run_tagged, 2, sent, order, into, env={"RINGLET_TRANSPORT": "tcp"})
    assert results == [[], []], results

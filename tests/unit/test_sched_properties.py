"""Property tests: random world sizes, uneven (often zero) counts and roots, against NumPy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ringlet.schedules.select import ALGORITHMS
from ringlet.schedules.simulate import replay

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def world(draw: st.DrawFn, most: int = 12) -> tuple[int, list[int], int]:
    """(size, per-rank counts, root)."""
    size = draw(st.integers(1, most))
    counts = draw(st.lists(st.integers(0, 9), min_size=size, max_size=size))
    return size, counts, draw(st.integers(0, size - 1))


def data(counts: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-1000, 1000, c) for c in counts]


@SETTINGS
@given(world(), st.sampled_from(sorted(ALGORITHMS["all_gather"])))
def test_all_gather_uneven(w: tuple[int, list[int], int], algo: str) -> None:
    size, counts, _ = w
    xs = data(counts, size)
    for got in replay("all_gather", algo, size, xs, np.add, counts=counts):
        np.testing.assert_array_equal(got, np.concatenate(xs))


@SETTINGS
@given(world(), st.sampled_from(sorted(ALGORITHMS["gather"])))
def test_gather_uneven(w: tuple[int, list[int], int], algo: str) -> None:
    size, counts, root = w
    xs = data(counts, size)
    got = replay("gather", algo, size, xs, np.add, counts=counts, root=root)
    np.testing.assert_array_equal(got[root], np.concatenate(xs))


@SETTINGS
@given(world(), st.sampled_from(sorted(ALGORITHMS["scatter"])))
def test_scatter_uneven(w: tuple[int, list[int], int], algo: str) -> None:
    size, counts, root = w
    whole = np.concatenate(data(counts, size))
    xs = [whole if r == root else whole[:0] for r in range(size)]
    got = replay("scatter", algo, size, xs, np.add, counts=counts, root=root)
    for r, part in enumerate(np.split(whole, np.cumsum(counts)[:-1])):
        np.testing.assert_array_equal(got[r], part)


@SETTINGS
@given(world(), st.sampled_from(sorted(ALGORITHMS["reduce_scatter"])))
def test_reduce_scatter_uneven(w: tuple[int, list[int], int], algo: str) -> None:
    size, counts, _ = w
    xs = data([sum(counts)] * size, size)
    got = replay("reduce_scatter", algo, size, xs, np.bitwise_xor, counts=counts)
    want = np.bitwise_xor.reduce(np.array(xs).reshape(size, -1), axis=0)
    for r, part in enumerate(np.split(want, np.cumsum(counts)[:-1])):
        np.testing.assert_array_equal(got[r], part)


@SETTINGS
@given(
    st.integers(1, 10).flatmap(
        lambda p: st.lists(
            st.lists(st.integers(0, 6), min_size=p, max_size=p), min_size=p, max_size=p
        )
    )
)
def test_all_to_all_uneven(matrix: list[list[int]]) -> None:
    size = len(matrix)
    rng = np.random.default_rng(size)
    parts = [[rng.integers(-99, 99, n) for n in row] for row in matrix]
    xs = [np.concatenate(row) for row in parts]
    got = replay("all_to_all", "pairwise", size, xs, np.add, matrix=matrix)
    for r in range(size):
        np.testing.assert_array_equal(got[r], np.concatenate([parts[i][r] for i in range(size)]))


@SETTINGS
@given(
    world(most=20),
    st.integers(0, 50),
    st.sampled_from(
        [(op, a) for op in ("all_reduce", "reduce", "broadcast") for a in ALGORITHMS[op]]
    ),
)
def test_vector_ops_any_size(
    w: tuple[int, list[int], int], count: int, case: tuple[str, str]
) -> None:
    size, _, root = w
    op, algo = case
    xs = data([count] * size, count)
    kw = {"count": count} | ({} if op == "all_reduce" else {"root": root})
    got = replay(op, algo, size, xs, np.add, **kw)
    want = xs[root] if op == "broadcast" else np.sum(xs, axis=0)
    for r in range(size) if op != "reduce" else [root]:
        np.testing.assert_array_equal(got[r], want)

"""Every algorithm's schedules, replayed on NumPy for all ranks, against independent references.

No processes: `replay` validates the schedules (sends meet receives, same round numbers, no
round receiving into what it sends), runs them on garbage-initialised scratch and returns each
rank's result region, which must equal the NumPy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ringlet.schedules.select import ALGORITHMS, build
from ringlet.schedules.simulate import Enter, Transfer, events, replay

SIZES = [1, 2, 3, 4, 5, 7, 8, 16]


def counts_for(size: int) -> list[int]:
    return sorted({0, 1, 2, 3, max(size - 1, 0), size + 1, 17, 1000})


def roots_for(size: int) -> list[int]:
    return sorted({0, size // 2, size - 1})


def uneven(c: int, size: int, rng: np.random.Generator) -> list[int]:
    """Per-rank counts around ``c``, zeros included; the first rank has exactly ``c``."""
    return [c] + [int(x) for x in rng.integers(0, c + 2, size - 1)]


def ints(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-(2**40), 2**40, n, dtype=np.int64)


def blocks(whole: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(whole, np.cumsum(counts)[:-1])


def cases(ops: list[str]) -> list[Any]:
    return [
        pytest.param(op, algo, size, id=f"{op}-{algo}-p{size}")
        for op in ops
        for algo in ALGORITHMS[op]
        for size in SIZES
    ]


@pytest.mark.parametrize(("op", "algo", "size"), cases(["all_reduce"]))
def test_all_reduce(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        xs = [ints(rng, c) for _ in range(size)]
        for reduce, want in (
            (np.add, np.sum(xs, axis=0)),
            (np.bitwise_xor, np.bitwise_xor.reduce(xs, axis=0)),
        ):
            got = replay(op, algo, size, xs, reduce, count=c)
            for r in range(size):
                np.testing.assert_array_equal(got[r], want, err_msg=f"count {c} rank {r}")


@pytest.mark.parametrize(("op", "algo", "size"), cases(["all_reduce"]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_reduce_floats_identical_on_every_rank(
    op: str, algo: str, size: int, dtype: Any
) -> None:
    rng = np.random.default_rng(size)
    for c in (17, 1000):
        xs = [rng.standard_normal(c).astype(dtype) for _ in range(size)]
        got = replay(op, algo, size, xs, np.add, count=c)
        np.testing.assert_allclose(
            got[0], np.sum(np.array(xs, np.float64), axis=0), rtol=1e-4, atol=1e-4
        )
        for r in range(1, size):
            assert got[r].tobytes() == got[0].tobytes(), f"rank {r} differs from rank 0 (count {c})"


@pytest.mark.parametrize(("op", "algo", "size"), cases(["broadcast", "reduce"]))
def test_broadcast_and_reduce(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        xs = [ints(rng, c) for _ in range(size)]
        for root in roots_for(size):
            got = replay(op, algo, size, xs, np.add, count=c, root=root)
            for r in range(size):
                if op == "broadcast":
                    np.testing.assert_array_equal(
                        got[r], xs[root], err_msg=f"c {c} root {root} rank {r}"
                    )
                elif r == root:
                    np.testing.assert_array_equal(
                        got[r], np.sum(xs, axis=0), err_msg=f"c {c} root {root}"
                    )


@pytest.mark.parametrize(("op", "algo", "size"), cases(["all_gather", "gather"]))
def test_gathers(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        for counts in ([c] * size, uneven(c, size, rng)):
            xs = [ints(rng, n) for n in counts]
            want = np.concatenate(xs)
            for root in roots_for(size) if op == "gather" else [None]:
                kw: dict[str, Any] = {"counts": counts} | ({} if root is None else {"root": root})
                got = replay(op, algo, size, xs, np.add, **kw)
                for r in range(size):
                    if root is None or r == root:
                        np.testing.assert_array_equal(
                            got[r], want, err_msg=f"{counts} {root} rank {r}"
                        )
                    else:
                        assert got[r].size == 0


@pytest.mark.parametrize(("op", "algo", "size"), cases(["scatter"]))
def test_scatter(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        for counts in ([c] * size, uneven(c, size, rng)):
            for root in roots_for(size):
                whole = ints(rng, sum(counts))
                xs = [whole if r == root else ints(rng, 0) for r in range(size)]
                got = replay(op, algo, size, xs, np.add, counts=counts, root=root)
                for r, want in enumerate(blocks(whole, counts)):
                    np.testing.assert_array_equal(
                        got[r], want, err_msg=f"{counts} root {root} rank {r}"
                    )


@pytest.mark.parametrize(("op", "algo", "size"), cases(["reduce_scatter"]))
def test_reduce_scatter(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        for counts in ([c] * size, uneven(c, size, rng)):
            xs = [ints(rng, sum(counts)) for _ in range(size)]
            got = replay(op, algo, size, xs, np.add, counts=counts)
            for r, want in enumerate(blocks(np.sum(xs, axis=0), counts)):
                np.testing.assert_array_equal(got[r], want, err_msg=f"{counts} rank {r}")


@pytest.mark.parametrize(("op", "algo", "size"), cases(["reduce_scatter"]))
def test_reduce_scatter_floats(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    counts = uneven(40, size, rng)
    xs = [rng.standard_normal(sum(counts)) for _ in range(size)]
    got = replay(op, algo, size, xs, np.add, counts=counts)
    for r, want in enumerate(blocks(np.sum(xs, axis=0), counts)):
        np.testing.assert_allclose(got[r], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("op", "algo", "size"), cases(["all_to_all"]))
def test_all_to_all(op: str, algo: str, size: int) -> None:
    rng = np.random.default_rng(size)
    for c in counts_for(size):
        for matrix in ([[c] * size] * size, rng.integers(0, c + 2, (size, size)).tolist()):
            parts = [[ints(rng, matrix[i][j]) for j in range(size)] for i in range(size)]
            xs = [np.concatenate(row) for row in parts]
            got = replay(op, algo, size, xs, np.add, matrix=matrix)
            for r in range(size):
                want = np.concatenate([parts[i][r] for i in range(size)])
                np.testing.assert_array_equal(got[r], want, err_msg=f"{matrix} rank {r}")


@pytest.mark.parametrize("size", SIZES)
def test_barrier_waits_for_everyone(size: int) -> None:
    """Every rank's last round starts only after news from every rank could reach it."""
    scheds = [build("barrier", "dissemination", r, size) for r in range(size)]
    heard = [{r} for r in range(size)]  # ranks whose arrival this rank knows of
    at_start: dict[tuple[int, int], set[int]] = {}
    for ev in events(scheds):
        if isinstance(ev, Enter):
            at_start[(ev.rank, ev.round)] = set(heard[ev.rank])
        elif isinstance(ev, Transfer):  # what the sender knew when its round began
            heard[ev.dst] |= at_start[(ev.src, ev.src_round)]
    assert all(h == set(range(size)) for h in heard)
    replay("barrier", "dissemination", size, [np.zeros(0, np.uint8)] * size, np.add)
    assert all(len(s.rounds) == (size - 1).bit_length() for s in scheds)


@pytest.mark.parametrize("op", ["broadcast", "reduce"])
@pytest.mark.parametrize("size", SIZES)
def test_chains_pipeline_many_chunks(op: str, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks, so a chain runs with up to 4p chunks in flight along it."""
    from ringlet.schedules import ring

    monkeypatch.setattr(ring, "CHAIN_MIN_CHUNK", 3)
    rng = np.random.default_rng(size)
    for c in (0, 1, 5, 100, 1001):
        xs = [ints(rng, c) for _ in range(size)]
        for root in roots_for(size):
            got = replay(op, "chain", size, xs, np.add, count=c, root=root)
            want = xs[root] if op == "broadcast" else np.sum(xs, axis=0)
            for r in range(size) if op == "broadcast" else [root]:
                np.testing.assert_array_equal(got[r], want, err_msg=f"c {c} root {root} rank {r}")
            for r in range(size):
                steps = len(build(op, "chain", r, size, count=c, root=root).rounds)
                assert steps <= max(1, min(c // 3, 4 * size)) + size - 2

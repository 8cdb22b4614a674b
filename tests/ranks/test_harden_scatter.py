"""scatter sends a root's list of arrays from the arrays themselves, never one concatenated copy.

Every rank builds the same cases (so each knows what the root sent) and checks its part against
NumPy: list and array inputs, several dtypes, uneven and empty blocks, trailing dimensions,
strided arrays, every root, with the default choice and with a schedule forced. The piece size is
lowered inside the ranks (all alike: the cut depends on it) so that lists move in several pieces,
ragged last pieces and blocks shorter than a piece at test sizes; one case is a real 20 MiB list
in 16 MiB pieces. Over TCP, shared memory and both at once (two simulated hosts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import spmd

DTYPES = ("float32", "float64", "int64", "uint8", "float16", "bfloat16")


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _block(r: int, rows: int, trailing: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    n = rows * int(np.prod(trailing, dtype=np.int64))
    return ((np.arange(n) * 7 + r * 13 + seed) % 101).astype(dtype).reshape(rows, *trailing)


def _cases(size: int) -> list[tuple[str, Any, list[np.ndarray]]]:
    """(name, what the root passes, the part each rank must get), the same on every rank."""
    cases: list[tuple[str, Any, list[np.ndarray]]] = []
    for k, name in enumerate(DTYPES):
        dt = _dtype(name)
        uneven = [_block(r, (r * 5 + k) % 7, (3,), dt, k) for r in range(size)]  # 0-row blocks too
        cases.append((f"list-{name}", uneven, uneven))
        flat = [_block(r, 1000 + 37 * r, (), dt, k).reshape(-1) for r in range(size)]
        cases.append((f"list1d-{name}", flat, flat))
        whole = _block(0, 4 * size, (5,), dt, k)
        cases.append((f"array-{name}", whole, np.split(whole, size)))
        strided = _block(1, 6 * size, (4, 2), dt, k)[:, ::2]  # not contiguous: parts staged
        cases.append((f"strided-{name}", strided, np.split(strided, size)))
    empty = [np.zeros((0, 2), np.float32) for _ in range(size)]
    cases.append(("all-empty", empty, empty))
    one = [_block(r, 300 if r == size - 1 else 0, (), np.dtype("int32"), 3) for r in range(size)]
    cases.append(("one-block", one, one))
    scalars = [np.array(r + 0.5) for r in range(size)]  # 0-d arrays: one row each
    cases.append(("scalars", scalars, [np.array([r + 0.5]) for r in range(size)]))
    return cases


def scatter_cases(comm, algos: tuple[str | None, ...]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import ringlet.blocks

    ringlet.blocks.PIECE_BYTES = 4096
    wrong: dict[str, Any] = {}
    for root in sorted({0, comm.size - 1}):
        for algo in algos:
            for name, given, want in _cases(comm.size):
                kept = [np.array(p, copy=True) for p in given] if isinstance(given, list) else None
                got = comm.scatter(given if comm.rank == root else None, root, algo=algo)
                mine = want[comm.rank]
                ok = got.dtype == mine.dtype and got.shape == mine.shape
                if not (ok and np.array_equal(got.view(np.uint8), mine.view(np.uint8))):
                    wrong[f"{name} root={root} algo={algo}"] = (got.shape, mine.shape)
                same = (
                    kept is None
                    or comm.rank != root
                    or all(np.array_equal(a, b) for a, b in zip(kept, given, strict=True))
                )
                if not same:
                    wrong[f"{name} root={root} algo={algo}: input changed"] = True
    return wrong


def large_list(comm) -> bool:  # type: ignore[no-untyped-def]
    """A 20 MiB list (uneven blocks) in pieces of the real size (16 MiB)."""
    n = 5 << 20  # float32 elements in all
    counts = [n // comm.size + (r % 2) * 1024 - (comm.size % 2) * 512 for r in range(comm.size)]
    counts[-1] = n - sum(counts[:-1])
    parts = [np.full(c, r + 1, np.float32) for r, c in enumerate(counts)]
    got = comm.scatter(parts if comm.rank == 0 else None)
    return bool(got.size == counts[comm.rank] and (got == comm.rank + 1).all())


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_scatter_lists_and_arrays_match_numpy(size: int, transport: str) -> None:
    algos = (None,) if size == 1 else (None, "tree", "linear")
    results = spmd.run(
        scatter_cases, size, algos, timeout=240, env={"RINGLET_TRANSPORT": transport}
    )
    for rank, wrong in enumerate(results):
        assert not wrong, f"rank {rank} over {transport}: {wrong}"


@pytest.mark.parametrize("layout", [(0, 0, 1, 1), (0, 1, 1)])
def test_scatter_lists_across_hosts_match_numpy(layout: tuple[int, ...]) -> None:
    results = spmd.run(
        scatter_cases, len(layout), (None, "linear"), timeout=240,
        per_rank_env=lambda r: {"RINGLET_HOST_ID": f"h{layout[r]}"},
    )  # fmt: skip
    for rank, wrong in enumerate(results):
        assert not wrong, f"rank {rank} on hosts {layout}: {wrong}"


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_large_list_is_scattered_in_real_pieces(transport: str) -> None:
    assert all(spmd.run(large_list, 3, timeout=120, env={"RINGLET_TRANSPORT": transport}))

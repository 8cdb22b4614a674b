"""Large reduce and reduce_scatter run in pieces (path.py), so their scratch stays bounded.

The piece size is lowered inside the ranks so that pieces, ragged last pieces and blocks shorter
than a piece happen at test sizes; results are checked against NumPy, inputs of non-roots must
come back unchanged, over TCP and over shared memory with an algorithm forced (the schedule path).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import spmd


def _data(rank: int, n: int, dtype: str) -> np.ndarray:
    return ((np.arange(n) * 7 + rank * 13) % 101).astype(dtype)


def in_pieces(comm, piece_bytes: int, n: int, dtype: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import ringlet.path

    ringlet.path.PIECE_BYTES = piece_bytes  # every rank alike: the cut depends on it
    out: dict[str, Any] = {}
    for root in (0, comm.size - 1):
        x = _data(comm.rank, n, dtype)
        kept = x.copy()
        comm.reduce(x, root, "sum")
        out[f"reduce{root}"] = x if comm.rank == root else bool((x == kept).all())
    x = _data(comm.rank, n * comm.size, dtype)
    kept = x.copy()
    out["reduce_scatter"] = comm.reduce_scatter(x, "sum")
    out["reduce_scatter_mean"] = comm.reduce_scatter(x.astype(np.float64), "mean")
    out["input_kept"] = bool((x == kept).all())
    return out


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_large_reductions_in_pieces_match_numpy(size: int, transport: str) -> None:
    n, dtype = 10_007, "float32"  # with 4 KiB pieces: 10 pieces of a reduce, ragged ones
    env = {"RINGLET_TRANSPORT": transport}
    if transport == "shm":
        env["RINGLET_ALGO"] = "reduce=ring,reduce_scatter=ring"  # the schedules, not the shm group
    results = spmd.run(in_pieces, size, 4096, n, dtype, timeout=90, env=env)
    whole = sum(_data(r, n, dtype).astype(np.float64) for r in range(size))
    scattered = sum(_data(r, n * size, dtype).astype(np.float64) for r in range(size))
    for rank, got in enumerate(results):
        for root in (0, size - 1):
            if rank == root:
                np.testing.assert_array_equal(got[f"reduce{root}"], whole.astype(dtype))
            else:
                assert got[f"reduce{root}"] is True, f"rank {rank}'s input changed"
        mine = scattered[rank * n : (rank + 1) * n]
        np.testing.assert_array_equal(got["reduce_scatter"], mine.astype(dtype))
        np.testing.assert_allclose(got["reduce_scatter_mean"], mine / size, rtol=1e-12)
        assert got["input_kept"], f"rank {rank}'s reduce_scatter input changed"


def test_a_reduce_scatter_whose_schedules_need_no_scratch_runs_whole() -> None:
    """The piece cut looks at every rank's schedule, so every rank makes the same choice: a
    2-rank ring folds the peer's half onto the input straight into the result and the ordered
    fold lands in the result too, so neither is cut (no staging copy of the input); a 3-rank
    ring keeps partial sums in scratch, and a large reduce always has a working copy."""
    from ringlet.path import PIECE_BYTES
    from ringlet.schedules.select import in_pieces

    big = PIECE_BYTES // 4 + 1  # float32 elements per rank, above a piece
    args = (PIECE_BYTES, None, 4)
    assert not in_pieces("reduce_scatter", "ring", 2, 8 * big, *args, counts=(big, big))
    assert not in_pieces("reduce_scatter", "ordered", 3, 12 * big, *args, counts=(big,) * 3)
    assert in_pieces("reduce_scatter", "ring", 3, 12 * big, *args, counts=(big,) * 3)
    assert in_pieces("reduce", "tree", 2, 8 * big, *args, count=2 * big, root=0)
    assert not in_pieces("reduce", "tree", 2, PIECE_BYTES, *args, count=PIECE_BYTES // 4, root=0)

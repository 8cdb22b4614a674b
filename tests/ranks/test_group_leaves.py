"""Large one-host broadcast, scatter and gather leave the shm group for a one-round schedule where
the host's ranks outnumber its cores and the shared-memory transport copies from the sender's
memory (select.GROUP_LEAVES): results equal NumPy's at the threshold, one element under it and
above it, every rank reaches the same verdict, and the recorder names the way each call went."""

from __future__ import annotations

import numpy as np
import pytest

import spmd
from ringlet.schedules.select import GROUP_LEAVES
from ringlet.transport.shm_wait import usable_cores

pytest.importorskip("ringlet.transport.shm")

LIMITS = sorted({limit for limit, _ in GROUP_LEAVES.values()})


def _large(comm) -> tuple[list[str], list[tuple[int, str]], bool, bool]:  # type: ignore[no-untyped-def]
    """Each op at three sizes around the threshold: what differs from NumPy, and each call's
    whole vector in bytes with the algorithm recorded for it."""
    n, me, bad, sizes = comm.size, comm.rank, [], []
    for nbytes in (LIMITS[0] - 8, LIMITS[0], LIMITS[-1] + (3 << 20)):
        count = nbytes // 8  # float64 elements of the whole vector
        b = np.full(count, me, np.float64)
        comm.broadcast(b, root=n - 1)
        bad += [] if (b == n - 1).all() else [f"broadcast {nbytes}"]
        rows = count // n
        sizes += [b.nbytes, rows * n * 8, (2 * rows * n + n * (n - 1)) * 4]
        full = np.arange(rows * n, dtype=np.float64).reshape(n, rows) + 0.5
        part = comm.scatter(full if me == 0 else None, root=0)
        bad += [] if np.array_equal(part, full[me : me + 1]) else [f"scatter {nbytes}"]
        mine = np.full((rows + me, 2), me, np.float32)  # uneven rows, trailing dims
        got = comm.gather(mine, root=n - 1)
        if me == n - 1:
            want = np.concatenate([np.full((rows + r, 2), r, np.float32) for r in range(n)])
            bad += [] if np.array_equal(got, want) else [f"gather {nbytes}"]
        else:
            bad += [] if got is None else [f"gather {nbytes} returned data on a non-root"]
    kinds = ("broadcast", "scatter", "gather")
    algos = [e.algorithm for e in comm._recorder.entries if e.call.kind in kinds]
    local = comm._path.routes.local
    mine = comm.size > usable_cores()  # what this rank alone would say
    return bad, list(zip(sizes, algos, strict=True)), local.direct and local.crowded, mine


@pytest.mark.parametrize(("n", "cma"), [(2, "1"), (3, "1"), (4, "1"), (3, "0")])
def test_large_broadcast_scatter_gather_leave_the_group(n: int, cma: str) -> None:
    """RINGLET_SHM_CMA=0 turns single copy off in the transport too: everything stays."""
    got = spmd.run(_large, n, timeout=180, env={"RINGLET_SHM_CMA": cma})
    assert len({leaves for _, _, leaves, _ in got}) == 1, "ranks disagree"
    for bad, algos, leaves, crowded in got:
        assert leaves == (crowded and cma == "1")
        assert not bad, bad
        # one entry per call, naming the way its data went; linear: every rank reads its part
        # from the root's memory (where the transport cannot, everything stays in the group)
        assert len(algos) == 9, algos
        kinds = ["broadcast", "scatter", "gather"] * 3
        for kind, (nbytes, algo) in zip(kinds, algos, strict=True):
            out = leaves and nbytes >= GROUP_LEAVES[kind][0]
            assert algo == "linear" if out else algo.startswith("shm_group/"), (nbytes, algo)

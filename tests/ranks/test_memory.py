"""Extra memory per rank of every collective stays a few pieces, whatever the message size.

Each rank traces its allocations (NumPy reports its buffers to tracemalloc) and, per op, takes
the peak during one call of ``MIB`` MiB minus what it held before and minus the result the call
must return. The bound is three pieces of path.PIECE_BYTES plus slack (a reduce_scatter stages a
piece of its input, its schedule's scratch and the previous piece while the next is cut), well
under the message itself; shared-memory segments are fixed at set-up and not counted here.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import spmd
from ringlet.calls import result_nbytes

MIB = 80
OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "reduce_scatter",
       "all_to_all")  # fmt: skip


def extra_per_op(comm, mib: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    n = mib * (1 << 20) // 4 // (comm.size * 4) * comm.size * 4  # splits evenly on any size here
    extra = {}
    for op in OPS:
        getattr(comm, op)(np.ones(comm.size * 64, np.float32))  # connections, schedules: not counted
        x = np.full(n, comm.rank + 1, np.float32)
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        if op == "scatter":
            out = comm.scatter(x if comm.rank == 0 else None)
        elif op in ("reduce", "broadcast", "gather"):
            out = getattr(comm, op)(x, 0)
        else:
            out = getattr(comm, op)(x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        extra[op] = (peak - before - result_nbytes(op, x.nbytes, comm.rank, comm.size)) / (1 << 20)
        del out, x
    return extra


@pytest.mark.parametrize(("size", "transport"), [(2, "tcp"), (2, "shm"), (3, "tcp")])
def test_every_collective_allocates_a_few_pieces_not_the_message(size: int, transport: str) -> None:
    from ringlet.path import PIECE_BYTES

    bound = 3 * PIECE_BYTES / (1 << 20) + 4
    assert bound < MIB, "the test must be able to tell a bounded call from a whole-message copy"
    results: list[dict[str, Any]] = spmd.run(
        extra_per_op, size, MIB, timeout=180, env={"RINGLET_TRANSPORT": transport}
    )
    for rank, extra in enumerate(results):
        over = {op: round(mib, 1) for op, mib in extra.items() if mib > bound}
        assert not over, f"rank {rank} over {bound:.0f} MiB for {MIB} MiB calls: {over}"
    worst = {op: round(max(r[op] for r in results), 1) for op in OPS}
    print(f"{size} ranks over {transport}: extra MiB per op {worst}")

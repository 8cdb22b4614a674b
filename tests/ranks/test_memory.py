"""Extra memory per rank of every collective stays a few pieces, whatever the message size.

On 2 to 4 ranks over TCP, over shared memory and over both at once (two simulated hosts of two
ranks: shm inside a host, TCP between them); scatter both from one array and from a root's list
of one array per rank (sent a piece at a time, never concatenated).

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
OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "scatter_list",
       "reduce_scatter", "all_to_all")  # fmt: skip
#: (ranks, transport) of every case; "shm+tcp" puts ranks 0-1 and 2-3 on two simulated hosts.
LAYOUTS = [(2, "tcp"), (2, "shm"), (3, "tcp"), (4, "tcp"), (4, "shm"), (4, "shm+tcp")]


def extra_per_op(comm, mib: int) -> tuple[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    n = mib * (1 << 20) // 4 // (comm.size * 4) * comm.size * 4  # splits evenly on any size here
    extra = {}
    for op in OPS:  # a small call first: connections, schedules, not counted
        getattr(comm, op.removesuffix("_list"))(np.ones(comm.size * 64, np.float32))
        x = np.full(n, comm.rank + 1, np.float32)
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        if op == "scatter":
            out = comm.scatter(x if comm.rank == 0 else None)
        elif op == "scatter_list":  # views of x: only what ringlet allocates is counted
            out = comm.scatter(list(np.split(x, comm.size)) if comm.rank == 0 else None)
        elif op in ("reduce", "broadcast", "gather"):
            out = getattr(comm, op)(x, 0)
        else:
            out = getattr(comm, op)(x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result = result_nbytes(op.removesuffix("_list"), x.nbytes, comm.rank, comm.size)
        extra[op] = (peak - before - result) / (1 << 20)
        del out, x
    return comm.transport, extra


@pytest.mark.parametrize(("size", "transport"), LAYOUTS)
def test_every_collective_allocates_a_few_pieces_not_the_message(size: int, transport: str) -> None:
    from ringlet.path import PIECE_BYTES

    bound = 3 * PIECE_BYTES / (1 << 20) + 4
    assert bound < MIB, "the test must be able to tell a bounded call from a whole-message copy"
    where: dict[str, Any] = {"env": {"RINGLET_TRANSPORT": transport}}
    if transport == "shm+tcp":
        where = {"per_rank_env": lambda r: {"RINGLET_HOST_ID": f"h{2 * r // size}"}}
    seen: list[tuple[str, dict[str, float]]] = spmd.run(
        extra_per_op, size, MIB, timeout=240, **where
    )
    assert {t for t, _ in seen} == {transport}
    results = [extra for _, extra in seen]
    for rank, extra in enumerate(results):
        over = {op: round(mib, 1) for op, mib in extra.items() if mib > bound}
        assert not over, f"rank {rank} over {bound:.0f} MiB for {MIB} MiB calls: {over}"
    worst = {op: round(max(r[op] for r in results), 1) for op in OPS}
    print(f"{size} ranks over {transport}: extra MiB per op {worst}")

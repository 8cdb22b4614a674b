"""Flat algorithms: root talks to every other rank in one step.

One step of latency, but root's link carries everything; good for few ranks or when root
must touch every byte anyway (gather / scatter of large blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Copy, Recv, Round, Schedule, Send, offsets, timeline


def linear_broadcast(rank: int, size: int, count: int, root: int) -> Schedule:
    """Root sends ``out`` to every other rank at once.

    Steps: 1. Sent: (p-1)·n elements by root, none by the others.
    """
    if rank == root:  # one message to each rank, all in flight together
        rnd = Round(sends=tuple(Send(r, 0, count) for r in range(size) if r != root))
    else:
        rnd = Round(recvs=(Recv(root, 0, count),))
    return timeline([rnd], "linear_broadcast")


def linear_gather(rank: int, size: int, counts: Sequence[int], root: int) -> Schedule:
    """Every rank sends its block from ``in`` to root, which receives them all into place.

    Steps: 1. Sent per rank: its own block; root receives n - n_root. Non-root ranks touch no
    ``out`` or ``tmp``.
    """
    block = offsets(counts)
    if rank != root:  # straight from the caller's buffer
        return timeline([Round(sends=(Send(root, 0, counts[rank], "in"),))], "linear_gather")
    own = Copy(0, block[root][0], counts[root], "in", "out")
    others = tuple(Recv(r, *block[r]) for r in range(size) if r != root)  # each block into place
    return timeline([Round(recvs=others, copies=(own,))], "linear_gather")


def direct_all_gather(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Copy own block into place, then one round: this block to every rank, every other block
    from its rank straight into place.

    Steps: 1. Sent per rank: (p-1)·n_r elements (p-1 times a ring's), so it suits one host,
    where every pair has its own mailbox and a large block is one kernel copy from its owner.
    """
    block = offsets(counts)
    peers = [q for q in range(size) if q != rank]
    own = Copy(0, block[rank][0], counts[rank], "in", "out")
    sends = tuple(Send(q, 0, counts[rank], "in") for q in peers)
    recvs = tuple(Recv(q, *block[q]) for q in peers)
    return timeline([Round(sends, recvs, (own,))], "direct_all_gather")


def linear_scatter(rank: int, size: int, counts: Sequence[int], root: int) -> Schedule:
    """Root sends each rank its part straight from ``in``; others receive into ``out``.

    Steps: 1. Sent: n - n_root elements by root, none by the others.
    """
    block = offsets(counts)
    if rank != root:
        return timeline([Round(recvs=(Recv(root, 0, counts[rank]),))], "linear_scatter")
    own = Copy(block[root][0], 0, counts[root], "in", "out")
    parts = tuple(Send(r, *block[r], buf="in") for r in range(size) if r != root)
    return timeline([Round(sends=parts, copies=(own,))], "linear_scatter")

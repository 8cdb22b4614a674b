"""Deterministic reductions: every element is folded once, by one rank, strictly in rank order.

The owner of a piece receives every other rank's copy of it in one ordered round and folds them
with its own as ``((x_0 op x_1) op x_2) … op x_{p-1}``, the left fold ``functools.reduce``
gives, whatever the arrival order, transport or message size; finished pieces are then only
copied. Bytes sent are the bandwidth optimum, in one or two steps of p-1 concurrent messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Buf, Copy, Recv, Round, Schedule, Send, even_chunks, offsets, timeline


def direct_fold_round(
    rank: int, size: int, piece: Sequence[tuple[int, int]], into: tuple[int, int], buf: Buf
) -> Round:
    """One ordered round: ``piece[c]`` of ``buf`` goes to its owner c, who folds them all into
    its own ``into`` range of ``out`` in rank order."""
    others = [r for r in range(size) if r != rank]
    return Round(
        tuple(Send(c, *piece[c], buf=buf, fold=True) for c in others),
        tuple(Recv(r, *into, reduce=True) for r in others),  # everyone's copy of our piece
        ordered=True,
    )


def direct_all_reduce(rank: int, size: int, count: int) -> Schedule:
    """Every rank sends its whole vector to every other and folds all p in rank order.

    Steps: 1 (the latency optimum; one host's shared memory does it without a copy per peer).
    Sent per rank: (p-1)·n elements. A send may not read what the round folds into, so the
    vector is first copied to ``tmp``.
    """
    others = [r for r in range(size) if r != rank]
    rnd = Round(
        tuple(Send(r, 0, count, "tmp", fold=True) for r in others),
        tuple(Recv(r, 0, count, reduce=True) for r in others),
        (Copy(0, 0, count, "out", "tmp"),),
        ordered=True,
    )
    return timeline([rnd], "direct_all_reduce")


def direct_reduce(rank: int, size: int, count: int, root: int) -> Schedule:
    """Every rank sends its vector to root, which folds all p in rank order.

    Steps: 1. Sent per rank: n (root: none); root receives (p-1)·n. ``out`` is untouched off
    root.
    """
    if rank != root:
        return timeline([Round(sends=(Send(root, 0, count, fold=True),))], "direct_reduce")
    others = tuple(Recv(r, 0, count, reduce=True) for r in range(size) if r != root)
    return timeline([Round(recvs=others, ordered=True)], "direct_reduce")


def ordered_all_reduce(rank: int, size: int, count: int) -> Schedule:
    """Direct reduce-scatter (rank c folds chunk c in rank order), then a direct all-gather.

    Steps: 2. Sent per rank: 2(p-1)/p·n elements, in p-1 concurrent messages per step.
    """
    chunk = even_chunks(count, size)
    others = [r for r in range(size) if r != rank]
    rounds = [
        direct_fold_round(rank, size, chunk, chunk[rank], "out"),  # our chunk, folded in order
        Round(
            tuple(Send(r, *chunk[rank]) for r in others),  # the finished chunk to every rank
            tuple(Recv(r, *chunk[r]) for r in others),
        ),
    ]
    return timeline(rounds, "ordered_all_reduce")


def ordered_reduce(rank: int, size: int, count: int, root: int) -> Schedule:
    """Direct reduce-scatter folded in rank order by each chunk's owner, then a gather at root.

    Steps: 2. Sent per rank: 2(p-1)/p·n at most; root receives 2(p-1)/p·n. ``out`` is scratch
    off root.
    """
    chunk = even_chunks(count, size)
    rounds = [direct_fold_round(rank, size, chunk, chunk[rank], "out")]
    if rank != root:  # hand the finished chunk to root
        rounds.append(Round(sends=(Send(root, *chunk[rank]),)))
    else:
        rounds.append(Round(recvs=tuple(Recv(r, *chunk[r]) for r in range(size) if r != root)))
    return timeline(rounds, "ordered_reduce")


def ordered_reduce_scatter(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Own block of ``in`` into ``out``, then every rank's copy of it, folded in rank order.

    Steps: 1. Sent per rank: n - n_r elements (each block straight to its owner).
    """
    block = offsets(counts)
    own = Copy(block[rank][0], 0, counts[rank], "in", "out")
    fold = direct_fold_round(rank, size, block, (0, counts[rank]), "in")
    return timeline([Round(fold.sends, fold.recvs, (own,), ordered=True)], "ordered_reduce_scatter")

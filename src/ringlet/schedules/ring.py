"""Ring algorithms: each rank talks only to its neighbours, each step moves 1/p of the data.

Bandwidth-optimal for large messages (each rank sends about (p-1)/p of the vector per phase);
latency grows linearly with p, so small messages go to the doubling and tree algorithms.
Each chunk is reduced along one path around the ring and then copied, so every rank gets the
same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    Buf,
    Copy,
    Recv,
    Round,
    Schedule,
    Send,
    even_chunks,
    first_copies,
    offsets,
    timeline,
)
from .groups import lift, spans
from .tree import binomial_scatter_rounds


def _ring_span(size: int, count: int) -> int:
    """Rounds of ring_all_reduce's longest member: 2(p-1) once any element moves."""
    return 2 * (size - 1) if count > 0 else 0


def _blocks_span(size: int, counts: Sequence[int]) -> int:
    """Rounds of the longest member of the ring all-gather / reduce-scatter: p-1 once any
    block is non-empty (one rank then talks in the last round), one copy round alone."""
    return (size - 1 if size > 1 else 1) if sum(counts) > 0 else 0


def _chain_span(size: int, count: int, root: int) -> int:
    """Rounds of a chain's longest member: k + p - 2 (its far end's last chunk)."""
    return len(_chain_chunks(count, size)) + size - 2 if count > 0 and size > 1 else 0


def ring_reduce_scatter_rounds(
    rank: int, size: int, chunk: Sequence[tuple[int, int]], buf: Buf = "out"
) -> list[Round]:
    """p-1 steps after which rank r holds the reduction of ``chunk[(r + 1) % p]`` in ``buf``."""
    right, left = (rank + 1) % size, (rank - 1) % size
    rounds: list[Round] = []
    for s in range(size - 1):
        give, take = chunk[(rank - s) % size], chunk[(rank - s - 1) % size]
        rounds.append(
            Round(
                (Send(right, *give, buf=buf, fold=True),),  # our partial sum goes right
                (Recv(left, *take, reduce=True, buf=buf),),  # the left one's, folded into ours
            )
        )
    return rounds


def ring_all_gather_rounds(
    rank: int, size: int, chunk: Sequence[tuple[int, int]], buf: Buf = "out", shift: int = 0
) -> list[Round]:
    """p-1 steps passing finished chunks right; rank r starts with ``chunk[(r + shift) % p]``."""
    right, left = (rank + 1) % size, (rank - 1) % size
    return [
        Round(
            (Send(right, *chunk[(rank + shift - s) % size], buf=buf),),
            (Recv(left, *chunk[(rank + shift - s - 1) % size], buf=buf),),
        )
        for s in range(size - 1)  # forward the chunk that arrived last step
    ]


@spans(_ring_span)
def ring_all_reduce(rank: int, size: int, count: int) -> Schedule:
    """Reduce-scatter then all-gather around the ring, on ``out``.

    Steps: 2(p-1). Sent per rank: 2(p-1)/p·n elements (the bandwidth optimum).
    """
    chunk = even_chunks(count, size)
    rounds = ring_reduce_scatter_rounds(rank, size, chunk)  # rank r ends with chunk r+1 reduced
    rounds += ring_all_gather_rounds(rank, size, chunk, shift=1)  # circulate the finished chunks
    return timeline(rounds, "ring_all_reduce")


@spans(_blocks_span)
def ring_all_gather(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Copy own block into place, then pass blocks right p-1 times.

    Steps: p-1. Sent per rank: the n - n_r elements of the other blocks (n = sum of counts).
    """
    return ring_all_gather_along(tuple(range(size)), rank, counts)


def ring_all_gather_along(ring: tuple[int, ...], rank: int, counts: Sequence[int]) -> Schedule:
    """:func:`ring_all_gather` around the ranks in the order ``ring``; blocks stay in rank
    order in ``out``."""
    size, block = len(ring), offsets(counts)
    rounds = ring_all_gather_rounds(ring.index(rank), size, [block[q] for q in ring])
    own = Copy(0, block[rank][0], counts[rank], "in", "out")  # own block into its place first
    return timeline(first_copies(lift(rounds, ring, {}), own), "ring_all_gather")


@spans(_blocks_span)
def ring_reduce_scatter(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Ring reduce-scatter straight from ``in``: each partial sum lands in ``tmp`` folded onto
    this rank's own input, the last one in ``out``; no working copy of the input is made.

    Steps: p-1. Sent per rank: n - n_r elements (about (p-1)/p·n).
    """
    return ring_reduce_scatter_along(tuple(range(size)), rank, counts)


def ring_reduce_scatter_along(ring: tuple[int, ...], rank: int, counts: Sequence[int]) -> Schedule:
    """:func:`ring_reduce_scatter` around the ranks in the order ``ring``."""
    size, i, block = len(ring), ring.index(rank), offsets(counts)
    lo, hi = block[rank]
    if size == 1:
        return timeline([Round(copies=(Copy(lo, 0, hi - lo, "in", "out"),))], "ring_reduce_scatter")
    # Position j finishes with chunk j + 1: shift by one so each rank ends with its own block.
    chunk = [block[ring[(j - 1) % size]] for j in range(size)]
    right, left = ring[(i + 1) % size], ring[(i - 1) % size]
    rounds = []
    for s in range(size - 1):  # step 0 passes this rank's own input on, later ones a partial sum
        give, (a, b) = chunk[(i - s) % size], chunk[(i - s - 1) % size]
        into: tuple[int, int, Buf] = (0, hi - lo, "out") if s == size - 2 else (a, b, "tmp")
        rounds.append(
            Round(
                (Send(right, *give, buf="tmp" if s else "in", fold=True),),
                (Recv(left, into[0], into[1], reduce=True, buf=into[2], onto=("in", a)),),
            )
        )
    return timeline(rounds, "ring_reduce_scatter")


def ring_reduce(rank: int, size: int, count: int, root: int) -> Schedule:
    """Ring reduce-scatter on ``out``, then every rank sends its finished chunk to root.

    Steps: p. Sent per rank: about n elements; root receives about 2(p-1)/p·n.
    """
    chunk = even_chunks(count, size)
    rounds = ring_reduce_scatter_rounds(rank, size, chunk)  # rank r ends with chunk r+1 reduced
    mine = chunk[(rank + 1) % size]
    if rank != root:  # hand the finished chunk to root
        rounds.append(Round(sends=(Send(root, *mine),)))
    else:
        others = [r for r in range(size) if r != root]
        rounds.append(Round(recvs=tuple(Recv(r, *chunk[(r + 1) % size]) for r in others)))
    return timeline(rounds, "ring_reduce")


def scatter_ring_broadcast(rank: int, size: int, count: int, root: int) -> Schedule:
    """Van de Geijn: binomial scatter of p chunks from root, then a ring all-gather, on ``out``.

    Chunk w belongs to virtual rank w = (rank - root) mod p, so subtrees own contiguous ranges.
    Steps: ceil(log2 p) + p-1. Sent per rank: about (p-1)/p·n in the ring plus its children's
    subtree chunks (root: 2(p-1)/p·n in all), versus ceil(log2 p)·n from a tree's root.
    """
    chunk = even_chunks(count, size)
    pos = [lo for lo, _ in chunk] + [count]
    rounds = binomial_scatter_rounds(rank, size, root, pos, 0, "out")  # v ends with chunk v
    by_rank = [chunk[(r - root) % size] for r in range(size)]
    rounds += ring_all_gather_rounds(rank, size, by_rank)  # circulate every chunk
    return timeline(rounds, "scatter_ring_broadcast")


#: A pipelined chain cuts the vector into at most CHAIN_CHUNKS_PER_RANK · p chunks of at least
#: CHAIN_MIN_CHUNK elements: enough chunks that the pipeline fills fast, few enough that the
#: per-round cost stays small next to a chunk's transfer.
CHAIN_MIN_CHUNK = 1 << 17
CHAIN_CHUNKS_PER_RANK = 4


def _chain_chunks(count: int, size: int) -> list[tuple[int, int]]:
    return even_chunks(count, max(1, min(count // CHAIN_MIN_CHUNK, CHAIN_CHUNKS_PER_RANK * size)))


@spans(_chain_span)
def chain_broadcast(rank: int, size: int, count: int, root: int) -> Schedule:
    """Pipelined chain root → root+1 → …: a rank forwards chunk c while it receives chunk c+1.

    Steps: k + p - 2 for k chunks. Sent per rank: n (the chain's last rank: none), so every link
    carries the vector once and a broadcast takes about (1 + (p-2)/k)·n transfer times, where a
    tree's root sends ceil(log2 p)·n and scatter + ring about 2(p-1)/p·n.
    """
    chunks = _chain_chunks(count, size)
    k, j = len(chunks), (rank - root) % size  # j: place in the chain
    rounds = []
    for t in range(k + size - 2):
        c_out, c_in = t - j, t - j + 1  # the chunk this rank forwards / receives in round t
        sends = (
            (Send((rank + 1) % size, *chunks[c_out]),) if j < size - 1 and 0 <= c_out < k else ()
        )
        recvs = (Recv((rank - 1) % size, *chunks[c_in]),) if j >= 1 and 0 <= c_in < k else ()
        rounds.append(Round(sends=sends, recvs=recvs))
    return timeline(rounds, "chain_broadcast")


@spans(_chain_span)
def chain_reduce(rank: int, size: int, count: int, root: int) -> Schedule:
    """Pipelined chain root-1 → root-2 → … → root, reversed: a rank folds chunk c arriving from
    the rank behind it into its own and passes it on while chunk c+1 arrives.

    Steps: k + p - 2 for k chunks. Sent per rank: n (root: none); root receives n. Every chunk
    ends as x_r ⊕ (x_{r+1} ⊕ (… ⊕ x_{r-1})) for root r, ranks mod p (the same order on every
    run); ``out`` is scratch off root.
    """
    chunks = _chain_chunks(count, size)
    k, d = len(chunks), (root - 1 - rank) % size  # d: hops from the chain's start (root: p-1)
    rounds = []
    for t in range(k + size - 2):
        c_out, c_in = t - d, t - d + 1  # the chunk this rank passes on / folds in, in round t
        sends = (
            (Send((rank - 1) % size, *chunks[c_out], fold=True),)
            if d < size - 1 and 0 <= c_out < k
            else ()
        )
        recvs = (
            (Recv((rank + 1) % size, *chunks[c_in], reduce=True),)
            if d >= 1 and 0 <= c_in < k
            else ()
        )
        rounds.append(Round(sends=sends, recvs=recvs))
    return timeline(rounds, "chain_reduce")

"""Distance-doubling algorithms: log2 p steps, partners at distances 1, 2, 4, …

For all-reduce and reduce-scatter the partners of step j are ranks whose core indices differ in
bit j, which needs a power-of-two group. With p = p' + e (p' the largest power of two ≤ p), the
standard fix first folds ranks 2i into 2i+1 for i < e (one extra step), runs among the p'
core ranks, then hands the fold ranks their result (one more step). Bruck's all-gather and the
dissemination barrier use distances mod p and work for any p directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from .base import (
    Buf,
    Copy,
    Recv,
    Round,
    Schedule,
    Send,
    even_chunks,
    first_copies,
    last_copies,
    offsets,
    timeline,
)
from .groups import spans


def core_size(size: int) -> int:
    """The largest power of two ≤ ``size``: how many ranks take part in the doubling steps."""
    return 1 << (size.bit_length() - 1)


def core_index(rank: int, size: int) -> int:
    """This rank's index among the core ranks, or -1 for a rank that folds into rank+1."""
    extra = size - core_size(size)
    if rank < 2 * extra:
        return rank // 2 if rank % 2 else -1
    return rank - extra


def core_rank(index: int, size: int) -> int:
    """The rank of core index ``index`` (inverse of :func:`core_index`)."""
    extra = size - core_size(size)
    return 2 * index + 1 if index < extra else index + extra


def _fold_in(
    rank: int, size: int, sent: tuple[int, int, Buf], into: tuple[int, int, Buf]
) -> list[Round]:
    """The extra step (only if p is not a power of two): even ranks below 2e hand their data on."""
    extra = size - core_size(size)
    if not extra:
        return []
    if rank >= 2 * extra:
        return [Round()]
    if rank % 2 == 0:
        return [Round(sends=(Send(rank + 1, *sent, fold=True),))]
    return [Round(recvs=(Recv(rank - 1, into[0], into[1], reduce=True, buf=into[2]),))]


def _fold_out(
    rank: int, size: int, sent: tuple[int, int, Buf], into: tuple[int, int, Buf]
) -> list[Round]:
    """The last step (only if p is not a power of two): odd ranks below 2e return the result."""
    extra = size - core_size(size)
    if not extra:
        return []
    if rank >= 2 * extra:
        return [Round()]
    if rank % 2:
        return [Round(sends=(Send(rank - 1, *sent),))]
    return [Round(recvs=(Recv(rank + 1, into[0], into[1], buf=into[2]),))]


def halving_rounds(index: int, size: int, edge: Sequence[int], buf: Buf) -> list[Round]:
    """Recursive halving among core ranks: core i ends with ``buf[edge[i]:edge[i+1]]`` reduced.

    Step j pairs i with i ^ (p'/2^(j+1)); each keeps the half of the current window holding
    its own segment, sends the other half and reduces the partner's copy of its half.
    """
    rounds: list[Round] = []
    low, span = 0, core_size(size)
    while span > 1:
        half = span // 2
        peer = core_rank(index ^ half, size)
        keep, give = (low, low + half), (low + half, low + span)
        if index >= low + half:
            keep, give = give, keep
        rounds.append(
            Round(
                (Send(peer, edge[give[0]], edge[give[1]], buf, True),),  # the partner's half
                (Recv(peer, edge[keep[0]], edge[keep[1]], reduce=True, buf=buf),),  # fold in ours
            )
        )
        low, span = keep[0], half
    return rounds


def doubling_gather_rounds(index: int, size: int, edge: Sequence[int], buf: Buf) -> list[Round]:
    """Recursive doubling among core ranks: segments ``edge[i]:edge[i+1]`` spread to all of them.

    Step j pairs i with i ^ 2^j; each sends the 2^j segments it holds and receives the partner's.
    """
    rounds: list[Round] = []
    d = 1
    while d < core_size(size):
        mine, theirs = index & ~(d - 1), (index & ~(d - 1)) ^ d
        peer = core_rank(index ^ d, size)
        rounds.append(
            Round(
                (Send(peer, edge[mine], edge[mine + d], buf),),  # everything we hold so far
                (Recv(peer, edge[theirs], edge[theirs + d], buf=buf),),  # the partner's half
            )
        )
        d *= 2
    return rounds


def _steps(size: int) -> int:
    """log2 p': the doubling steps among the core ranks."""
    return core_size(size).bit_length() - 1


def _doubling_span(size: int, count: int) -> int:
    """Rounds of recursive doubling's longest member: log2 p' steps, +2 for the fold in and out
    when p is not a power of two, else +1 for the closing copy when the steps are odd."""
    if count <= 0:
        return 0
    steps = _steps(size)
    return steps + 2 if size != core_size(size) else steps + (steps & 1)


def _halving_doubling_span(size: int, count: int) -> int:
    """Rounds of halving-doubling's longest member: 2·log2 p' (+2 to fold when p is not a power of two)."""
    if count <= 0:
        return 0
    return 2 * _steps(size) + (2 if size != core_size(size) else 0)


@spans(_doubling_span)
def recursive_doubling_all_reduce(rank: int, size: int, count: int) -> Schedule:
    """Exchange whole vectors with partners at distance 1, 2, 4, … and reduce.

    Steps: log2 p' (+2 if p is not a power of two). Sent per rank: n·log2 p' elements.
    A step may not receive into what it sends, so the vector alternates between ``out`` and
    ``tmp`` (one local copy of n per step); partners compute a+b and b+a, which are equal.
    """
    index = core_index(rank, size)
    here: Buf = "out"
    rounds = _fold_in(rank, size, (0, count, "out"), (0, count, "out"))  # fold extras in
    for d in (1 << j for j in range(core_size(size).bit_length() - 1)):
        if index < 0:  # folded ranks wait
            rounds.append(Round())
            continue
        there: Buf = "tmp" if here == "out" else "out"
        peer = core_rank(index ^ d, size)
        rounds.append(  # ours to the partner, partner's folded into a copy of ours
            Round(
                (Send(peer, 0, count, here, fold=True),),
                (Recv(peer, 0, count, True, there),),
                (Copy(0, 0, count, here, there),),
            )
        )
        here = there
    tail = _fold_out(rank, size, (0, count, "out"), (0, count, "out"))  # return extras' result
    rounds += first_copies(tail, Copy(0, 0, count, "tmp", "out")) if here == "tmp" else tail
    return timeline(rounds, "recursive_doubling_all_reduce")


@spans(_halving_doubling_span)
def halving_doubling_all_reduce(rank: int, size: int, count: int) -> Schedule:
    """Rabenseifner: reduce-scatter by recursive halving, then all-gather by recursive doubling.

    Steps: 2·log2 p' (+2 if p is not a power of two). Sent per rank: 2(p'-1)/p'·n elements
    (the fold steps add n for the ranks involved).
    """
    index, steps = core_index(rank, size), core_size(size).bit_length() - 1
    edge = [lo for lo, _ in even_chunks(count, core_size(size))] + [count]
    rounds = _fold_in(rank, size, (0, count, "out"), (0, count, "out"))  # fold extras in
    if index < 0:  # folded ranks wait for the result
        rounds += [Round()] * (2 * steps)
    else:
        rounds += halving_rounds(index, size, edge, "out")  # core i owns segment i reduced
        rounds += doubling_gather_rounds(index, size, edge, "out")  # segments to every core rank
    rounds += _fold_out(rank, size, (0, count, "out"), (0, count, "out"))  # return extras' result
    return timeline(rounds, "halving_doubling_all_reduce")


def halving_reduce_scatter(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Recursive halving over ``tmp`` (a working copy of ``in``); uneven counts welcome.

    Core i's segment is the blocks of the ranks it stands for (2i and 2i+1 if folded).
    Steps: log2 p' (+2 if p is not a power of two). Sent per rank: about (p'-1)/p'·n elements.
    """
    index, steps = core_index(rank, size), core_size(size).bit_length() - 1
    block, total = offsets(counts), sum(counts)
    extra = size - core_size(size)  # core i < extra stands for ranks 2i and 2i+1
    first = [2 * i if i < extra else i + extra for i in range(core_size(size))]
    edge = [block[r][0] for r in first] + [total]
    rounds = _fold_in(rank, size, (0, total, "in"), (0, total, "tmp"))  # fold extras in
    if index < 0:  # folded ranks wait for their block
        rounds += [Round()] * steps
    else:
        rounds = first_copies(
            rounds + halving_rounds(index, size, edge, "tmp"), Copy(0, 0, total, "in", "tmp")
        )
    partner = block[rank - 1] if rank % 2 else (0, 0)  # the folded rank's block, if any
    tail = _fold_out(rank, size, (*partner, "tmp"), (0, counts[rank], "out"))
    if index >= 0:  # own reduced block into the result
        tail = first_copies(tail, Copy(block[rank][0], 0, counts[rank], "tmp", "out"))
    return timeline(rounds + tail, "halving_reduce_scatter")


def bruck_all_gather(rank: int, size: int, counts: Sequence[int]) -> Schedule:
    """Bruck: blocks kept in rotated order (own first); step j sends the first 2^j to rank-2^j.

    Any p. Steps: ceil(log2 p). Sent per rank: n - n_r elements, like the ring. Rank 0 works
    in ``out``; the others rotate from ``tmp`` into ``out`` with two copies at the end.
    """
    pos = list(accumulate((counts[(rank + i) % size] for i in range(size)), initial=0))
    buf: Buf = "out" if rank == 0 else "tmp"
    rounds: list[Round] = []
    d = 1
    while d < size:
        m = min(d, size - d)  # blocks that are new to the receiver
        rounds.append(
            Round(
                (Send((rank - d) % size, 0, pos[m], buf),),  # our first m blocks
                (Recv((rank + d) % size, pos[d], pos[d + m], buf=buf),),  # the next m after ours
            )
        )
        d *= 2
    rounds = first_copies(rounds, Copy(0, 0, counts[rank], "in", buf))  # own block first
    if rank:  # rotate: blocks of ranks rank..p-1, then 0..rank-1
        before, wrap = sum(counts[:rank]), pos[size - rank]
        rounds = last_copies(
            rounds, Copy(0, before, wrap, "tmp", "out"), Copy(wrap, 0, before, "tmp", "out")
        )
    return timeline(rounds, "bruck_all_gather")


def dissemination_barrier(rank: int, size: int) -> Schedule:
    """Step j: signal rank+2^j, wait for rank-2^j. After ceil(log2 p) steps all have arrived.

    One element per message on ``tmp`` (sent from tmp[0], received into tmp[1]).
    """
    rounds: list[Round] = []
    d = 1
    while d < size:
        rounds.append(
            Round(
                (Send((rank + d) % size, 0, 1, "tmp"),),  # we (and who we heard) are in
                (Recv((rank - d) % size, 1, 2, buf="tmp"),),
            )
        )  # news from 2^j behind
        d *= 2
    return timeline(rounds, "dissemination_barrier")

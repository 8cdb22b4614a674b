"""Binomial trees over virtual ranks v = (rank - root) mod p: ceil(log2 p) steps.

Virtual rank v's subtree is the contiguous range [v, v + lowbit(v)) (the whole range for the
root), so gather and scatter keep subtree blocks contiguous in virtual-rank order, each rank
holding its subtree at the start of its own buffer; root converts between virtual and absolute
order with two copies. Step t pairs v with v ± 2^t (reduce, gather: leaves first) or
v ± 2^(K-1-t) (broadcast, scatter: largest subtree first).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from .base import Buf, Copy, Recv, Round, Schedule, Send, first_copies, last_copies, timeline


def depth(size: int) -> int:
    """Steps of a binomial tree over ``size`` ranks: ceil(log2 size)."""
    return (size - 1).bit_length()


def subtree_end(v: int, size: int) -> int:
    """One past the last virtual rank of v's subtree."""
    return size if v == 0 else min(v + (v & -v), size)


def _virtual_positions(counts: Sequence[int], root: int) -> list[int]:
    """Start of each virtual rank's block when blocks are laid out in virtual order (+ the end)."""
    size = len(counts)
    return list(accumulate((counts[(w + root) % size] for w in range(size)), initial=0))


def _to_absolute(
    counts: Sequence[int], root: int, pos: Sequence[int], into_out: bool
) -> list[Copy]:
    """Two copies between virtual order in ``tmp`` and absolute order in ``out`` / from ``in``."""
    size, before_root = len(counts), sum(counts[:root])
    wrap = pos[size - root]  # where the virtual blocks of ranks root..p-1 end
    if into_out:
        return [Copy(0, before_root, wrap, "tmp", "out"), Copy(wrap, 0, before_root, "tmp", "out")]
    return [Copy(before_root, 0, wrap, "in", "tmp"), Copy(0, wrap, before_root, "in", "tmp")]


def binomial_broadcast(rank: int, size: int, count: int, root: int) -> Schedule:
    """Receive ``out`` from the parent, then send it to each child, largest subtree first.

    Steps: ceil(log2 p). Sent per rank: n elements per child (root: ceil(log2 p)·n).
    """
    v, k = (rank - root) % size, depth(size)
    rounds: list[Round] = []
    for t in range(k):
        d = 1 << (k - 1 - t)
        if v % (2 * d) == 0 and v + d < size:  # we have the data: hand it to the child at v+d
            rounds.append(Round(sends=(Send((rank + d) % size, 0, count),)))
        elif v % (2 * d) == d:  # our parent at v-d has it now
            rounds.append(Round(recvs=(Recv((rank - d) % size, 0, count),)))
        else:
            rounds.append(Round())
    return timeline(rounds, "binomial_broadcast")


def binomial_reduce(rank: int, size: int, count: int, root: int) -> Schedule:
    """Fold in each child's subtree sum, smallest first, then send ours to the parent.

    Steps: ceil(log2 p). Sent per rank: n elements (root: none); out is scratch off root.
    """
    v, k = (rank - root) % size, depth(size)
    rounds: list[Round] = []
    for t in range(k):
        d = 1 << t
        if v % (2 * d) == d:  # our subtree is complete: send its sum up
            rounds.append(Round(sends=(Send((rank - d) % size, 0, count, fold=True),)))
        elif v % (2 * d) == 0 and v + d < size:  # add the child's subtree sum into ours
            rounds.append(Round(recvs=(Recv((rank + d) % size, 0, count, reduce=True),)))
        else:
            rounds.append(Round())
    return timeline(rounds, "binomial_reduce")


def binomial_gather(rank: int, size: int, counts: Sequence[int], root: int) -> Schedule:
    """Collect subtree blocks (virtual order) from children, leaves first, and pass them up.

    Steps: ceil(log2 p). Sent per rank: its subtree's blocks (up to about n/2 elements).
    Leaves send straight from ``in``; root 0 collects straight into ``out``.
    """
    v, k, pos = (rank - root) % size, depth(size), _virtual_positions(counts, root)
    end = subtree_end(v, size)
    leaf = end == v + 1 and v != 0
    buf: Buf = "in" if leaf else "out" if root == 0 else "tmp"
    rounds: list[Round] = []
    for t in range(k):
        d = 1 << t
        if v % (2 * d) == d:  # subtree complete: send it to the parent
            rounds.append(Round(sends=(Send((rank - d) % size, 0, pos[end] - pos[v], buf),)))
        elif v % (2 * d) == 0 and v + d < size:  # child v+d's subtree lands after ours
            lo, hi = pos[v + d] - pos[v], pos[min(v + 2 * d, size)] - pos[v]
            rounds.append(Round(recvs=(Recv((rank + d) % size, lo, hi, buf=buf),)))
        else:
            rounds.append(Round())
    if not leaf:  # own block first in our subtree
        rounds = first_copies(rounds, Copy(0, 0, counts[rank], "in", buf))
    if v == 0 and root != 0:  # virtual order back to rank order
        rounds = last_copies(rounds, *_to_absolute(counts, root, pos, into_out=True))
    return timeline(rounds, "binomial_gather")


def binomial_scatter_rounds(
    rank: int, size: int, root: int, pos: Sequence[int], base: int, buf: Buf
) -> list[Round]:
    """Steps of a binomial scatter of virtual blocks ``buf[pos[w] - base : pos[w+1] - base]``.

    Rank v receives its subtree's blocks from its parent, then hands each child (largest
    subtree first) the blocks of the child's subtree.
    """
    v, k, end = (rank - root) % size, depth(size), subtree_end((rank - root) % size, size)
    rounds: list[Round] = []
    for t in range(k):
        d = 1 << (k - 1 - t)
        if v % (2 * d) == 0 and v + d < size:  # hand child v+d its subtree's blocks
            lo, hi = pos[v + d] - base, pos[min(v + 2 * d, size)] - base
            rounds.append(Round(sends=(Send((rank + d) % size, lo, hi, buf),)))
        elif v % (2 * d) == d:  # our subtree's blocks arrive from the parent
            rounds.append(
                Round(recvs=(Recv((rank - d) % size, pos[v] - base, pos[end] - base, buf=buf),))
            )
        else:
            rounds.append(Round())
    return rounds


def binomial_scatter(rank: int, size: int, counts: Sequence[int], root: int) -> Schedule:
    """Receive our subtree's blocks from the parent, pass each child its part, keep our block.

    Steps: ceil(log2 p). Sent per rank: its children's subtree blocks (root: n - n_root).
    Root 0 sends straight from ``in``; leaves receive straight into ``out``.
    """
    v, pos = (rank - root) % size, _virtual_positions(counts, root)
    leaf = subtree_end(v, size) == v + 1 and v != 0
    buf: Buf = "out" if leaf else "in" if root == 0 and v == 0 else "tmp"
    rounds = binomial_scatter_rounds(rank, size, root, pos, pos[v], buf)
    if v == 0 and root != 0:  # root first lays its array out in virtual order
        rounds = first_copies(rounds, *_to_absolute(counts, root, pos, into_out=False))
    if not leaf:  # our own block is first in our subtree
        rounds = last_copies(rounds, Copy(0, 0, counts[rank], buf, "out"))
    return timeline(rounds, "binomial_scatter")

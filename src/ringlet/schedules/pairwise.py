"""All-to-all: pairwise exchange (in step k every rank sends to rank+k and receives from rank-k)
and direct (every block at once).

Pairwise gives each rank one message in and one out per step, so no link or receiver is
oversubscribed: the choice between hosts. Within one host, where every pair has its own mailbox
and a large block is one kernel copy from the sender's memory, direct moves all blocks in one
round, concurrently, and waits once instead of p-1 times.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Copy, Recv, Round, Schedule, Send, first_copies, offsets, timeline


def pairwise_all_to_all(
    rank: int, size: int, send_counts: Sequence[int], recv_counts: Sequence[int]
) -> Schedule:
    """Copy own block, then p-1 steps of send to rank+k / receive from rank-k.

    Steps: p-1. Sent per rank: its whole input except its own block.
    Raises ValueError if the rank's own send and receive counts differ.
    """
    give, take = _blocks(rank, send_counts, recv_counts)
    rounds = [
        Round(
            (Send((rank + k) % size, *give[(rank + k) % size], buf="in"),),  # block for rank+k
            (Recv((rank - k) % size, *take[(rank - k) % size]),),  # block from rank-k, in place
        )
        for k in range(1, size)
    ]
    own = Copy(give[rank][0], take[rank][0], send_counts[rank], "in", "out")
    return timeline(first_copies(rounds, own), "pairwise_all_to_all")


def direct_all_to_all(
    rank: int, size: int, send_counts: Sequence[int], recv_counts: Sequence[int]
) -> Schedule:
    """Copy own block, then one round: every other block to its rank, every block for this rank
    from its sender, in place.

    Steps: 1. Sent per rank: its whole input except its own block (as pairwise).
    Raises ValueError if the rank's own send and receive counts differ.
    """
    give, take = _blocks(rank, send_counts, recv_counts)
    peers = [q for q in range(size) if q != rank]
    rounds = [
        Round(
            tuple(Send(q, *give[q], buf="in") for q in peers),
            tuple(Recv(q, *take[q]) for q in peers),
        )
    ] if peers else []  # fmt: skip
    own = Copy(give[rank][0], take[rank][0], send_counts[rank], "in", "out")
    return timeline(first_copies(rounds, own), "direct_all_to_all")


def _blocks(
    rank: int, send_counts: Sequence[int], recv_counts: Sequence[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, stop) of each rank's block in the input and in the output; raises ValueError if
    the rank's own send and receive counts differ."""
    if send_counts[rank] != recv_counts[rank]:
        raise ValueError(
            f"all_to_all on rank {rank}: sends itself {send_counts[rank]} elements but expects "
            f"{recv_counts[rank]}; send_counts[rank] and recv_counts[rank] must be equal"
        )
    return offsets(send_counts), offsets(recv_counts)

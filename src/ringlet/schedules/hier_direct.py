"""Across hosts without lanes: all-gather by direct sends between two hosts, and all-gather and
reduce-scatter around a ring in host order where hosts hold different numbers of ranks.

Direct: block b of host h's i-th rank goes, for every other host g, to g's rank number i mod m_g
(its *receiver* there), which forwards it to the other ranks of its host; every message lands in
its place in ``out`` (no scratch, no reordering copy). With two hosts that is the minimum on the
link; with more, each host would send its blocks H-1 times, so the lanes (hier.py) or the ring
take over. The ring visits the ranks host by host, so each step crosses each host's link once
each way: (p-1)/p·n per link, the minimum whenever some host holds a single rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .base import Copy, Recv, Round, Schedule, Send, offsets, timeline
from .groups import host_members, locate
from .ring import ring_all_gather_along, ring_reduce_scatter_along

#: Up to this many hosts, all_gather sends each block straight to every other host (one
#: inter-host round); beyond, each host would send its blocks more than once.
DIRECT_HOSTS = 2


def _receiver(members: Sequence[tuple[int, ...]], index: int, host: int) -> int:
    """The rank of ``host`` that receives the block of another host's ``index``-th rank."""
    return members[host][index % len(members[host])]


def _relayed(members: Sequence[tuple[int, ...]], rank: int) -> list[int]:
    """The other hosts' ranks whose blocks ``rank`` receives for its host, in rank order."""
    h, i = locate(members, rank)
    m = len(members[h])
    found = [
        r for g, ranks in enumerate(members) if g != h for j, r in enumerate(ranks) if j % m == i
    ]
    return sorted(found)


def direct_all_gather(
    rank: int, size: int, counts: Sequence[int], hosts: tuple[int, ...]
) -> Schedule:
    """Own block to every local rank and to its receiver on each other host (one round), then
    the receivers forward the other hosts' blocks inside their host, one block a round.

    Steps: 1 + ceil(ranks on other hosts / m) for the smallest host's ranks. Slowest link: host h
    sends its blocks once to each other host, (H-1)·n_h, and receives n - n_h (the minimum).
    """
    members, block = host_members(hosts), offsets(counts)
    h, i = locate(members, rank)
    local = [q for q in members[h] if q != rank]
    away = [_receiver(members, i, g) for g in range(len(members)) if g != h]
    first = Round(
        tuple(Send(q, 0, counts[rank], "in") for q in (*local, *away)),  # own block, everywhere
        tuple(Recv(q, *block[q]) for q in (*local, *_relayed(members, rank))),
        (Copy(0, block[rank][0], counts[rank], "in", "out"),),
    )
    relays = {q: _relayed(members, q) for q in members[h]}
    longest = max(len(_relayed(members, q)) for q in range(size))
    rounds = [first]
    for t in range(longest):  # t-th relayed block of every rank to the rest of its host
        mine = relays[rank][t : t + 1]
        sends = tuple(Send(q, *block[b]) for q in local for b in mine)
        recvs = tuple(Recv(q, *block[relays[q][t]]) for q in local if t < len(relays[q]))
        rounds.append(Round(sends, recvs))
    return timeline(rounds, "hier_all_gather")


def host_order(hosts: Sequence[int]) -> tuple[int, ...]:
    """The ranks host by host (hosts in order of first appearance, ranks in rank order)."""
    return tuple(r for ranks in host_members(hosts) for r in ranks)


def host_ring_all_gather(
    rank: int, size: int, counts: Sequence[int], hosts: tuple[int, ...]
) -> Schedule:
    """:func:`.ring.ring_all_gather` visiting the ranks in host order.

    Steps: p-1. Slowest link: (p-1)/p·n each way for even blocks (each step crosses it once).
    """
    flat = ring_all_gather_along(host_order(hosts), rank, counts)
    return replace(flat, name="hier_all_gather")


def host_ring_reduce_scatter(
    rank: int, size: int, counts: Sequence[int], hosts: tuple[int, ...]
) -> Schedule:
    """:func:`.ring.ring_reduce_scatter` visiting the ranks in host order.

    Steps: p-1. Slowest link: (p-1)/p·n each way for even blocks."""
    flat = ring_reduce_scatter_along(host_order(hosts), rank, counts)
    return replace(flat, name="hier_reduce_scatter")

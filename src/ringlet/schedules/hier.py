"""Hierarchical algorithms: an intra-host phase, an inter-host phase, an intra-host phase.

``hosts[r]`` is the host of rank r (any layout: uneven, not host-contiguous). H hosts, m ranks on
the largest, K ("lanes") on the smallest. Large vectors are cut into K slices; local rank k of
every host works on slice k, and the k-th ranks of all hosts (lane k) run the inter-host phase
of slice k side by side, so each byte crosses the slowest link (a host's NIC) the fewest times
and every local rank works on its own slice. Small vectors take one lane and binomial trees
inside hosts (latency-bound). Each piece is reduced along one path and then copied, so every
rank gets the same bits. Phases are built from the flat algorithms over sub-groups
(:mod:`.groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from .doubling import (
    bruck_all_gather,
    dissemination_barrier,
    halving_doubling_all_reduce,
    halving_reduce_scatter,
    recursive_doubling_all_reduce,
)
from .groups import (
    Group,
    Lanes,
    Place,
    host_members,
    lanes_layout,
    locate,
    phase,
    pieces,
    pipeline,
    stride,
)
from .hier_direct import (
    DIRECT_HOSTS,
    direct_all_gather,
    host_ring_all_gather,
    host_ring_reduce_scatter,
)
from .ring import (
    chain_broadcast,
    chain_reduce,
    ring_all_gather,
    ring_all_gather_rounds,
    ring_all_reduce,
    ring_reduce_scatter,
    ring_reduce_scatter_rounds,
)
from .tree import binomial_broadcast, binomial_reduce

#: At most this many elements, a vector takes one lane and trees inside hosts: the intra-host
#: rounds then cost 2·ceil(log2 m) latencies instead of 2(m-1) (modeled in the docs table).
HIER_SMALL = 8192
#: Large all_reduce vectors are cut into up to PIECES pieces of at least PIECE_MIN elements whose
#: phases overlap (groups.pipeline), so the network never waits for the intra-host phases.
PIECES = 4
PIECE_MIN = 1 << 20

Fn = Callable[..., Schedule]


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def _padded(slices: Sequence[tuple[int, int]], m: int, end: int) -> tuple[tuple[int, int], ...]:
    """Local rank k's piece: slice k for k < K, an empty range for the others."""
    return tuple(slices[k] if k < len(slices) else (end, end) for k in range(m))


def _local_reduce_scatter(
    i: int, m: int, *, chunks: tuple[tuple[int, int], ...], buf: Buf
) -> list[Round]:
    """Ring reduce-scatter inside a host after which local rank i holds ``chunks[i]`` reduced."""
    shifted = [chunks[(x - 1) % m] for x in range(m)]  # the ring leaves rank i with chunk i+1
    return ring_reduce_scatter_rounds(i, m, shifted, buf)


def _local_all_gather(
    i: int, m: int, *, chunks: tuple[tuple[int, int], ...], buf: Buf
) -> list[Round]:
    """Ring all-gather inside a host: local rank i starts with ``chunks[i]``."""
    return ring_all_gather_rounds(i, m, chunks, buf)


def _tree_groups(members: Sequence[tuple[int, ...]], count: int) -> list[Group]:
    """Each host as a group running a tree from (or to) its local rank 0."""
    return [Group(m, {"count": count, "root": 0}, {}) for m in members]


def _ring_groups(
    members: Sequence[tuple[int, ...]], slices: Sequence[tuple[int, int]], end: int, buf: Buf
) -> list[Group]:
    """Each host as a ring whose local rank k owns ``slices[k]`` (the rest empty pieces)."""
    return [Group(m, {"chunks": _padded(slices, len(m), end), "buf": buf}, {}) for m in members]


def _lane_groups(
    members: Sequence[tuple[int, ...]], slices: Sequence[tuple[int, int]], **kw: int
) -> list[Group]:
    """Lane k: the k-th rank of every host, working on ``out[slices[k]]``."""
    return [
        Group(tuple(m[k] for m in members), {"count": hi - lo, **kw}, {"out": ("out", lo)})
        for k, (lo, hi) in enumerate(slices)
    ]


def hier_all_reduce(rank: int, size: int, count: int, hosts: tuple[int, ...]) -> Schedule:
    """Local reduce-scatter into K slices, all-reduce of slice k across lane k, local all-gather.

    Above 2·PIECE_MIN elements the vector is cut into pieces whose phases overlap where the local
    rings allow it (one piece crosses the network while another is reduced or copied inside the
    host); the bytes on every link stay the same.

    Steps: 2(m-1) local + the inter-host all-reduce of n/K over H (halving-doubling or ring).
    Small: log2 m + log2 H (+ fold steps, + 1 if hosts are uneven), like recursive doubling
    on a host-contiguous layout, whatever the layout. Slowest link: each host sends and receives
    2(H-1)/H·n, the minimum (n each way for 2 hosts); small: K·n per step.
    """
    members = host_members(hosts)
    if count <= HIER_SMALL:
        return timeline(_small_all_reduce(rank, members, count), "hier_all_reduce")
    kinds = ("local", "inter", "local")
    lengths = [len(ph) for ph in _all_reduce_phases(rank, members, 0, count)]
    most = max(1, min(PIECES, count // PIECE_MIN))
    # The most pieces that still overlap (with long local rings, more would only add rounds).
    n = next((q for q in range(most, 1, -1) if stride(lengths, kinds, q) < sum(lengths)), 1)
    parts = even_chunks(count, n)
    # Pieces overlap: one piece's inter-host phase runs beside another's intra-host phases.
    phases = [_all_reduce_phases(rank, members, lo, hi) for lo, hi in parts]
    return timeline(pipeline(phases, kinds), "hier_all_reduce")


def _all_reduce_phases(
    rank: int, members: Sequence[tuple[int, ...]], lo: int, hi: int
) -> list[list[Round]]:
    """hier_all_reduce's three phases for ``out[lo:hi]``: local, inter-host, local."""
    slices = [(a + lo, b + lo) for a, b in even_chunks(hi - lo, min(map(len, members)))]
    local = _ring_groups(members, slices, hi, "out")
    inter: Fn = halving_doubling_all_reduce if _pow2(len(members)) else ring_all_reduce
    return [
        phase(_local_reduce_scatter, local, rank),  # local rank k: host sum of slice k
        phase(inter, _lane_groups(members, slices), rank),  # slice k across hosts
        phase(_local_all_gather, local, rank),  # finished slices to every local rank
    ]


def _small_all_reduce(rank: int, members: Sequence[tuple[int, ...]], count: int) -> list[Round]:
    """Latency-bound: recursive doubling inside each host, then across hosts among lane k for
    every k < K (the same bits on every lane); ranks past K copy the result from a lane rank."""
    local = [Group(m, {"count": count}, {}) for m in members]
    rounds = phase(recursive_doubling_all_reduce, local, rank)  # host sum on every local rank
    k = min(map(len, members))
    lanes = _lane_groups(members, [(0, count)] * k)
    rounds += phase(recursive_doubling_all_reduce, lanes, rank)  # sum of the host sums
    if all(len(m) == k for m in members):
        return rounds
    h, i = locate(members, rank)
    extra = members[h][k:]  # local rank j >= K copies from local rank j mod K
    sends = tuple(Send(r, 0, count) for j, r in enumerate(extra) if (k + j) % k == i)
    recvs = (Recv(members[h][i % k], 0, count),) if i >= k else ()
    return [*rounds, Round(sends, recvs)]


def hier_reduce(rank: int, size: int, count: int, root: int, hosts: tuple[int, ...]) -> Schedule:
    """Local reduce-scatter into K slices, reduce of slice k across lane k to root's host, then
    root's host hands the slices to root.

    Steps: m-1 local (2·ceil(log2 m) when small) + the inter-host reduce of n/K + 1. Slowest
    link: each host sends n once, root's host receives (H-1)·n (binomial) or n (chain, H > 2).
    """
    members, h = host_members(hosts), len(set(hosts))
    home, _ = locate(members, root)
    small = count <= HIER_SMALL
    slices = even_chunks(count, 1 if small else min(map(len, members)))
    if small:  # one lane: tree to local rank 0
        rounds = phase(binomial_reduce, _tree_groups(members, count), rank)
    else:  # local rank k: host sum of slice k
        rounds = phase(_local_reduce_scatter, _ring_groups(members, slices, count, "out"), rank)
    inter: Fn = binomial_reduce if small or h <= 2 else chain_reduce
    rounds += phase(inter, _lane_groups(members, slices, root=home), rank)  # to root's host
    lanes = [(members[home][k], s) for k, s in enumerate(slices)]
    rounds.append(  # root's host: each lane's slice to root
        Round(
            tuple(Send(root, *s) for r, s in lanes if r == rank != root),
            tuple(Recv(r, *s) for r, s in lanes if rank == root != r),
        )
    )
    return timeline(rounds, "hier_reduce")


def hier_broadcast(rank: int, size: int, count: int, root: int, hosts: tuple[int, ...]) -> Schedule:
    """Root deals K slices to its host's lane ranks, lane k broadcasts slice k across hosts,
    each host all-gathers the slices.

    Steps: 1 + the inter-host broadcast of n/K + m-1 local (ceil(log2 m) when small). Slowest
    link: each host receives n once; root's host sends ceil(log2 H)·n (tree) or n (chain).
    """
    members, h = host_members(hosts), len(set(hosts))
    home, _ = locate(members, root)
    small = count <= HIER_SMALL
    slices = even_chunks(count, 1 if small else min(map(len, members)))
    lanes = [(members[home][k], s) for k, s in enumerate(slices)]
    rounds = [  # root's host: slice k to its k-th rank
        Round(
            tuple(Send(r, *s) for r, s in lanes if rank == root != r),
            tuple(Recv(root, *s) for r, s in lanes if r == rank != root),
        )
    ]
    inter: Fn = binomial_broadcast if small or h <= 2 else chain_broadcast
    rounds += phase(inter, _lane_groups(members, slices, root=home), rank)  # slice k to every host
    if small:  # tree from local rank 0
        rounds += phase(binomial_broadcast, _tree_groups(members, count), rank)
    else:  # every host all-gathers the slices
        rounds += phase(_local_all_gather, _ring_groups(members, slices, count, "out"), rank)
    return timeline(rounds, "hier_broadcast")


def hier_reduce_scatter(
    rank: int, size: int, counts: Sequence[int], hosts: tuple[int, ...]
) -> Schedule:
    """Hosts of different sizes: :func:`.hier_direct.host_ring_reduce_scatter`. Otherwise:
    blocks laid out lane after lane in ``tmp``; local reduce-scatter of the lanes' slices;
    reduce-scatter of slice k across lane k (each host's part to that host); each lane rank
    hands the finished pieces to their owners on its host.

    Steps: m-1 local + the inter-host reduce-scatter over H + 1. Slowest link: host h sends
    its share of the other hosts' blocks, n - n_h, the minimum ((H-1)/H·n for even blocks).
    """
    members, counts = host_members(hosts), tuple(counts)
    if len(set(map(len, members))) > 1:  # uneven hosts: the lanes' parts would be uneven too
        return host_ring_reduce_scatter(rank, size, counts, hosts)
    lay, total, block = (
        lanes_layout(members, counts, min(map(len, members))),
        sum(counts),
        offsets(counts),
    )
    into = [
        Copy(block[r][0] + off, at, n, "in", "tmp")
        for r in range(size)
        for _, off, at, n in pieces(lay, counts, r)
    ]
    rounds = first_copies(
        phase(_local_reduce_scatter, _ring_groups(members, lay.lane, total, "tmp"), rank), *into
    )
    lanes = _part_lanes(members, lay, total, gather=False)
    inter: Fn = halving_reduce_scatter if _pow2(len(members)) else ring_reduce_scatter
    rounds += phase(inter, lanes, rank)  # lane k: each host's part of slice k, reduced
    return timeline([*rounds, _hand_out(lay, members, counts, rank, total)], "hier_reduce_scatter")


def _part_lanes(
    members: Sequence[tuple[int, ...]], lay: Lanes, total: int, gather: bool
) -> list[Group]:
    """Lane k over the hosts' parts of slice k: the reduce-scatter reads L_k in place and leaves
    its host's part after its scratch; the all-gather reads the part at ``tmp[total:]`` and
    fills L_k in place."""
    groups = []
    for k, (lo, hi) in enumerate(lay.lane):
        sizes = tuple(part[k][1] - part[k][0] for part in lay.part)
        whole: tuple[Buf, int] = ("tmp", lo)
        mine: tuple[Buf, int] = ("tmp", total)
        past: tuple[Buf, int] = ("tmp", total + hi - lo)
        place: Place = (
            {"in": mine, "out": whole, "tmp": past}
            if gather
            else {"in": whole, "tmp": mine, "out": past}
        )
        groups.append(Group(tuple(m[k] for m in members), {"counts": sizes}, place))
    return groups


def _hand_out(
    lay: Lanes, members: Sequence[tuple[int, ...]], counts: Sequence[int], rank: int, total: int
) -> Round:
    """Lane rank k of a host sends the owners on its host their pieces of its finished part."""
    h = lay.host[rank]
    k = members[h].index(rank)
    sends, copies = [], []
    if k < len(lay.lane):  # the part sits at tmp[total + |L_k|:], in lane-major order
        base = total + lay.lane[k][1] - lay.lane[k][0] - lay.pos[k][h]
        for r in members[h]:
            for j, off, at, n in pieces(lay, counts, r):
                if j == k and r == rank:
                    copies.append(Copy(base + at, off, n, "tmp", "out"))
                elif j == k:
                    sends.append(Send(r, base + at, base + at + n, "tmp"))
    recvs = [
        Recv(members[h][j], off, off + n) for j, off, _, n in pieces(lay, counts, rank) if j != k
    ]
    return Round(tuple(sends), tuple(recvs), tuple(copies))


def hier_all_gather(
    rank: int, size: int, counts: Sequence[int], hosts: tuple[int, ...]
) -> Schedule:
    """Up to DIRECT_HOSTS hosts: :func:`.hier_direct.direct_all_gather`; hosts of different
    sizes: :func:`.hier_direct.host_ring_all_gather`. Otherwise each host's blocks cut into K
    parts, part k collected at local rank k; all-gather of the parts across lane k; local
    all-gather of the lanes' slices; blocks copied into rank order.

    Steps: 1 + the inter-host all-gather over H (ring; Bruck when small) + m-1 local. Slowest
    link: each host receives n - n_h, the minimum, and sends about that much (ring).
    """
    members, counts = host_members(hosts), tuple(counts)
    if len(members) <= DIRECT_HOSTS:
        return direct_all_gather(rank, size, counts, hosts)
    if len(set(map(len, members))) > 1:  # uneven hosts: the lanes' parts would be uneven too
        return host_ring_all_gather(rank, size, counts, hosts)
    lay, total, block = (
        lanes_layout(members, counts, min(map(len, members))),
        sum(counts),
        offsets(counts),
    )
    rounds = [_collect(lay, members, counts, rank, total)]  # host h's part k at its k-th rank
    lanes = _part_lanes(members, lay, total, gather=True)
    inter: Fn = bruck_all_gather if total <= HIER_SMALL else ring_all_gather
    rounds += phase(inter, lanes, rank)  # lane k: slice k (part k of every host)
    rounds += phase(_local_all_gather, _ring_groups(members, lay.lane, total, "tmp"), rank)
    order = [
        Copy(at, block[r][0] + off, n, "tmp", "out")
        for r in range(size)
        for _, off, at, n in pieces(lay, counts, r)
    ]
    return timeline(last_copies(rounds, *order), "hier_all_gather")


def _collect(
    lay: Lanes, members: Sequence[tuple[int, ...]], counts: Sequence[int], rank: int, total: int
) -> Round:
    """Every rank's pieces of its block to its host's lane ranks, each at ``tmp[total:]``."""
    h = lay.host[rank]
    k = members[h].index(rank)
    sends, copies, recvs = [], [], []
    for j, off, at, n in pieces(lay, counts, rank):
        if j == k:  # our own lane: the piece goes straight into place
            copies.append(Copy(off, total + at - lay.pos[k][h], n, "in", "tmp"))
        else:
            sends.append(Send(members[h][j], off, off + n, "in"))
    for r in members[h] if k < len(lay.lane) else ():
        for j, _, at, n in pieces(lay, counts, r):
            if j == k and r != rank:
                start = total + at - lay.pos[k][h]
                recvs.append(Recv(r, start, start + n, buf="tmp"))
    return Round(tuple(sends), tuple(recvs), tuple(copies))


def hier_barrier(rank: int, size: int, hosts: tuple[int, ...]) -> Schedule:
    """Local ranks signal their host's rank 0, the leaders run a dissemination barrier, then
    each leader releases its host.

    Steps: 2 + ceil(log2 H). One element per message, on ``tmp``.
    """
    members = host_members(hosts)
    h, k = locate(members, rank)
    mates = members[h][1:]
    if k == 0:  # gather the local signals into tmp[1 + j]
        arrive = Round(recvs=tuple(Recv(r, 1 + j, 2 + j, buf="tmp") for j, r in enumerate(mates)))
        release = Round(sends=tuple(Send(r, 0, 1, "tmp") for r in mates))
    else:
        arrive = Round(sends=(Send(members[h][0], 0, 1, "tmp"),))
        release = Round(recvs=(Recv(members[h][0], 1, 2, buf="tmp"),))
    leaders = [Group(tuple(m[0] for m in members), {}, {"tmp": ("tmp", len(members[h]) + 1)})]
    rounds = [arrive, *phase(dissemination_barrier, leaders, rank), release]
    return timeline(rounds, "hier_barrier")

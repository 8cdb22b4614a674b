"""Hierarchical schedules over many host layouts, replayed on NumPy; selection; link bytes.

`replay` validates every layout's schedules (sends meet receives in rounds of the same number,
no in-round hazards) before running them on garbage-initialised scratch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringlet.schedules import hier
from ringlet.schedules.cost import even_args, host_traffic, modeled_time
from ringlet.schedules.groups import spans_hosts
from ringlet.schedules.select import HIER_OPS, build, select
from ringlet.schedules.simulate import Enter, Transfer, events, replay

NAMED = [(0, 0, 1, 1), (0, 0, 0, 1), (0, 0, 1, 2), (0, 1, 0, 1), (0, 0, 0, 0, 1, 1, 1, 1)]
NAMED += [(0, 0, 1, 1, 2, 2, 3, 3), (0, 1, 1, 0, 2), (1, 1, 0, 2, 0, 0, 2)]


def layouts() -> list[tuple[int, ...]]:
    """For p = 1..8: one host, all distinct, halves, interleaved, (p-1)+1, 2+1+1…, and NAMED."""
    found = set(NAMED)
    for p in range(1, 9):
        found |= {(0,) * p, tuple(range(p)), tuple(r * 2 // p for r in range(p))}
        found |= {tuple(r % 2 for r in range(p)), (0,) * (p - 1) + (1,)}
        found.add(tuple(max(0, r - 1) for r in range(p)))
    return sorted(found, key=lambda h: (len(h), h))


LAYOUTS = layouts()
COUNTS = [0, 1, 5, 40, hier.HIER_SMALL + 37]  # the last one takes the lanes


def ints(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-(2**40), 2**40, n, dtype=np.int64)


def ids(h: tuple[int, ...]) -> str:
    return "".join(map(str, h))


@pytest.mark.parametrize("hosts", LAYOUTS, ids=ids)
def test_all_reduce_broadcast_reduce(hosts: tuple[int, ...]) -> None:
    p, rng = len(hosts), np.random.default_rng(len(hosts))
    for c in COUNTS:
        xs = [ints(rng, c) for _ in range(p)]
        for r, got in enumerate(replay("all_reduce", "hier", p, xs, np.add, count=c, hosts=hosts)):
            np.testing.assert_array_equal(got, np.sum(xs, axis=0), err_msg=f"c {c} rank {r}")
        for root in sorted({0, p // 2, p - 1}):
            kw: dict[str, Any] = {"count": c, "root": root, "hosts": hosts}
            for got in replay("broadcast", "hier", p, xs, np.add, **kw):
                np.testing.assert_array_equal(got, xs[root], err_msg=f"c {c} root {root}")
            got = replay("reduce", "hier", p, xs, np.bitwise_xor, **kw)[root]
            np.testing.assert_array_equal(got, np.bitwise_xor.reduce(xs, axis=0))


@pytest.mark.parametrize("hosts", LAYOUTS, ids=ids)
def test_reduce_scatter_and_all_gather_uneven(hosts: tuple[int, ...]) -> None:
    p, rng = len(hosts), np.random.default_rng(len(hosts))
    for c in COUNTS:
        for counts in ([c] * p, [c] + [int(x) for x in rng.integers(0, c + 2, p - 1)]):
            xs = [ints(rng, sum(counts)) for _ in range(p)]
            got = replay("reduce_scatter", "hier", p, xs, np.add, counts=counts, hosts=hosts)
            want = np.split(np.sum(xs, axis=0), np.cumsum(counts)[:-1])
            for r in range(p):
                np.testing.assert_array_equal(got[r], want[r], err_msg=f"{counts} rank {r}")
            blocks = [ints(rng, n) for n in counts]
            for got_r in replay(
                "all_gather", "hier", p, blocks, np.add, counts=counts, hosts=hosts
            ):
                np.testing.assert_array_equal(got_r, np.concatenate(blocks), err_msg=f"{counts}")


@pytest.mark.parametrize("hosts", LAYOUTS, ids=ids)
def test_barrier_waits_for_everyone(hosts: tuple[int, ...]) -> None:
    p = len(hosts)
    scheds = [build("barrier", "hier", r, p, hosts=hosts) for r in range(p)]
    heard, at_start = [{r} for r in range(p)], {}
    for ev in events(scheds):
        if isinstance(ev, Enter):
            at_start[(ev.rank, ev.round)] = set(heard[ev.rank])
        elif isinstance(ev, Transfer):
            heard[ev.dst] |= at_start[(ev.src, ev.src_round)]
    assert all(h == set(range(p)) for h in heard)
    replay("barrier", "hier", p, [np.zeros(0, np.uint8)] * p, np.add, hosts=hosts)


@pytest.mark.parametrize("hosts", [h for h in LAYOUTS if len(h) > 1], ids=ids)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_rank_gets_the_same_bits(hosts: tuple[int, ...], dtype: Any) -> None:
    p, rng = len(hosts), np.random.default_rng(len(hosts))
    for c in (40, hier.HIER_SMALL + 37):
        xs = [
            (rng.standard_normal(c) * 10.0 ** rng.integers(-3, 4, c)).astype(dtype) for _ in hosts
        ]
        got = replay("all_reduce", "hier", p, xs, np.add, count=c, hosts=hosts)
        assert all(g.tobytes() == got[0].tobytes() for g in got), c
        np.testing.assert_allclose(got[0], functools.reduce(np.add, xs), rtol=0.05, atol=1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=8),
    st.lists(st.integers(0, 7), min_size=8, max_size=8),
    st.sampled_from(["reduce_scatter", "all_gather", "all_reduce", "broadcast", "reduce"]),
)
def test_any_layout_any_counts(labels: list[int], sizes: list[int], op: str) -> None:
    hosts, p = tuple(labels), len(labels)
    counts, rng = sizes[:p], np.random.default_rng(p)
    root, c = sizes[0] % p, sum(counts)
    if op in ("reduce_scatter", "all_gather"):
        xs = [ints(rng, c if op == "reduce_scatter" else n) for n in counts]
        got = replay(op, "hier", p, xs, np.add, counts=counts, hosts=hosts)
        whole = np.sum(xs, axis=0) if op == "reduce_scatter" else np.concatenate(xs)
        want = np.split(whole, np.cumsum(counts)[:-1]) if op == "reduce_scatter" else [whole] * p
    else:
        xs = [ints(rng, c) for _ in range(p)]
        kw: dict[str, Any] = {"count": c} | ({} if op == "all_reduce" else {"root": root})
        got = replay(op, "hier", p, xs, np.add, hosts=hosts, **kw)
        want = [xs[root] if op == "broadcast" else np.sum(xs, axis=0)] * p
    for r in range(p) if op != "reduce" else [root]:
        np.testing.assert_array_equal(got[r], want[r])


# -- selection, link bytes and the cost model -----------------------------------------------------


@pytest.mark.parametrize("hosts", LAYOUTS, ids=ids)
def test_select_takes_hier_when_ranks_span_hosts(hosts: tuple[int, ...]) -> None:
    multi, p = 1 < len(set(hosts)) < len(hosts), len(hosts)
    assert spans_hosts(hosts) == multi
    for op in HIER_OPS[:-1]:  # barrier moves no data: the model always decides
        assert (select(op, p, 1 << 20, hosts=hosts) == "hier") == multi  # bandwidth-bound
        for nbytes in (0, 8, 64 << 10):  # latency-bound: hier or the flat choice, by the model
            got = select(op, p, nbytes, hosts=hosts)
            assert got in ("hier", select(op, p, nbytes)) if multi else got == select(op, p, nbytes)
    assert select("gather", p, 1 << 20, hosts=hosts) == select("gather", p, 1 << 20)


def test_small_messages_follow_the_cost_model() -> None:
    hosts = (0, 1, 0, 1, 0, 1, 0, 1)
    assert select("barrier", 8, 0, hosts=(0, 0, 0, 0, 1, 1, 1, 1)) == "hier"  # 2 + 1 rounds, not 3
    assert select("broadcast", 8, 64 << 10, hosts=hosts) == "hier"  # the tree crosses hosts 3 times
    assert select("all_reduce", 4, 8, hosts=(0, 0, 1, 2)) == "doubling"  # hier has fold steps


def link(op: str, algo: str, hosts: tuple[int, ...], n: int) -> int:
    """Most elements one host's link carries in one direction during the call."""
    p = len(hosts)
    scheds = [build(op, algo, r, p, hosts=hosts, **even_args(op, p, n)) for r in range(p)]
    return max(max(t) for t in host_traffic(scheds, hosts).values())


@pytest.mark.parametrize(
    "hosts", [(0, 0, 1, 1), (0, 1, 0, 1), (0, 0, 0, 0, 1, 1, 1, 1), (0, 0, 0, 1)]
)
@pytest.mark.parametrize("count", [hier.HIER_SMALL + 3, 1 << 16])
def test_two_hosts_all_reduce_crosses_the_link_once_each_way(
    hosts: tuple[int, ...], count: int
) -> None:
    p = len(hosts)
    scheds = [build("all_reduce", "hier", r, p, count=count, hosts=hosts) for r in range(p)]
    assert host_traffic(scheds, hosts) == {0: (count, count), 1: (count, count)}
    if hosts == tuple(sorted(hosts)):  # halving-doubling pairs i with i ^ (p/2) first
        assert link("all_reduce", "halving_doubling", hosts, count) > count
    lanes = min(hosts.count(h) for h in set(hosts))
    assert link("all_reduce", "hier", hosts, 100) == lanes * 100  # small: every lane, whole vector


@pytest.mark.parametrize(
    "hosts", [(0, 0, 1, 1), (0, 0, 0, 0, 1, 1, 1, 1), (0, 0, 1, 1, 2, 2, 3, 3)]
)
def test_each_host_link_carries_the_minimum(hosts: tuple[int, ...]) -> None:
    n, h = 1 << 16, len(set(hosts))
    assert link("reduce_scatter", "hier", hosts, n) == n - n // h  # the other hosts' blocks
    assert link("all_gather", "hier", hosts, n) == n - n // h
    assert link("broadcast", "hier", hosts, n) == n  # each host receives (and forwards) it once


@pytest.mark.parametrize(
    "hosts", [(0, 0, 0, 0, 1, 1, 1, 1), (0, 0, 1, 1, 2, 2, 3, 3), (0, 1) * 4, (0, 0, 1, 2)], ids=ids
)
@pytest.mark.parametrize("op", [op for op in HIER_OPS if op != "barrier"])
def test_cost_model_prefers_hier_for_large_messages(hosts: tuple[int, ...], op: str) -> None:
    """Where the model says hier wins at 1 and 16 MiB (intra 2 µs, 10 GB/s; inter 20 µs,
    1.25 GB/s). Known losses, left out: broadcast / reduce on host-contiguous ranks (the flat
    chain crosses hosts once, pipelined) and reduce_scatter / all_gather with one lane (2+1+1)."""
    p, uneven = len(hosts), len({hosts.count(h) for h in hosts}) > 1
    contiguous = hosts == tuple(sorted(hosts))
    if (op in ("broadcast", "reduce") and contiguous) or (
        uneven and op in ("reduce_scatter", "all_gather")
    ):
        pytest.skip("the flat algorithm is faster under the model")
    for n in (1 << 20, 16 << 20):
        kw, flat = even_args(op, p, n), select(op, p, n)
        times = {}
        for algo in (flat, "hier"):
            scheds = [build(op, algo, r, p, hosts=hosts, **kw) for r in range(p)]
            times[algo] = modeled_time(scheds, 2e-6, 1e-10, hosts, (20e-6, 8e-10))
        assert times["hier"] <= times[flat] * 1.01, (n, times)


def test_build_caches_with_a_hosts_tuple() -> None:
    cached = functools.lru_cache(build)
    a = cached("all_reduce", "hier", 1, 4, hosts=(0, 0, 1, 1), count=10)
    assert cached("all_reduce", "hier", 1, 4, hosts=(0, 0, 1, 1), count=10) is a
    with pytest.raises(ValueError, match="hosts names 3 ranks"):
        build("all_reduce", "hier", 0, 4, hosts=(0, 0, 1), count=10)
    with pytest.raises(ValueError, match="choose one of"):
        build("barrier", "no_such", 0, 4, hosts=(0, 0, 1, 1))


@pytest.mark.parametrize(
    "hosts",
    [
        (0, 0, 1, 1),
        (0, 0, 0, 1),
        (0, 1, 0, 1),
        (0, 0, 1, 1, 2, 2),
        (0, 0, 0, 0, 1, 1, 1, 1),
        (0, 0, 1, 2),
    ],
    ids=ids,
)
def test_pipelined_all_reduce_overlaps_phases(
    hosts: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large vectors in pieces: results exact, same link bytes, and inter-host rounds of one
    piece shared with intra-host rounds of another (what hides the shared-memory time)."""
    monkeypatch.setattr(hier, "PIECE_MIN", 64)
    p, c = len(hosts), hier.HIER_SMALL + 4 * 64 + 3
    xs = [ints(np.random.default_rng(r), c) for r in range(p)]
    for got in replay("all_reduce", "hier", p, xs, np.add, count=c, hosts=hosts):
        np.testing.assert_array_equal(got, np.sum(xs, axis=0))
    scheds = [hier.hier_all_reduce(r, p, c, hosts) for r in range(p)]
    pieces = hier.PIECES
    monkeypatch.setattr(hier, "PIECES", 1)
    whole = [hier.hier_all_reduce(r, p, c, hosts) for r in range(p)]
    cut, once = host_traffic(scheds, hosts), host_traffic(whole, hosts)
    for h in once:  # the same link bytes, up to the rounding of each piece's uneven chunks
        assert all(abs(a - b) <= pieces * p for a, b in zip(cut[h], once[h], strict=True)), h
    mixed = [
        rnd
        for r, s in enumerate(scheds)
        for rnd in s.rounds
        if len({hosts[q] == hosts[r] for q in {m.peer for m in (*rnd.sends, *rnd.recvs)}}) == 2
    ]
    if max(map(hosts.count, hosts)) == 2:  # 2-rank rings: the phases always interleave
        assert mixed, "no round overlaps an intra-host phase with an inter-host one"
    if mixed:  # pieces only where they overlap: fewer rounds than running them one by one
        assert len(scheds[0].rounds) < pieces * len(whole[0].rounds)
    else:
        assert [len(s.rounds) for s in scheds] == [len(s.rounds) for s in whole]


@pytest.mark.parametrize("hosts", NAMED, ids=ids)
def test_all_gather_through_lanes_beyond_direct_hosts(
    hosts: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DIRECT_HOSTS hosts all_gather takes the lanes' ring: forced here on small layouts."""
    monkeypatch.setattr(hier, "DIRECT_HOSTS", 1)
    p = len(hosts)
    rng = np.random.default_rng(p)
    for c in COUNTS:
        counts = [c] + [int(x) for x in rng.integers(0, c + 2, p - 1)]
        blocks = [ints(rng, n) for n in counts]
        for got in replay("all_gather", "hier", p, blocks, np.add, counts=counts, hosts=hosts):
            np.testing.assert_array_equal(got, np.concatenate(blocks), err_msg=f"{counts}")

"""Ordered rounds fold in rank order: the ordered algorithms give NumPy's left fold, bit for bit.

Checked twice: by the simulator (replay) and by the engine itself over an in-process transport
(threads, tiny segments, receives drained in a random order).
"""

from __future__ import annotations

import functools
import queue
import random
import threading
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ringlet.engine import Engine, fold_ranges
from ringlet.ops import ReduceOp
from ringlet.schedules.base import Recv, Round, Schedule, Send, check_hazards
from ringlet.schedules.select import DIRECT_MAX, ORDERED, RANK_ORDER, build, select
from ringlet.schedules.simulate import replay
from ringlet.transport.base import Tag

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def spread(rng: np.random.Generator, size: int, n: int, dtype: Any) -> list[np.ndarray]:
    """Values of very different magnitudes, so that the order of a float sum shows."""
    scale = 10.0 ** rng.integers(-3, 4, (size, n))
    return [(rng.standard_normal(n) * scale[r]).astype(dtype) for r in range(size)]


def left_fold(xs: Sequence[np.ndarray]) -> np.ndarray:
    return functools.reduce(np.add, xs)


def test_fold_ranges_is_a_left_fold_around_the_own_value() -> None:
    rng = np.random.default_rng(0)
    xs = spread(rng, 5, 64, np.float32)
    for rank in range(5):
        dest = xs[rank].copy()
        reduces = [(Recv(p, 0, 64, reduce=True), dest, xs[p].copy()) for p in (4, 0, 3, 1, 2)]
        fold_ranges(ReduceOp.SUM, rank, [r for r in reduces if r[0].peer != rank])
        assert dest.tobytes() == left_fold(xs).tobytes(), rank
    assert left_fold(xs).tobytes() != left_fold(xs[::-1]).tobytes()  # the order matters here


def test_hazards_allow_an_ordered_fold_of_one_range_only() -> None:
    recvs = (Recv(1, 0, 4, reduce=True), Recv(2, 0, 4, reduce=True))
    check_hazards(Schedule((Round((), recvs, ordered=True),)), 0)
    for bad in (Round((), recvs), Round((), (*recvs[:1], Recv(2, 2, 6, True)), ordered=True)):
        with pytest.raises(AssertionError):
            check_hazards(Schedule((bad,)), 0)


@pytest.mark.parametrize(
    ("op", "algo"), sorted((op, a) for op, algos in RANK_ORDER.items() for a in algos)
)
@pytest.mark.parametrize("size", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_is_the_left_fold(op: str, algo: str, size: int, dtype: Any) -> None:
    rng = np.random.default_rng(size)
    for n in (0, 1, size + 3, 50):
        xs = spread(rng, size, n, dtype)
        want = left_fold(xs)
        if op == "reduce_scatter":
            counts = [int(c) for c in rng.integers(0, n // size + 3, size)]
            xs = spread(rng, size, sum(counts), dtype)
            got = replay(op, algo, size, xs, np.add, counts=counts)
            assert np.concatenate(got).tobytes() == left_fold(xs).tobytes(), counts
            continue
        kw: dict[str, Any] = {"count": n} | ({"root": size - 1} if op == "reduce" else {})
        got = replay(op, algo, size, xs, np.add, **kw)
        for r in range(size) if op == "all_reduce" else [size - 1]:
            assert got[r].tobytes() == want.tobytes(), (n, r)


def test_select_deterministic_takes_the_ordered_fold_everywhere() -> None:
    for op, algo in ORDERED.items():
        for size, nbytes, hosts in ((1, 8, None), (8, 1 << 30, None), (4, 64, (0, 0, 1, 1))):
            got = select(op, size, nbytes, hosts=hosts, deterministic=True)
            assert got in RANK_ORDER[op]
            assert got == algo or nbytes <= DIRECT_MAX  # one step for small vectors
        assert select(op, 8, DIRECT_MAX + 1, deterministic=True) == algo
        for forced in RANK_ORDER[op]:
            assert select(op, 4, 64, forced, deterministic=True) == forced
        with pytest.raises(ValueError, match="deterministic mode needs"):
            select(op, 4, 64, "ring", deterministic=True)
    assert select("broadcast", 8, 8, deterministic=True) == "tree"  # nothing to fold


# -- the engine over an in-process transport ---------------------------------------------------


class Wires:
    """Unbounded in-memory links between the threads that play the ranks."""

    def __init__(self, size: int) -> None:
        self.q = {
            (a, b): queue.Queue[tuple[Tag, bytes]]() for a in range(size) for b in range(size)
        }


class LocalTransport:
    """Transport over :class:`Wires`: sends never block; receives are taken in random order."""

    def __init__(self, wires: Wires, rank: int, size: int) -> None:
        self.wires, self.rank, self.size = wires, rank, size
        self.rng = random.Random(rank)

    def exchange(
        self,
        sends: Sequence[tuple[int, memoryview]],
        recvs: Sequence[tuple[int, memoryview]],
        tag: Tag,
        deadline: float,
    ) -> None:
        for peer, data in sends:
            self.wires.q[(self.rank, peer)].put((tag, bytes(data)))
        for peer, into in self.rng.sample(list(recvs), len(recvs)):
            got_tag, data = self.wires.q[(peer, self.rank)].get(timeout=10)
            assert got_tag == tag and len(data) == into.nbytes
            into[:] = data

    def abort(self, message: str) -> None: ...

    def close(self) -> None: ...


def run_engine(scheds: list[Schedule], bufs: list[dict[str, np.ndarray]], seg: int) -> None:
    wires, errors = Wires(len(scheds)), []

    def play(r: int) -> None:
        try:
            engine = Engine(LocalTransport(wires, r, len(scheds)), segment_bytes=seg)
            engine.run(scheds[r], bufs[r], ReduceOp.SUM, 1, 0, 0.0)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=play, args=(r,)) for r in range(len(scheds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [2, 3, 5])
def test_engine_folds_in_rank_order_segment_by_segment(dtype: Any, size: int) -> None:
    rng = np.random.default_rng(size)
    n = 101
    xs = spread(rng, size, n, dtype)
    scheds = [build("all_reduce", "ordered", r, size, count=n) for r in range(size)]
    bufs = [{"in": x[:0], "out": x.copy(), "tmp": x[:0]} for x in xs]
    run_engine(scheds, bufs, seg=6)  # a few elements per segment
    for b in bufs:
        assert b["out"].tobytes() == left_fold(xs).tobytes()


def test_engine_ordered_round_with_own_value_in_the_middle() -> None:
    xs = spread(np.random.default_rng(7), 3, 9, np.float16)
    give = Schedule((Round((Send(1, 0, 9, "in", fold=True),)),))
    fold = Round((), (Recv(2, 0, 9, True), Recv(0, 0, 9, True)), ordered=True)
    bufs = [{"in": x.copy(), "out": x.copy(), "tmp": x[:0]} for x in xs]
    run_engine([give, Schedule((fold,)), give], bufs, seg=4)
    assert bufs[1]["out"].tobytes() == left_fold(xs).tobytes()


def test_engine_round_mixing_folded_and_whole_messages() -> None:
    """A folded message is cut in segments while the other messages of its round move whole
    with the first: both ends cut alike, whichever kind each side's other messages are."""
    n, seg = 10, 12  # segment of 3 float32 elements: the folded message takes 4
    xs = [np.arange(n, dtype=np.float32) + 100 * r for r in range(3)]
    first = Round((Send(1, 0, n, "in", fold=True),), (Recv(2, 0, n),))
    middle = Round((Send(2, 0, n, "in"),), (Recv(0, 0, n, True),))  # folds 0's, passes its own
    last = Round((Send(0, 0, n, "in"),), (Recv(1, n, 2 * n),))  # no folded message at all
    bufs = [{"in": x, "out": np.zeros(2 * n, np.float32), "tmp": x[:0]} for x in xs]
    bufs[1]["out"][:n] = xs[1]  # rank 1 folds rank 0's vector into its own
    run_engine([Schedule((first,)), Schedule((middle,)), Schedule((last,))], bufs, seg=seg)
    assert bufs[0]["out"][:n].tolist() == xs[2].tolist()
    assert bufs[1]["out"][:n].tolist() == (xs[0] + xs[1]).tolist()
    assert bufs[2]["out"][n:].tolist() == xs[1].tolist()

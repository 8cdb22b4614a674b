"""Asynchronous calls (Work), split into colours used concurrently, dup, send/recv by tag."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import ringlet
import spmd

TRANSPORTS = ["tcp", "auto"]


def _env(transport: str) -> dict[str, str]:
    if transport == "auto":
        pytest.importorskip("ringlet.transport.shm")
    return {"RINGLET_TRANSPORT": transport}


def many_outstanding(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """Issue many async ops at once, compute meanwhile, then check each result in issue order."""
    n, me = comm.size, comm.rank
    bufs = [np.full(1000 + i, me + i, np.float64) for i in range(20)]
    works = [comm.all_reduce(b, async_op=True) for b in bufs]
    gathered = comm.all_gather(np.array([me]), async_op=True)
    busy = sum(float(np.sin(np.arange(20_000)).sum()) for _ in range(5))  # compute meanwhile
    bad = []
    for i, (w, b) in enumerate(zip(works, bufs, strict=True)):
        assert w.wait() is b
        if not w.done() or w.exception() is not None:
            bad.append(f"work {i} state")
        if not np.array_equal(b, np.full(1000 + i, sum(r + i for r in range(n)), np.float64)):
            bad.append(f"all_reduce {i}")
    if gathered.wait().tolist() != list(range(n)):
        bad.append("all_gather")
    # a synchronous call after async ones runs after them (issue order is execution order)
    x = np.ones(3)
    w = comm.broadcast(np.full(3, 7.0) if me == 0 else x, root=0, async_op=True)
    y = comm.all_reduce(np.ones(3))
    if not (w.done() and (y == n).all()):
        bad.append("order")
    return bad if busy == busy else ["nan"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_many_outstanding_async_ops(n: int, transport: str) -> None:
    assert spmd.run(many_outstanding, n, env=_env(transport)) == [[]] * n


def overlap(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """async_op returns at once: the caller computes while the call waits for a late rank."""
    bad = []
    x = np.ones(1_000_000, np.float32)
    if comm.rank == 1:
        time.sleep(0.5)  # the peer arrives late, so the call cannot finish before then
    w = comm.all_reduce(x, async_op=True)
    if comm.rank == 0:
        # Had the call blocked the caller, it would be complete by now; the peer is still asleep.
        if w.done():
            bad.append("the caller was blocked by the call")
        s = float(np.tanh(np.random.default_rng(0).standard_normal((300, 300))).sum())  # computes
        bad += [] if s == s else ["nan"]
    w.wait()
    if not (x == comm.size).all():
        bad.append("result")
    return bad


def test_async_runs_while_the_caller_computes() -> None:
    """The work proceeds on the progress thread: the caller is not blocked while it runs."""
    assert spmd.run(overlap, 2, env={"RINGLET_TRANSPORT": "tcp"}) == [[], []]


def split_concurrently(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """Split into 2 and 3 colours; use both sub-communicators and the parent at once from threads."""
    n, me = comm.size, comm.rank
    halves = comm.split(me % 2, key=me)
    thirds = comm.split(me % 3, key=-me)
    none = comm.split(None if me == 0 else 1)
    bad: list[str] = []
    if (me == 0) != (none is None):
        bad.append("color None")
    if none is not None and none.size != n - 1:
        bad.append("none size")

    def use(sub, color: int, nc: int, key_sign: int) -> None:  # type: ignore[no-untyped-def]
        members = sorted((r for r in range(n) if r % nc == color), key=lambda r: key_sign * r)
        if sub.size != len(members) or sub.rank != members.index(me):
            bad.append(f"split {nc}: rank {sub.rank}/{sub.size}")
        for i in range(30):
            got = sub.all_reduce(np.array([me + i], np.int64))
            if got[0] != sum(members) + i * len(members):
                bad.append(f"split {nc} round {i}")
            if sub.all_gather(np.array([me])).tolist() != members:
                bad.append(f"split {nc} gather")

    threads = [
        threading.Thread(target=use, args=(halves, me % 2, 2, 1)),
        threading.Thread(target=use, args=(thirds, me % 3, 3, -1)),
    ]
    for t in threads:
        t.start()
    for i in range(30):  # the parent keeps working at the same time
        if comm.all_reduce(np.array([1]))[0] != n:
            bad.append(f"parent {i}")
    for t in threads:
        t.join()
    twin = comm.dup()
    if (twin.rank, twin.size) != (me, n) or twin.all_reduce(np.array([me]))[0] != n * (n - 1) // 2:
        bad.append("dup")
    return bad


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [4, 5])
def test_split_two_and_three_colours_concurrently(n: int, transport: str) -> None:
    assert spmd.run(split_concurrently, n, env=_env(transport)) == [[]] * n


def point_to_point(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """A ring of send/recv with tags, dtypes and sizes; both directions at once with async_op."""
    n, me = comm.size, comm.rank
    right, left = (me + 1) % n, (me - 1) % n
    bad = []
    sizes = [
        (0, "float32"),
        (1, "int8"),
        (7, "bool"),
        (1000, "float64"),
        (1001, "uint16"),
        (333, "complex64"),
        (3_000_000, "int32"),
        (16 << 20, "float32"),
    ]  # the last is 64 MiB
    for count, dtype in sizes:
        mine = (np.arange(count) * (me + 1)).astype(dtype)
        s = comm.send(mine, right, tag=count % 7, async_op=True)
        got = comm.recv(None, left, tag=count % 7)
        s.wait()
        if not np.array_equal(got, (np.arange(count) * (left + 1)).astype(dtype)):
            bad.append(f"ring {count} {dtype}")
    into = np.empty((2, 3), np.float32)
    if me == 0:
        comm.send(np.ones((2, 3), np.float32), 1, tag=5)
    elif me == 1 and (comm.recv(into, 0, tag=5) is not into or not (into == 1).all()):
        bad.append("recv into")
    comm.barrier()
    return bad


@pytest.mark.parametrize("n", [2, 3])
def test_send_recv_ring(n: int) -> None:
    assert spmd.run(point_to_point, n, env={"RINGLET_TRANSPORT": "tcp"}) == [[]] * n


def tags_out_of_order(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """MPI matching: a recv takes the earliest message with its tag; others wait their turn."""
    bad: list[str] = []
    if comm.rank == 0:
        for tag, value in ((1, 10), (2, 20), (1, 11), (3, 30)):
            comm.send(np.full((2, 3), value, np.int32), 1, tag=tag)
        comm.send(np.zeros(4, np.float64), 1, tag=4)
        return bad
    into = np.empty((2, 3), np.int32)
    got = [
        int(comm.recv(None, 0, tag=2)[0, 0]),  # the tag-1 message before it is kept
        int(comm.recv(into, 0, tag=1)[0, 0]),
        int(comm.recv(None, 0, tag=3, async_op=True).wait()[0, 0]),
        int(comm.recv(into, 0, tag=1)[0, 0]),
    ]
    if got != [20, 10, 30, 11]:
        bad.append(f"received {got}, expected [20, 10, 30, 11]")
    try:  # the right tag but the wrong shape: an error, and the message stays for a fitting recv
        comm.recv(np.empty(5, np.float64), 0, tag=4)
        bad.append("a message of the wrong shape was accepted")
    except ringlet.MismatchError as exc:
        if "(4,)" not in str(exc) or "(5,)" not in str(exc):
            bad.append(f"unhelpful mismatch: {exc}")
    if comm.recv(None, 0, tag=4).shape != (4,):
        bad.append("the mismatched message was lost")
    return bad


def test_tags_match_out_of_order() -> None:
    assert spmd.run(tags_out_of_order, 2, env={"RINGLET_TRANSPORT": "tcp"}) == [[], []]


def wrong_tag(comm) -> str:  # type: ignore[no-untyped-def]
    if comm.rank == 0:
        comm.send(np.ones(2), 1, tag=1)
        comm.barrier()
        return "sent"
    try:
        comm.recv(None, 0, tag=2, timeout=1.0)
    except ringlet.CollectiveTimeout as exc:
        return str(exc)
    finally:
        comm.barrier()
    return "no error"


def test_recv_of_a_tag_never_sent_times_out_naming_what_came() -> None:
    out = spmd.run(wrong_tag, 2, env={"RINGLET_TRANSPORT": "tcp"})
    assert "tag 2" in out[1] and "unmatched: tag 1 (float64 (2,))" in out[1], out[1]


def blocking_call_in_callback(comm) -> list[int]:  # type: ignore[no-untyped-def]
    """A done-callback (like a DDP comm hook's) makes a blocking call while other work is queued."""
    comm._worker.submit(lambda: time.sleep(0.3), "hold the progress thread")  # callbacks run there
    seen: list[int] = []
    w1 = comm.all_reduce(np.ones(10), async_op=True)
    w1.add_done_callback(lambda w: seen.append(int(comm.all_reduce(np.array([1]))[0])))
    w2 = comm.all_reduce(np.ones(1000), async_op=True)
    w2.wait(timeout=20)
    w1.wait(timeout=20)
    return seen


def test_blocking_call_from_a_done_callback_does_not_deadlock() -> None:
    assert spmd.run(blocking_call_in_callback, 2, env={"RINGLET_TRANSPORT": "tcp"}, timeout=60) == [
        [2],
        [2],
    ]

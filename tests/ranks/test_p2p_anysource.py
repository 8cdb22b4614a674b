"""recv from any source: ``comm.recv(x, None, tag)`` returns ``(array, source)``.

Rank 0 receives from whichever rank sends first: every sender's distinct array exactly once with
its source, kept messages first, senders served in turn, a timeout naming the ranks that sent
nothing, a PeerError at once when every other rank has left; and torch's ``dist.recv`` without
``src`` on backend "ringlet" returns the sender's rank as Gloo's does.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import ringlet
import spmd
import torch_group

TRANSPORTS = ["tcp", "auto"]
SIZES = [2, 3, 4]


def _env(transport: str) -> dict[str, str]:
    if transport == "auto":
        pytest.importorskip("ringlet.transport.shm")
    return {"RINGLET_TRANSPORT": transport, "RINGLET_TIMEOUT": "30"}


def _payload(rank: int, k: int = 0) -> np.ndarray:
    """Distinct per sender, per message and per element."""
    return np.arange(4, dtype=np.float64) + 100 * rank + 10 * k


def every_sender_once(comm: Any, root: int) -> list[str]:
    """Each sender's array arrives at ``root`` exactly once with its source, sync and async, into
    a given array or a new one; the first sender's message of another tag, read on the way, is
    kept and matched first by a later receive of its tag."""
    n, me = comm.size, comm.rank
    first_sender = (root + 1) % n
    if me != root:
        if me == first_sender:
            comm.send(np.array([-1.0, -2.0]), root, tag=3)  # read while looking for tag 7: kept
        comm.send(_payload(me), root, tag=7)
        if me == first_sender:
            comm.send(np.array([-3.0, -4.0]), root, tag=3)  # after the kept one, same sender
        return []
    bad, seen = [], []
    for k in range(n - 1):
        if k % 2:
            got, src = comm.recv(None, None, tag=7, async_op=True).wait(timeout=30)
        else:
            into = np.empty(4)
            got, src = comm.recv(into, None, tag=7)
            if got is not into:
                bad.append("recv into an array did not return that array")
        seen.append(src)
        if not np.array_equal(got, _payload(src)):
            bad.append(f"from rank {src}: got {got.tolist()}, want {_payload(src).tolist()}")
    if sorted(seen) != sorted(set(range(n)) - {root}):
        bad.append(f"sources {seen}, want every rank but {root} once")
    a, src_a = comm.recv(None, None, tag=3)
    b, src_b = comm.recv(np.empty(2), None, tag=3, async_op=True).wait(timeout=30)
    if (src_a, a.tolist(), src_b, b.tolist()) != (first_sender, [-1, -2], first_sender, [-3, -4]):
        bad.append(
            f"tag 3 in order from rank {first_sender}: got {a} from {src_a}, {b} from {src_b}"
        )
    return bad


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", SIZES)
def test_recv_from_any_source_gets_every_sender_once(n: int, transport: str) -> None:
    assert spmd.run(every_sender_once, n, 0, env=_env(transport), timeout=60) == [[]] * n


@pytest.mark.parametrize("n", [3, 4])
def test_the_last_rank_receives_from_any_source(n: int) -> None:
    """Its peers are lower ranks, which open the connections: it finds them as they connect."""
    assert spmd.run(every_sender_once, n, n - 1, env=_env("tcp"), timeout=60) == [[]] * n


def served_in_turn(comm: Any, k: int) -> list[int]:
    """With ``k`` messages from every sender already arrived, receives take the senders in turn."""
    n, me = comm.size, comm.rank
    if me == 0:  # a first round opens every connection
        for _ in range(n - 1):
            comm.recv(None, None, tag=1)
    else:
        comm.send(np.zeros(1), 0, tag=1)
    comm.barrier()  # nothing of tag 2 was read (and kept) in the first round
    if me != 0:
        for i in range(k):
            comm.send(_payload(me, i), 0, tag=2)
    comm.barrier()  # every message of tag 2 is on its way to rank 0 by now
    if me != 0:
        return []
    sources, counts = [], dict.fromkeys(range(1, n), 0)
    for _ in range((n - 1) * k):
        got, src = comm.recv(None, None, tag=2)
        assert np.array_equal(got, _payload(src, counts[src])), (src, got)
        counts[src] += 1
        sources.append(src)
    return sources


@pytest.mark.parametrize("n", [3, 4])
def test_a_busy_sender_does_not_starve_the_others(n: int) -> None:
    k = 6
    sources = spmd.run(served_in_turn, n, k, env=_env("tcp"), timeout=60)[0]
    for start in range(0, len(sources), n - 1):  # every window of n-1 receives: every sender
        window = sources[start : start + n - 1]
        assert sorted(window) == list(range(1, n)), sources


def nothing_with_the_tag(comm: Any) -> Any:
    """Rank 0 waits for tag 5, which nobody sends (rank 1 sends tag 4): a CollectiveTimeout."""
    me = comm.rank
    out: Any = None
    if me == 1:
        comm.send(np.ones(2), 0, tag=4)
    if me == 0:
        start = time.monotonic()
        try:
            comm.recv(None, None, tag=5, timeout=1.5)
            out = "no error"
        except ringlet.CollectiveTimeout as exc:
            out = (str(exc), list(exc.missing), time.monotonic() - start)
        got, src = comm.recv(None, None, tag=4)  # kept while waiting: still there
        if src != 1 or got.tolist() != [1.0, 1.0]:
            out = f"tag 4 lost: {got} from {src}"
    comm.barrier()  # the senders stay until rank 0 is done
    return out


def _every_layout(fn: Any) -> dict[tuple[int, str], Any]:
    """Rank 0's result of ``fn`` on every size and transport, the jobs at once (they mostly
    wait for a timeout or a departure, so their waits overlap)."""
    envs = {t: _env(t) for t in TRANSPORTS}
    jobs = {
        f"{n} ranks, {t}": (lambda n=n, t=t: spmd.run(fn, n, env=envs[t], timeout=60)[0])
        for n in SIZES
        for t in TRANSPORTS
    }
    outs = spmd.concurrently(jobs)
    return {(n, t): outs[f"{n} ranks, {t}"] for n in SIZES for t in TRANSPORTS}


def test_a_timed_out_recv_from_any_source_names_the_tag_and_ranks() -> None:
    for (n, transport), out in _every_layout(nothing_with_the_tag).items():
        assert isinstance(out, tuple), (n, transport, out)
        message, missing, waited = out
        assert missing == list(range(1, n)), (n, transport, out)
        assert "tag 5" in message and f"ranks {list(range(1, n))}" in message, message
        assert "unmatched: tag 4" in message.replace(" from rank 1", ""), message
        assert 1.4 < waited < 10, (n, transport, waited)


def posted_again(comm: Any) -> list[str]:
    """A receive (any source, or from rank 1) that timed out before anything came may be posted
    again: it gets the message sent later."""
    bad = []
    if comm.rank == 0:
        for src in (None, 1):
            try:
                comm.recv(None, src, tag=8, timeout=0.5)
                bad.append(f"recv from {src} did not time out")
            except ringlet.CollectiveTimeout:
                pass
    comm.barrier()  # now rank 1 sends
    if comm.rank == 1:
        comm.send(np.arange(3.0), 0, tag=8)
        comm.send(np.arange(3.0) + 1, 0, tag=8)
    if comm.rank == 0:
        got, src = comm.recv(None, None, tag=8)
        if (src, got.tolist()) != (1, [0.0, 1.0, 2.0]):
            bad.append(f"any source after a timeout: {got} from {src}")
        if (got := comm.recv(None, 1, tag=8)).tolist() != [1.0, 2.0, 3.0]:
            bad.append(f"from rank 1 after a timeout: {got}")
    return bad


@pytest.mark.parametrize("n", [2, 3])
def test_a_recv_that_timed_out_can_be_posted_again(n: int) -> None:
    assert spmd.run(posted_again, n, env=_env("tcp"), timeout=60) == [[]] * n


def alone(comm: Any) -> str:
    try:
        comm.recv(None, None)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_one_rank_has_no_source_to_receive_from() -> None:
    assert "no other rank" in spmd.run(alone, 1, timeout=30)[0]


def everyone_left(comm: Any) -> Any:
    """The other ranks send one message and leave: it is delivered, then a PeerError at once."""
    if comm.rank != 0:
        if comm.rank == 1:
            comm.send(np.full(3, 7.0), 0, tag=1)
        return None
    got, src = comm.recv(None, None, tag=1)
    start = time.monotonic()
    try:
        comm.recv(None, None, tag=2, timeout=30)
    except ringlet.PeerError as exc:
        return (got.tolist(), src, str(exc), time.monotonic() - start)
    return "no error"


def test_recv_from_any_source_fails_at_once_when_every_peer_left() -> None:
    for (n, transport), out in _every_layout(everyone_left).items():
        assert isinstance(out, tuple), (n, transport, out)
        got, src, message, waited = out
        assert (got, src) == ([7.0] * 3, 1), (n, transport, out)
        assert "no rank is left to send" in message, message
        assert waited < 10, (n, transport, out)


def torch_any_source(comm: Any, port: int) -> list[str]:
    """dist.recv / irecv without src on "ringlet" and on "gloo": the same sources and data; in a
    subgroup the global rank is returned."""
    import torch
    import torch.distributed as dist

    import ringlet.torch  # noqa: F401

    n, me = comm.size, comm.rank
    torch_group.init(comm, port)
    bad: list[str] = []
    try:
        gloo = dist.new_group(backend="gloo")
        last = dist.new_group(ranks=[0, n - 1])
        for name, group in (("ringlet", None), ("gloo", gloo)):
            if me != 0:
                dist.send(torch.full((3,), float(me)), dst=0, group=group, tag=4)
                continue
            seen = []
            for k in range(n - 1):
                t = torch.empty(3)
                if k % 2:
                    work = dist.irecv(t, group=group, tag=4)
                    work.wait()
                    src = work._source_rank()
                else:
                    src = dist.recv(t, group=group, tag=4)
                seen.append(src)
                if not torch.equal(t, torch.full((3,), float(src))):
                    bad.append(f"{name}: from {src} got {t.tolist()}")
            if sorted(seen) != list(range(1, n)):
                bad.append(f"{name}: sources {seen}")
        if me == n - 1:
            dist.send(torch.ones(1), dst=0, group=last)
        if me == 0 and (src := dist.recv(torch.empty(1), group=last)) != n - 1:
            bad.append(f"subgroup [0, {n - 1}]: recv returned {src}, want {n - 1}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize("n", SIZES)
def test_torch_recv_without_src_returns_the_sender(n: int) -> None:
    pytest.importorskip("torch", reason="ringlet.torch needs PyTorch")
    results = spmd.run(torch_any_source, n, spmd.free_port(), env=_env("tcp"), timeout=120)
    assert results == [[]] * n, results

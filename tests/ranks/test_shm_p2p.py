"""The shared-memory point-to-point transport on real processes: every pair, every size, both
copy paths (mailbox slots and cross-memory single copy), mismatches and a dead peer."""

from __future__ import annotations

import functools
import os
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import pytest
from test_shm_spmd import FileExchange

import spmd
from ringlet.errors import CollectiveTimeout, MismatchError, PeerError
from ringlet.transport import shm_p2p
from ringlet.transport.base import Tag
from ringlet.transport.shm_p2p import ShmTransport

SIZES = [0, 1, 7, 4096, 100_000, 200_000, 3_000_000]


def _data(src: int, dst: int, n: int) -> np.ndarray:
    return np.random.default_rng(src * 100 + dst + n).integers(0, 255, n, dtype=np.uint8)


def _open(rank: int, k: int, directory: str, direct: bool) -> ShmTransport:
    if not direct:
        shm_p2p.DIRECT_MIN_BYTES = 1 << 62  # every message through the slots
    return ShmTransport.open(
        rank, k, range(k), job="t", exchange=FileExchange(directory, rank, k), poll=lambda: None
    )


def _all_pairs(rank: int, k: int, directory: str, direct: bool) -> str:
    t = _open(rank, k, directory, direct)
    for i, n in enumerate(SIZES):
        peers = [q for q in range(k) if q != rank]
        got = {q: np.zeros(n, np.uint8) for q in peers}
        sends = [(q, memoryview(_data(rank, q, n))) for q in peers]
        recvs = [(q, memoryview(got[q])) for q in peers]
        t.exchange(sends, recvs, Tag(i, 77, 0, 0), time.monotonic() + 20)
        for q in peers:
            assert np.array_equal(got[q], _data(q, rank, n)), (q, n)
    kind = "direct" if t.direct else "slots"
    t.close()
    return kind


def _odd_receive(rank: int, k: int, directory: str, direct: bool, sig: int, n: int) -> str:
    """Rank 0 sends 16 bytes in call 3 (signature 1); rank 1 expects ``n`` bytes of signature
    ``sig``: the error it reports, or "none"."""
    t = _open(rank, k, directory, direct)
    buf = np.zeros(16, np.uint8)
    try:
        if rank == 0:
            t.exchange([(1, memoryview(buf))], [], Tag(3, 1, 0, 0), time.monotonic() + 2)
        else:
            t.exchange([], [(0, memoryview(buf[:n]))], Tag(3, sig, 0, 0), time.monotonic() + 2)
    except (MismatchError, CollectiveTimeout) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "none"


_mismatch = functools.partial(_odd_receive, sig=2, n=16)  # a peer in another call
_short = functools.partial(_odd_receive, sig=1, n=8)  # the same call, another length


def _dies(rank: int, k: int, directory: str, direct: bool) -> str:
    t = _open(rank, k, directory, direct)
    if rank == 1:
        os._exit(3)
    buf = np.zeros(1 << 20, np.uint8)
    try:
        t.exchange([], [(1, memoryview(buf))], Tag(0, 1, 0, 0), time.monotonic() + 20)
    except PeerError as exc:
        return f"PeerError rank={exc.rank}"
    return "none"


def _child(fn: Any, rank: int, k: int, directory: str, direct: bool, q: Any) -> None:
    try:
        q.put((rank, "ok", fn(rank, k, directory, direct)))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _run(fn: Any, k: int, direct: bool = True, expect: int | None = None) -> list[Any]:
    ctx = spmd.context()
    q = ctx.Queue()
    directory = tempfile.mkdtemp(prefix="ringlet-p2p-")
    procs = [ctx.Process(target=_child, args=(fn, r, k, directory, direct, q)) for r in range(k)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    end = time.monotonic() + 60
    want = k if expect is None else expect
    while len(out) < want and time.monotonic() < end:
        try:
            r, status, value = q.get(timeout=0.2)
        except Exception:
            continue
        out[r] = (status, value)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    bad = {r: v for r, (s, v) in out.items() if s != "ok"}
    assert not bad and len(out) == want, f"ranks failed or timed out: {bad or out}"
    return [out[r][1] for r in sorted(out)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("direct", [True, False])
def test_every_pair_every_size(k: int, direct: bool) -> None:
    kinds = _run(_all_pairs, k, direct)
    assert set(kinds) == {"direct"} if direct else {"slots"}


@pytest.mark.timeout(60)
def test_a_peer_in_another_call_is_a_mismatch() -> None:
    # The sender's small message fits a slot and completes; the receiver sees the wrong call.
    sender, receiver = _run(_mismatch, 2)
    assert sender == "none" and receiver.startswith("MismatchError"), receiver


@pytest.mark.timeout(60)
def test_a_message_of_another_length_is_a_mismatch_naming_both() -> None:
    sender, receiver = _run(_short, 2)
    assert sender == "none" and receiver.startswith("MismatchError"), receiver
    assert "of 16 bytes" in receiver and "of 8 bytes" in receiver, receiver


@pytest.mark.timeout(60)
def test_a_dead_peer_is_a_peer_error() -> None:
    assert _run(_dies, 2, expect=1)[0] == "PeerError rank=1"

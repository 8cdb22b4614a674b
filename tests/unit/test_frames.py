"""Frame headers and hostile peers: fuzzed headers, lying lengths, garbage, wrong secrets, replays.

The transport tests run two TcpTransports of one communicator in this process, over real
loopback sockets and real listeners; the attacker is a raw socket on a thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringlet.errors import AuthenticationError, MismatchError, PeerError, ProtocolError
from ringlet.transport import frames
from ringlet.transport.base import Tag
from ringlet.transport.tcp import TcpTransport
from ringlet.transport.tcp_connect import Listener, connect

SECRET = b"frames-test-secret"
COMM = 7
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


# -- headers ------------------------------------------------------------------------------------
@given(
    kind=st.sampled_from([frames.DATA, frames.ABORT]),
    comm=U64,
    seq=U64,
    rnd=U32,
    seg=U32,
    sig=U64,
    length=U64,
)
def test_a_packed_header_unpacks_to_itself(
    kind: int, comm: int, seq: int, rnd: int, seg: int, sig: int, length: int
) -> None:
    if kind == frames.ABORT:
        length %= frames.MAX_ABORT_PAYLOAD + 1
    header = frames.Header(kind, comm, seq, rnd, seg, sig, length)
    raw = header.pack()
    assert len(raw) == frames.HEADER_SIZE
    assert frames.unpack(raw) == header


@settings(max_examples=300)
@given(st.binary(max_size=2 * frames.HEADER_SIZE))
def test_fuzzed_bytes_unpack_or_raise_value_error(raw: bytes) -> None:
    try:
        header = frames.unpack(raw)
    except ValueError:
        return
    assert len(raw) == frames.HEADER_SIZE and raw[:2] == frames.MAGIC
    assert header.kind in (frames.DATA, frames.ABORT)


@settings(max_examples=300)
@given(
    magic=st.sampled_from([frames.MAGIC, b"RM", b"\x00\x00"]),
    version=st.sampled_from([frames.VERSION, 0, 2, 255]),
    kind=st.integers(0, 255),
    comm=U64,
    seq=U64,
    rnd=U32,
    seg=U32,
    sig=U64,
    length=U64,
)
def test_fuzzed_fields_unpack_or_raise_value_error(
    magic: bytes, version: int, kind: int, **fields: int
) -> None:
    raw = frames.HEADER.pack(magic, version, kind, *fields.values())
    try:
        header = frames.unpack(raw)
    except ValueError as exc:
        assert str(exc)
        return
    assert (magic, version) == (frames.MAGIC, frames.VERSION)
    assert kind in (frames.DATA, frames.ABORT)
    assert kind == frames.DATA or header.length <= frames.MAX_ABORT_PAYLOAD


# -- a pair of transports and an attacker ---------------------------------------------------------
class Pair:
    """Ranks 0 and 1 of one communicator, each with its own listener, in this process."""

    def __init__(self) -> None:
        self.listeners = [Listener("127.0.0.1", SECRET), Listener("127.0.0.1", SECRET)]
        addresses = [lst.address for lst in self.listeners]
        self.ranks = [
            TcpTransport(COMM, r, addresses, self.listeners[r], SECRET, lambda: None)
            for r in range(2)
        ]

    def exchange_ok(self, seq: int, nbytes: int = 1 << 16) -> bool:
        """Rank 0 sends ``nbytes`` to rank 1, which checks them."""
        data = os.urandom(nbytes)
        into = bytearray(nbytes)
        tag = Tag(seq, 0xABC)
        sender = threading.Thread(
            target=self.ranks[0].exchange,
            args=([(1, memoryview(data))], [], tag, time.monotonic() + 5),
        )
        sender.start()
        self.ranks[1].exchange([], [(0, memoryview(into))], tag, time.monotonic() + 5)
        sender.join()
        return bytes(into) == data

    def close(self) -> None:
        for r in (*self.ranks, *self.listeners):
            r.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def _impostor(pair: Pair) -> socket.socket:
    """An authenticated connection to rank 1 that claims to be rank 0 (it knows the secret)."""
    return connect(pair.listeners[1].address, SECRET, COMM, 0, time.monotonic() + 5)


def _receive(pair: Pair, nbytes: int = 16, seq: int = 0) -> BaseException | None:
    """Rank 1 waits for one frame of ``nbytes`` from rank 0; returns what it raised."""
    try:
        pair.ranks[1].exchange(
            [], [(0, memoryview(bytearray(nbytes)))], Tag(seq, 0xABC), time.monotonic() + 5
        )
    except Exception as exc:
        return exc
    return None


def _wait_for(predicate: Callable[[], bool], seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_the_pair_works(pair: Pair) -> None:
    assert pair.exchange_ok(0) and pair.exchange_ok(1, 3 << 20)


def test_a_lying_length_is_rejected_before_any_allocation(pair: Pair) -> None:
    with _impostor(pair) as evil:
        evil.sendall(frames.Header(frames.DATA, COMM, 0, 0, 0, 0xABC, 1 << 40).pack())
        tracemalloc.start()
        try:
            err = _receive(pair)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(err, MismatchError) and "1099511627776 bytes" in str(err), err
    assert peak < 1 << 20, f"{peak} bytes allocated while rejecting the frame"


def test_a_frame_of_another_call_is_a_mismatch(pair: Pair) -> None:
    with _impostor(pair) as evil:
        evil.sendall(frames.Header(frames.DATA, COMM, 5, 0, 0, 0xABC, 16).pack() + bytes(16))
        err = _receive(pair, seq=4)
    assert isinstance(err, MismatchError) and "call #5" in str(err) and "call #4" in str(err)


def test_garbage_from_an_authenticated_peer_is_a_protocol_error(pair: Pair) -> None:
    with _impostor(pair) as evil:
        evil.sendall(os.urandom(frames.HEADER_SIZE - 2) + b"!!")
        err = _receive(pair)
    assert isinstance(err, ProtocolError) and "malformed frame" in str(err), err


def test_an_oversized_abort_is_refused_and_a_proper_one_explains(pair: Pair) -> None:
    with _impostor(pair) as evil:
        evil.sendall(
            frames.Header(frames.ABORT, COMM, 0, 0, 0, 0, frames.MAX_ABORT_PAYLOAD + 1).pack()
        )
        err = _receive(pair)
    assert isinstance(err, ProtocolError) and "exceeds" in str(err), err
    pair.ranks[1].close()  # forget the impostor's socket; the next one connects anew
    reason = b"rank 0 ran out of patience"
    with _impostor(pair) as evil:
        evil.sendall(frames.Header(frames.ABORT, COMM, 0, 0, 0, 0, len(reason)).pack() + reason)
        err = _receive(pair)
    assert isinstance(err, PeerError) and err.rank == 0 and "out of patience" in str(err), err


class _Unpickled:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("attack", ["short", "garbage", "pickle", "frame", "silent-close"])
def test_unauthenticated_bytes_are_dropped_and_logged(
    pair: Pair, attack: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "unpickled"
    payload = {
        "short": b"RINGLET",
        "garbage": os.urandom(1 << 16),
        "pickle": pickle.dumps(_Unpickled(str(marker))) * 100,
        "frame": frames.Header(frames.DATA, COMM, 0, 0, 0, 0xABC, 16).pack() + bytes(16),
        "silent-close": b"",
    }[attack]
    caplog.set_level(logging.WARNING, logger="ringlet.tcp")
    with socket.create_connection(pair.listeners[1].address, timeout=5) as raw:
        try:
            raw.sendall(payload)
            raw.shutdown(socket.SHUT_WR)
            raw.recv(1 << 16)
        except OSError:
            pass  # the listener may reset the connection, leaving our bytes unread
    assert _wait_for(lambda: "dropped connection" in caplog.text), caplog.text
    assert not marker.exists()
    with pytest.raises(TimeoutError):  # the listener did not take it for a peer
        pair.listeners[1].take(COMM, 0, time.monotonic() + 0.2, lambda: None)
    assert pair.exchange_ok(0)


def test_a_wrong_secret_is_dropped_and_logged(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ringlet.tcp")
    with pytest.raises(AuthenticationError, match=r"secret|closed"):
        connect(pair.listeners[1].address, b"guessed", COMM, 0, time.monotonic() + 5)
    assert _wait_for(lambda: "secret" in caplog.text), caplog.text
    assert pair.exchange_ok(0)


def test_a_replayed_handshake_is_dropped(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes recorded from a genuine connection do not open a second one: the nonces differ."""
    caplog.set_level(logging.WARNING, logger="ringlet.tcp")
    recorded = bytearray()
    front = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:  # a man in the middle that records what the genuine client sends
        client, _ = front.accept()
        upstream = socket.create_connection(pair.listeners[1].address)
        for a, b, keep in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(
                target=_pump, args=(a, b, recorded if keep else None), daemon=True
            ).start()

    threading.Thread(target=relay, daemon=True).start()
    genuine = connect(front.getsockname(), SECRET, COMM, 0, time.monotonic() + 5)
    assert _wait_for(lambda: len(recorded) >= 8 + 32 + 32 + struct.calcsize("<QI"))
    pair.listeners[1].take(COMM, 0, time.monotonic() + 2, lambda: None).close()
    genuine.close()
    front.close()
    with socket.create_connection(pair.listeners[1].address, timeout=5) as replay:
        replay.sendall(bytes(recorded))
        try:
            replay.recv(1 << 10)
        except OSError:
            pass
    assert _wait_for(lambda: "failed to prove" in caplog.text), caplog.text
    with pytest.raises(TimeoutError):
        pair.listeners[1].take(COMM, 0, time.monotonic() + 0.2, lambda: None)


def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    try:
        while chunk := src.recv(1 << 16):
            if record is not None:
                record.extend(chunk)
            dst.sendall(chunk)
    except OSError:
        pass

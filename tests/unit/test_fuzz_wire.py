"""Fuzzing every decoder that reads bytes from the network (hypothesis): the frame header between
ranks, the acceptor's side of the handshake, the rendezvous store's requests (behind its gate and
after it) and the store client's reading of answers.

Random and mutated messages, truncated and oversized headers: only the documented errors are
raised, nothing is allocated because a header claims it (tracemalloc's peak stays far below the
sizes claimed), the server answers no more than a real answer holds, and a real client is served
normally afterwards. A real server on localhost in this process; no processes are started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringlet import auth, gate
from ringlet.errors import AuthenticationError, PeerError, RingletError
from ringlet.rendezvous import Store, StoreServer
from ringlet.rendezvous.wire import (
    AUTH_CONTEXT,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    REQUEST,
    RESPONSE,
    Op,
    Status,
)
from ringlet.transport import frames

SECRET = b"fuzz-secret"
JOB = "fuzz-job"
pytestmark = pytest.mark.timeout(120)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
NETWORK = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
CLAIMED = 32 << 20  # headers below claim at least this much; the peak must stay far below it


def _lengths(limit: int) -> st.SearchStrategy[int]:
    """Small, near the limit, over it, and the largest the field can hold."""
    top = (1 << 64) - 1 if limit == MAX_VALUE_BYTES else (1 << 32) - 1
    return st.one_of(
        st.integers(0, 64),
        st.integers(limit - 2, limit + 2),
        st.integers(CLAIMED, top),
        st.just(top),
    )


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with bytes replaced at the given positions, then truncated to ``cut`` bytes."""
    out = bytearray(data)
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


# -- the frame header between ranks ---------------------------------------------------------------
def _check_unpack(raw: bytes) -> None:
    try:
        header = frames.unpack(raw)
    except ValueError:
        return
    assert len(raw) == frames.HEADER_SIZE and header.pack() == raw
    assert header.kind in (frames.DATA, frames.ABORT)
    assert header.kind != frames.ABORT or header.length <= frames.MAX_ABORT_PAYLOAD


@FAST
@given(st.binary(max_size=3 * frames.HEADER_SIZE))
def test_frame_decoder_on_random_bytes_raises_only_value_error(raw: bytes) -> None:
    _check_unpack(raw)


U64 = st.integers(0, (1 << 64) - 1)


@FAST
@given(
    kind=st.sampled_from([frames.DATA, frames.ABORT]),
    fields=st.tuples(U64, U64, st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1), U64),
    length=U64,
    flips=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, frames.HEADER_SIZE + 4),
)
def test_frame_decoder_on_mutated_and_truncated_headers(
    kind: int,
    fields: tuple[int, int, int, int, int],
    length: int,
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    comm, seq, rnd, seg, sig = fields
    valid = frames.Header(kind, comm, seq, rnd, seg, sig, length).pack()
    _check_unpack(_mutate(valid, flips, cut))
    _check_unpack(valid + b"\0")  # one byte too many is a bad size, not a frame


# -- the handshake, acceptor side ------------------------------------------------------------------
def _transcript(handshake: auth.AcceptorHandshake, extra: bytes) -> bytes:
    """What an honest initiator sends this acceptor: hello, proof, then the extra bytes."""
    hello = bytes(handshake.outgoing)
    nonce_a = hello[len(auth.MAGIC) : len(auth.MAGIC) + auth.NONCE_BYTES]
    nonce_i = os.urandom(auth.NONCE_BYTES)
    job = auth.job_field(JOB)
    proof = auth._proof(SECRET, b"I", AUTH_CONTEXT, job, nonce_a, nonce_i)
    return auth.MAGIC + nonce_i + job + proof + extra


def _feed(handshake: auth.AcceptorHandshake, data: bytes, chunks: list[int]) -> None:
    """Hand ``data`` over as a selector server does: never more than ``wanted()`` at a time."""
    sizes = iter(chunks)
    while data and not handshake.done:
        wanted = handshake.wanted()
        assert 0 < wanted <= auth.HELLO_BYTES  # what it will hold before authenticating
        step = min(wanted, max(1, next(sizes, wanted)), len(data))
        handshake.received(data[:step])
        data = data[step:]


@FAST
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
    cut=st.none() | st.integers(0, auth.HELLO_BYTES + auth.MAC_BYTES + 4),
    chunks=st.lists(st.integers(1, 200), max_size=20),
    garbage=st.none() | st.binary(max_size=400),
)
def test_handshake_accepts_only_the_honest_transcript(
    flips: list[tuple[int, int]], cut: int | None, chunks: list[int], garbage: bytes | None
) -> None:
    handshake = auth.AcceptorHandshake(SECRET, context=AUTH_CONTEXT, job=JOB, extra=4)
    honest = _transcript(handshake, b"RANK")
    sent = garbage if garbage is not None else _mutate(honest, flips, cut)
    # a transcript differing anywhere before the extra bytes cannot authenticate
    authentic = sent[: len(honest) - 4] == honest[:-4] and len(sent) >= len(honest)
    try:
        _feed(handshake, sent, chunks)
    except AuthenticationError:
        assert not authentic and not handshake.done
        return
    assert handshake.done == authentic, (handshake.done, authentic)
    if authentic:
        assert handshake.extra == sent[len(honest) - 4 : len(honest)]
        with pytest.raises(AuthenticationError):  # not one byte more than the handshake allows
            handshake.received(b"x")


# -- the rendezvous store: a real server in this process --------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[StoreServer]:
    with StoreServer("127.0.0.1", 0, SECRET, job=JOB, auth_timeout=2.0) as srv:
        yield srv


def _exchange(port: int, data: bytes, *, authenticated: bool) -> bytes:
    """Connect, (authenticate,) send ``data``, end our side, return all the server sent back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    with sock:
        if authenticated:
            auth.authenticate(
                sock, SECRET, initiator=True, timeout=5.0, context=AUTH_CONTEXT, job=JOB
            )
        with contextlib.suppress(OSError):  # the server may have dropped us already
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        sock.settimeout(10.0)  # a WAIT notices our end within a second; slack for a busy machine
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                answer += chunk
                assert len(answer) <= 4 * MAX_KEY_BYTES + 4096, "the server sent more than asked"
        return bytes(answer)


def _served_normally(server: StoreServer, tag: str) -> None:
    """A real client, after the fuzzing: every operation answers as it should."""
    with Store("127.0.0.1", server.port, SECRET, timeout=5.0, job=JOB) as client:
        client.set(f"after-{tag}", b"value")
        assert client.get(f"after-{tag}") == b"value"
        assert client.add(f"count-{tag}", 3) == 3
        assert client.delete(f"after-{tag}") and client.try_get(f"after-{tag}") is None


@contextlib.contextmanager
def _peak_allocation(limit: int) -> Iterator[None]:
    """Fail if this process allocates more than ``limit`` bytes at once inside the block."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)"


def test_the_gate_drops_random_bytes_and_the_store_keeps_serving(server: StoreServer) -> None:
    """Unauthenticated: random bytes and mutated hellos get no answer but our hello, and never
    reach the store (nothing in them is acted on)."""
    hello = auth.MAGIC + os.urandom(auth.NONCE_BYTES) + auth.job_field(JOB)

    @NETWORK
    @given(
        garbage=st.binary(max_size=300)
        | st.builds(
            _mutate,
            st.just(hello + os.urandom(auth.MAC_BYTES)),
            st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
            st.none() | st.integers(0, 200),
        )
    )
    def run(garbage: bytes) -> None:
        answer = _exchange(server.port, garbage, authenticated=False)
        assert len(answer) <= auth.HELLO_BYTES, answer  # the gate's hello, nothing else

    with _peak_allocation(CLAIMED // 4):
        run()
    assert server.pending <= gate.MAX_PENDING
    _served_normally(server, "gate")


REQUESTS = st.builds(
    lambda op, key, value, second, argument, body: (
        REQUEST.pack(op, key, value, second, argument) + body
    ),
    op=st.sampled_from([int(o) for o in Op]) | st.integers(0, 255),
    key=_lengths(MAX_KEY_BYTES),
    value=_lengths(MAX_VALUE_BYTES),
    second=_lengths(MAX_VALUE_BYTES),
    argument=st.sampled_from([-1, 0, 1, 50]) | st.integers(-(1 << 63), (1 << 63) - 1),
    body=st.binary(max_size=200),
)


def _answers_are_well_formed(answer: bytes) -> None:
    """Whole answers: a known status, a value exactly as long as its header says."""
    while len(answer) >= RESPONSE.size:
        status, length, _ = RESPONSE.unpack(answer[: RESPONSE.size])
        assert status in Status._value2member_map_ and length <= len(answer) - RESPONSE.size
        answer = answer[RESPONSE.size + length :]
    assert not answer, f"a truncated answer: {answer!r}"


def test_store_requests_random_mutated_truncated_oversized(server: StoreServer) -> None:
    """Authenticated: any request header with any (short) body — unknown op codes, lengths over
    the limits or up to 2**64-1, bodies shorter than claimed, bad UTF-8 — is answered well-formed
    or dropped, the server never allocates what a header claims, and goes on serving."""

    @NETWORK
    @given(requests=st.lists(REQUESTS, min_size=1, max_size=3), cut=st.integers(0, 64))
    def run(requests: list[bytes], cut: int) -> None:
        data = b"".join(requests)
        data = data[: len(data) - cut] if cut < len(data) else data  # truncated anywhere
        _answers_are_well_formed(_exchange(server.port, data, authenticated=True))

    with _peak_allocation(CLAIMED // 4):
        run()
    _served_normally(server, "requests")


# -- the store client reading answers from a hostile server ---------------------------------------
class _HostileServer:
    """Authenticates every client, reads its request and answers with whatever ``reply`` is."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply = b""
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, AuthenticationError):
                auth.authenticate(
                    conn, SECRET, initiator=False, timeout=5.0, context=AUTH_CONTEXT, job=JOB
                )
                conn.settimeout(5.0)
                conn.recv(1 << 16)  # the request (small here)
                conn.sendall(self.reply)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(1.0)
                while conn.recv(1 << 16):
                    pass

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def hostile() -> Iterator[_HostileServer]:
    srv = _HostileServer()
    yield srv
    srv.close()


ANSWERS = st.builds(
    lambda status, length, argument, body, cut: (RESPONSE.pack(status, length, argument) + body)[
        : None if cut is None else cut
    ],
    status=st.integers(0, 255),
    length=_lengths(MAX_VALUE_BYTES),
    argument=st.integers(-(1 << 63), (1 << 63) - 1),
    body=st.binary(max_size=64),
    cut=st.none() | st.integers(0, RESPONSE.size + 8),
)


def test_store_client_on_hostile_answers_raises_only_ringlet_errors(
    hostile: _HostileServer,
) -> None:
    """A server that knows the secret but answers nonsense: the client raises PeerError (or says
    what it got), never struct errors, never allocates a claimed length."""

    @NETWORK
    @given(reply=ANSWERS | st.binary(max_size=64))
    def run(reply: bytes) -> None:
        hostile.reply = reply
        with Store("127.0.0.1", hostile.port, SECRET, timeout=3.0, job=JOB) as client:
            try:
                value = client.try_get("key")
            except (PeerError, RingletError, ValueError, TimeoutError):
                return
            assert value is None or len(value) <= len(reply)

    with _peak_allocation(CLAIMED // 4):
        run()

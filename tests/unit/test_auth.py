"""The HMAC handshake over real socket pairs, one side per thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ringlet.auth import (
    HELLO_BYTES,
    MAGIC,
    NONCE_BYTES,
    AcceptorHandshake,
    JobMismatchError,
    authenticate,
    job_field,
    job_secret,
    secret_from_str,
)
from ringlet.errors import AuthenticationError, RingletError

SECRET = b"s3cret-for-tests"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def _run_both(
    left_side: Callable[[], None], right_side: Callable[[], None]
) -> tuple[BaseException | None, BaseException | None]:
    """Run the two ends concurrently; return what each raised (None for success)."""
    outcome: list[BaseException | None] = [None, None]

    def run(index: int, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            outcome[index] = exc

    threads = [threading.Thread(target=run, args=(0, left_side))]
    threads[0].start()
    run(1, right_side)
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()
    return outcome[0], outcome[1]


def _handshake(
    pair: tuple[socket.socket, socket.socket],
    left_secret: bytes = SECRET,
    right_secret: bytes = SECRET,
    *,
    left_initiator: bool = True,
    right_initiator: bool = False,
    left_context: bytes = b"",
    right_context: bytes = b"",
    on_failure_close: bool = True,
) -> tuple[BaseException | None, BaseException | None]:
    left, right = pair

    def side(sock: socket.socket, secret: bytes, initiator: bool, context: bytes) -> None:
        try:
            authenticate(sock, secret, initiator=initiator, timeout=5.0, context=context)
        except AuthenticationError:
            if on_failure_close:
                sock.close()  # what every caller does: the peer then sees the connection end
            raise

    return _run_both(
        lambda: side(left, left_secret, left_initiator, left_context),
        lambda: side(right, right_secret, right_initiator, right_context),
    )


def test_same_secret_authenticates_both_sides(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    assert _handshake(pair) == (None, None)
    # The connection is still usable afterwards: nothing extra was left unread.
    pair[0].sendall(b"after")
    assert pair[1].recv(5) == b"after"


def test_wrong_secret_fails_on_both_sides(pair: tuple[socket.socket, socket.socket]) -> None:
    initiator_error, acceptor_error = _handshake(pair, SECRET, b"another secret")
    assert isinstance(acceptor_error, AuthenticationError)
    assert "secret" in str(acceptor_error)
    assert isinstance(initiator_error, AuthenticationError)
    assert isinstance(initiator_error, RingletError)


def test_two_initiators_fail_because_roles_are_in_the_proof(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Two ends of the same role exchange nonces; a proof made for one role never verifies as the
    # other, so echoing the peer's own messages back cannot authenticate.
    left_error, right_error = _handshake(pair, left_initiator=True, right_initiator=True)
    assert isinstance(left_error, AuthenticationError)
    assert isinstance(right_error, AuthenticationError)


def test_reflecting_the_initiators_messages_fails(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair

    def mirror() -> None:  # an attacker without the secret echoes every byte back
        hello = right.recv(HELLO_BYTES, socket.MSG_WAITALL)
        right.sendall(hello)
        proof = right.recv(32, socket.MSG_WAITALL)
        right.sendall(proof)

    initiator_error, _ = _run_both(
        lambda: authenticate(left, SECRET, initiator=True, timeout=5.0), mirror
    )
    assert isinstance(initiator_error, AuthenticationError)


def test_different_context_fails(pair: tuple[socket.socket, socket.socket]) -> None:
    errors = _handshake(pair, left_context=b"store", right_context=b"transport")
    assert all(isinstance(e, AuthenticationError) for e in errors)


def test_garbage_peer_is_told_apart_from_a_wrong_secret(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    right.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 20)
    with pytest.raises(AuthenticationError, match="not a ringlet process"):
        authenticate(left, SECRET, initiator=False, timeout=5.0)


def test_other_protocol_version_is_named(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    right.sendall(MAGIC[:-1] + b"\x09" + b"n" * NONCE_BYTES)
    with pytest.raises(AuthenticationError, match="version 9"):
        authenticate(left, SECRET, initiator=True, timeout=5.0)


def test_peer_closing_early_is_a_short_read(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair

    def half_hello() -> None:
        right.recv(HELLO_BYTES, socket.MSG_WAITALL)
        right.sendall(MAGIC[:4])
        right.close()

    error, _ = _run_both(
        lambda: authenticate(left, SECRET, initiator=True, timeout=5.0), half_hello
    )
    assert isinstance(error, AuthenticationError)
    assert "closed the connection" in str(error)
    assert "after 4 of" in str(error)


def test_silent_peer_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _ = pair
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="timed out"):
        authenticate(left, SECRET, initiator=True, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3.0


def test_previous_socket_timeout_is_restored(pair: tuple[socket.socket, socket.socket]) -> None:
    pair[0].settimeout(7.5)
    pair[1].settimeout(None)
    assert _handshake(pair) == (None, None)
    assert pair[0].gettimeout() == 7.5
    assert pair[1].gettimeout() is None
    left, right = socket.socketpair()
    try:
        left.settimeout(2.5)
        with pytest.raises(AuthenticationError):
            authenticate(left, SECRET, initiator=True, timeout=0.1)
        assert left.gettimeout() == 2.5
    finally:
        left.close()
        right.close()


def test_over_tcp_with_real_connect_and_accept() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            server, _ = listener.accept()
            with server:
                assert _handshake((client, server)) == (None, None)


def test_job_secret_is_fresh_hex() -> None:
    first, second = job_secret(), job_secret()
    assert first != second
    assert len(first) == 64
    assert bytes.fromhex(first.decode("ascii"))
    assert secret_from_str(first.decode("ascii")) == first


def test_secret_from_str() -> None:
    assert secret_from_str("  abc\n") == b"abc"
    assert secret_from_str("naïve") == "naïve".encode()
    with pytest.raises(ValueError, match="empty"):
        secret_from_str("  ")
    with pytest.raises(TypeError):
        secret_from_str(b"abc")  # type: ignore[arg-type]


def test_bad_arguments_are_local_errors(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(TypeError):
        authenticate(pair[0], "text", initiator=True, timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        authenticate(pair[0], SECRET, initiator=True, timeout=0)


def test_two_jobs_are_told_apart_by_name_on_both_sides(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    errors = _run_both(
        lambda: authenticate(left, SECRET, initiator=True, timeout=5.0, job="job-b"),
        lambda: authenticate(right, SECRET, initiator=False, timeout=5.0, job="job-a"),
    )
    for error in errors:
        assert isinstance(error, JobMismatchError)
        assert "'job-a'" in str(error) and "'job-b'" in str(error)


def test_job_field_is_fixed_size_and_hashes_long_ids() -> None:
    assert job_field("") == b"\0" * 64 and job_field("slurm:42.0").startswith(b"slurm:42.0\0")
    long = job_field("x" * 100)
    assert len(long) == 64 and long.startswith(b"sha256:") and long != job_field("x" * 101)


def _drive_acceptor(sock: socket.socket, handshake: AcceptorHandshake) -> None:
    """What a selector loop does, on a blocking socket: send what is due, read what is wanted."""
    while not handshake.done:
        sock.sendall(handshake.outgoing)
        handshake.outgoing.clear()
        data = sock.recv(handshake.wanted())
        if not data:
            raise AuthenticationError("closed")
        handshake.received(data)
    sock.sendall(handshake.outgoing)


def test_acceptor_state_machine_meets_the_blocking_initiator(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    handshake = AcceptorHandshake(SECRET, context=b"c", job="j", extra=4)

    def initiator() -> None:
        authenticate(left, SECRET, initiator=True, timeout=5.0, context=b"c", job="j")
        left.sendall(b"rank")

    errors = _run_both(initiator, lambda: _drive_acceptor(right, handshake))
    assert errors == (None, None) and handshake.done and handshake.extra == b"rank"


def test_acceptor_state_machine_refuses_a_wrong_secret_before_proving_itself(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    handshake = AcceptorHandshake(SECRET)
    sent_before = bytes(handshake.outgoing)

    def initiator() -> None:
        try:
            authenticate(left, b"other", initiator=True, timeout=5.0)
        finally:
            left.close()

    def acceptor() -> None:
        try:
            _drive_acceptor(right, handshake)
        finally:
            right.close()  # as the gate does: the initiator sees the end at once

    errors = _run_both(initiator, acceptor)
    assert isinstance(errors[1], AuthenticationError) and "failed to prove" in str(errors[1])
    assert isinstance(errors[0], AuthenticationError)
    assert len(sent_before) == HELLO_BYTES and not handshake.done


def test_acceptor_state_machine_never_takes_more_than_it_wants() -> None:
    handshake = AcceptorHandshake(SECRET)
    assert handshake.wanted() == HELLO_BYTES and not handshake.started
    with pytest.raises(AuthenticationError, match="more than the handshake allows"):
        handshake.received(b"x" * (HELLO_BYTES + 1))
    with pytest.raises(AuthenticationError, match="not a ringlet process"):
        AcceptorHandshake(SECRET).received(b"GET / HTTP/1.1")

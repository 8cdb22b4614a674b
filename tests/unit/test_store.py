"""The rendezvous store over real sockets: a real server in-process, clients in threads."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ringlet.auth import JobMismatchError, authenticate
from ringlet.errors import AuthenticationError, CollectiveTimeout, PeerError, RingletError
from ringlet.gate import MAX_PENDING, Gate
from ringlet.rendezvous import PrefixStore, Store, StoreServer
from ringlet.rendezvous import server as server_module
from ringlet.rendezvous.wire import AUTH_CONTEXT, MAX_KEY_BYTES, MAX_VALUE_BYTES, REQUEST, Op

SECRET = b"store-test-secret"
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server() -> Iterator[StoreServer]:
    with StoreServer("127.0.0.1", 0, SECRET) as srv:
        yield srv


@pytest.fixture
def connect(server: StoreServer) -> Iterator[Callable[[], Store]]:
    clients: list[Store] = []

    def make() -> Store:
        client = Store("127.0.0.1", server.port, SECRET, timeout=5.0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _authenticated_raw_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    authenticate(sock, SECRET, initiator=True, timeout=5.0, context=AUTH_CONTEXT)
    return sock


def _wait_closed_by_server(sock: socket.socket) -> None:
    """Block until the server closes ``sock`` (recv sees EOF or a reset)."""
    sock.settimeout(5.0)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


def _server_still_serves(server: StoreServer, key: str = "alive") -> None:
    with Store("127.0.0.1", server.port, SECRET, timeout=5.0) as client:
        client.set(key, b"yes")
        assert client.get(key) == b"yes"


def test_set_get_try_get_delete(connect: Callable[[], Store]) -> None:
    store = connect()
    assert store.try_get("k") is None
    store.set("k", b"v1")
    assert store.get("k") == b"v1"
    store.set("k", bytearray(b"v2"))  # type: ignore[arg-type]
    assert store.try_get("k") == b"v2"
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.try_get("k") is None
    store.set("empty", b"")
    assert store.get("empty") == b""
    binary = bytes(range(256)) * 4096  # 1 MiB with every byte value, zeros included
    store.set("ключ/binary", binary)
    assert connect().get("ключ/binary") == binary


def test_add_and_compare_set_semantics(connect: Callable[[], Store]) -> None:
    store = connect()
    assert store.add("n", 5) == 5
    assert store.add("n", -7) == -2
    assert store.get("n") == b"-2"
    store.set("text", b"abc")
    with pytest.raises(ValueError, match="not an integer"):
        store.add("text", 1)
    # torch TCPStore's compare_set rules
    assert store.compare_set("c", b"", b"first") == b"first"
    assert store.compare_set("c", b"wrong", b"x") == b"first"
    assert store.compare_set("c", b"first", b"second") == b"second"
    assert store.compare_set("missing", b"expected", b"x") == b"expected"
    assert store.try_get("missing") is None


def test_get_waits_until_another_client_sets(connect: Callable[[], Store]) -> None:
    waiter, setter = connect(), connect()
    timer = threading.Timer(0.3, setter.set, args=("late", b"here"))
    started = time.monotonic()
    timer.start()
    assert waiter.get("late", timeout=5.0) == b"here"
    assert 0.25 < time.monotonic() - started < 3.0
    timer.join()


def test_get_timeout_is_a_builtin_timeout_naming_the_key(connect: Callable[[], Store]) -> None:
    store = connect()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="'never'") as info:
        store.get("never", timeout=0.3)
    assert not isinstance(info.value, RingletError)
    assert 0.25 < time.monotonic() - started < 3.0
    store.set("now", b"1")  # the connection is still in step after a timeout
    assert store.get("now", timeout=0) == b"1"


def test_wait_for_several_keys(connect: Callable[[], Store]) -> None:
    store, setter = connect(), connect()
    threading.Timer(0.1, setter.set, args=("a", b"1")).start()
    threading.Timer(0.2, setter.set, args=("b", b"2")).start()
    store.wait(["a", "b"], timeout=5.0)
    with pytest.raises(TimeoutError) as info:
        store.wait(["a", "x", "b", "y"], timeout=0.2)
    assert "['x', 'y']" in str(info.value)


def test_add_is_atomic_across_clients_and_threads(connect: Callable[[], Store]) -> None:
    shared = connect()
    clients = [connect(), connect(), shared, shared]
    per_thread = 150
    results: list[list[int]] = [[] for _ in clients]

    def hammer(index: int) -> None:
        results[index] = [clients[index].add("counter", 1) for _ in range(per_thread)]

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    total = per_thread * len(clients)
    assert sorted(v for r in results for v in r) == list(range(1, total + 1))  # no value twice
    assert shared.get("counter") == str(total).encode()


def test_a_thread_blocked_in_get_does_not_block_the_same_client(
    connect: Callable[[], Store],
) -> None:
    store = connect()
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append(store.get("signal", timeout=10.0)))
    waiter.start()
    time.sleep(0.2)  # let the waiter's request reach the server
    store.set("signal", b"go")  # same client object, other thread
    waiter.join(timeout=5.0)
    assert got == [b"go"]


def test_wrong_secret_is_rejected_and_others_are_served(
    server: StoreServer, connect: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    good = connect()
    good.set("k", b"v")
    with caplog.at_level(logging.WARNING, logger="ringlet.store"):
        with pytest.raises(AuthenticationError, match=f"127.0.0.1:{server.port}"):
            Store("127.0.0.1", server.port, b"not the secret", timeout=5.0)
        deadline = time.monotonic() + 5.0
        while not any("dropped connection" in r.message for r in caplog.records):
            assert time.monotonic() < deadline, "the server did not log the rejected client"
            time.sleep(0.02)
    assert good.get("k") == b"v"
    _server_still_serves(server)


def test_requests_without_authentication_are_not_acted_on(server: StoreServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as raw:
        key = b"intruder"
        raw.sendall(REQUEST.pack(Op.SET, len(key), 3, 0, 0) + key + b"bad" + b"\0" * 64)
        _wait_closed_by_server(raw)
    with Store("127.0.0.1", server.port, SECRET, timeout=5.0) as client:
        assert client.try_get("intruder") is None


def test_garbage_is_dropped_without_harm(server: StoreServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as raw:
        raw.sendall(os.urandom(4096))
        _wait_closed_by_server(raw)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as raw:
        raw.sendall(b"\x00")  # then hang up in the middle of the handshake
    _server_still_serves(server)


@pytest.mark.parametrize(
    "header",
    [
        REQUEST.pack(Op.SET, 3, 1 << 40, 0, 0),  # a terabyte value
        REQUEST.pack(Op.COMPARE_SET, 3, 1, MAX_VALUE_BYTES + 1, 0),
        REQUEST.pack(Op.GET, MAX_KEY_BYTES + 1, 0, 0, 0),
        REQUEST.pack(Op.SET, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0),
        REQUEST.pack(99, 1, 0, 0, 0),  # unknown operation
    ],
    ids=["huge-value", "huge-second-value", "long-key", "all-ones", "unknown-op"],
)
def test_bad_headers_drop_the_client_without_allocating(
    server: StoreServer, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="ringlet.store"):
            with _authenticated_raw_socket(server.port) as raw:
                raw.sendall(header + b"abc")
                _wait_closed_by_server(raw)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"the server allocated {peak} bytes for a rejected header"
    assert any("dropped client" in r.message for r in caplog.records)
    _server_still_serves(server)


def test_a_claimed_value_is_not_preallocated(server: StoreServer) -> None:
    # Within the limits, but the bytes never come: memory must follow what actually arrives.
    tracemalloc.start()
    try:
        with _authenticated_raw_socket(server.port) as raw:
            raw.sendall(REQUEST.pack(Op.SET, 1, MAX_VALUE_BYTES, 0, 0) + b"k" + b"x" * 1000)
            time.sleep(0.3)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"the server allocated {peak} bytes for a value that never came"
    _server_still_serves(server)


def test_dead_server_is_a_peer_error_naming_the_store(connect: Callable[[], Store]) -> None:
    server = StoreServer("127.0.0.1", 0, SECRET)
    server.start()
    store = Store("127.0.0.1", server.port, SECRET, timeout=5.0)
    try:
        store.set("k", b"v")
        server.close()
        server.close()  # idempotent
        with pytest.raises(PeerError, match=f"rendezvous store at 127.0.0.1:{server.port} is gone"):
            store.get("k")
        with pytest.raises(PeerError):  # and it stays gone, at once
            store.set("k", b"v")
    finally:
        store.close()


def test_server_dying_wakes_a_blocked_get_with_a_peer_error() -> None:
    server = StoreServer("127.0.0.1", 0, SECRET)
    server.start()
    store = Store("127.0.0.1", server.port, SECRET, timeout=5.0)
    errors: list[BaseException] = []

    def blocked_get() -> None:
        try:
            store.get("never", timeout=20.0)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=blocked_get)
    waiter.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.close()
    waiter.join(timeout=5.0)
    store.close()
    assert time.monotonic() - started < 3.0
    assert len(errors) == 1
    assert isinstance(errors[0], PeerError)


def test_client_retries_until_the_server_starts() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    servers: list[StoreServer] = []

    def start_late() -> None:
        time.sleep(0.4)
        servers.append(StoreServer("127.0.0.1", port, SECRET))
        servers[0].start()

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with Store("127.0.0.1", port, SECRET, timeout=10.0) as store:
            store.set("k", b"v")
            assert store.get("k") == b"v"
    finally:
        starter.join()
        for srv in servers:
            srv.close()


def test_unreachable_server_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=f"127.0.0.1:{port}") as info:
        Store("127.0.0.1", port, SECRET, timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert 0.4 < time.monotonic() - started < 3.0


def test_client_a_waiting_server_lost_does_not_hurt_others(
    server: StoreServer, connect: Callable[[], Store]
) -> None:
    leaver = connect()
    threading.Thread(target=lambda: _ignore_errors(leaver.get, "never", 20.0)).start()
    time.sleep(0.2)
    leaver.close()  # closes the connection under its blocked get
    _server_still_serves(server)


def _ignore_errors(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def test_local_argument_errors(connect: Callable[[], Store]) -> None:
    store = connect()
    with pytest.raises(TypeError):
        store.set("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.set(b"k", b"v")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="longer than"):
        store.set("k" * (MAX_KEY_BYTES + 1), b"v")
    with pytest.raises(ValueError, match="at most"):
        store.set("k", bytes(MAX_VALUE_BYTES + 1))
    with pytest.raises(TypeError):
        store.add("k", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.get("k", timeout=-1)
    store.set("k", b"still fine")
    assert store.get("k") == b"still fine"


def test_closed_client_says_so(connect: Callable[[], Store]) -> None:
    store = connect()
    store.close()
    store.close()
    with pytest.raises(RingletError, match="closed"):
        store.set("k", b"v")


def test_prefix_store_namespaces_keys(connect: Callable[[], Store]) -> None:
    base = connect()
    left, right = PrefixStore("left", base), PrefixStore("right", base)
    nested = PrefixStore("inner", left)
    left.set("k", b"L")
    right.set("k", b"R")
    nested.set("k", b"N")
    assert (left.get("k"), right.get("k"), nested.get("k")) == (b"L", b"R", b"N")
    assert base.get("left/k") == b"L"
    assert base.get("left/inner/k") == b"N"
    assert left.add("n", 2) == 2 and right.try_get("n") is None
    assert left.compare_set("k", b"L", b"L2") == b"L2"
    left.wait(["k", "n"], timeout=1.0)
    with pytest.raises(TimeoutError, match="left/missing"):
        left.get("missing", timeout=0.1)
    assert left.delete("k") and base.try_get("left/k") is None
    left.close()  # the view does not own the store
    assert base.get("right/k") == b"R"


def test_held_connections_are_bounded_and_age_out() -> None:
    """300 silent connections: at most MAX_PENDING are kept, clients still get in, all expire."""
    with StoreServer("127.0.0.1", 0, SECRET, auth_timeout=0.5) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5.0) for _ in range(300)]
        try:
            time.sleep(0.2)
            assert 0 < srv.pending <= MAX_PENDING
            _server_still_serves(srv)  # a real client gets in past the held connections
            deadline = time.monotonic() + 5.0
            while srv.pending:
                assert time.monotonic() < deadline, "silent connections never timed out"
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()
        _server_still_serves(srv)


def test_a_store_of_another_job_is_refused_by_name() -> None:
    with StoreServer("127.0.0.1", 0, SECRET, job="job-a") as srv:
        with pytest.raises(JobMismatchError, match=r"job 'job-b'.*job 'job-a'"):
            Store("127.0.0.1", srv.port, SECRET, timeout=5.0, job="job-b")
        with Store("127.0.0.1", srv.port, SECRET, timeout=5.0, job="job-a") as client:
            client.set("k", b"v")


class _FlakyListener(socket.socket):
    """A listening socket whose first accepts fail as they do when file descriptors run out."""

    failures = 3

    def accept(self) -> tuple[socket.socket, Any]:
        if _FlakyListener.failures:
            _FlakyListener.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_the_accept_loop_outlives_accept_errors() -> None:
    plain = socket.create_server(("127.0.0.1", 0))
    listener = _FlakyListener(fileno=plain.detach())
    admitted: list[bytes] = []
    gate = Gate(listener, SECRET, lambda conn, peer, extra: admitted.append(extra),
                name="test", context=b"t", extra=2)  # fmt: skip
    gate.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5.0) as sock:
            authenticate(sock, SECRET, initiator=True, timeout=5.0, context=b"t")
            sock.sendall(b"ok")
            deadline = time.monotonic() + 5.0
            while not admitted:
                assert time.monotonic() < deadline, "the gate stopped after accept failed"
                time.sleep(0.02)
        assert admitted == [b"ok"] and _FlakyListener.failures == 0
    finally:
        gate.close()
        listener.close()


def test_a_failed_thread_start_costs_only_that_client(monkeypatch: pytest.MonkeyPatch) -> None:
    real = threading.Thread
    failures = [1]

    class FailingOnce(real):  # type: ignore[valid-type,misc]
        def start(self) -> None:
            if failures[0] and self.name.startswith("ringlet-store-127"):
                failures[0] -= 1
                raise RuntimeError("can't start new thread")
            super().start()

    with StoreServer("127.0.0.1", 0, SECRET) as srv:
        monkeypatch.setattr(server_module.threading, "Thread", FailingOnce)
        with (
            pytest.raises((PeerError, AuthenticationError)),
            Store("127.0.0.1", srv.port, SECRET, timeout=2.0) as first,
        ):
            first.set("k", b"v")  # the server dropped this client: it could not serve it
        assert failures == [0]
        _server_still_serves(srv)

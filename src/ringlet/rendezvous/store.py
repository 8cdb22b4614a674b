"""A small authenticated TCP key-value store where the ranks of a job meet (like torch's TCPStore).

One process (usually rank 0) runs a :class:`StoreServer`; every rank talks to it through a
:class:`Store`. Every connection first proves it knows the job secret (:mod:`ringlet.auth`). The
wire format is in :mod:`ringlet.rendezvous.wire`, the server in :mod:`ringlet.rendezvous.server`.
``get`` and ``wait`` block on the server, which answers as soon as the key appears.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Protocol

from ringlet.auth import authenticate
from ringlet.errors import AuthenticationError, CollectiveTimeout, PeerError, RingletError
from ringlet.rendezvous.server import StoreServer
from ringlet.rendezvous.wire import (
    AUTH_CONTEXT,
    INT64,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    NO_WAIT,
    REQUEST,
    RESPONSE,
    Op,
    Status,
    recv_bytes,
    send_parts,
)

__all__ = ["KeyValueStore", "PrefixStore", "Store", "StoreServer"]


class KeyValueStore(Protocol):
    """What the communicator needs from a store; :class:`Store` and :class:`PrefixStore` have it."""

    def set(self, key: str, value: bytes) -> None: ...
    def get(self, key: str, timeout: float | None = None) -> bytes: ...
    def try_get(self, key: str) -> bytes | None: ...
    def wait(self, keys: list[str], timeout: float | None = None) -> None: ...
    def add(self, key: str, amount: int) -> int: ...
    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes: ...
    def delete(self, key: str) -> bool: ...
    def close(self) -> None: ...


def _encode_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, got {type(key).__name__}")
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"store key of {len(raw)} bytes is longer than {MAX_KEY_BYTES} bytes")
    return raw


def _as_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(f"{what} is {len(data)} bytes; the store takes at most {MAX_VALUE_BYTES}")
    return data


class Store:
    """Client of a :class:`StoreServer`; thread-safe.

    Each request runs on a connection of its own for its duration: a thread blocked in ``get``
    never holds up another thread's ``set`` (a second connection is opened when the first is
    busy, and kept for reuse).

    Raises PeerError once the server is gone (and on every later call), AuthenticationError if the
    server does not share the secret, builtin TimeoutError when a waited-for key does not appear.
    """

    def __init__(
        self, host: str, port: int, secret: bytes, timeout: float = 30.0, *, job: str = ""
    ) -> None:
        """Connect, retrying until ``timeout`` seconds pass (the server may start later).

        ``timeout`` is also the default wait of ``get``/``wait`` and the bound on any other
        request. ``job`` must equal the server's job id. Raises CollectiveTimeout (a TimeoutError)
        if the server cannot be reached in time; JobMismatchError (an AuthenticationError) if it
        serves another job.
        """
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"store timeout must be a positive number of seconds, got {timeout}")
        self.host, self.port, self.timeout = host, port, float(timeout)
        self._secret = bytes(secret)
        self._job = job
        self._lock = threading.Lock()  # guards the connection pool and the state flags
        self._idle: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._closed = False
        self._gone: str | None = None  # why the server is known to be gone
        self._bound = threading.local()  # .until: this thread's requests end by then (bounded)
        sock = self._connect(retry=True)
        self._open.add(sock)
        self._idle.append(sock)

    def __repr__(self) -> str:
        return f"Store({self.host!r}, {self.port})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """Inside, this thread's requests (and waits) end within ``seconds``: one that gets no
        answer in time raises CollectiveTimeout — the store's host is stopped or stalled — and,
        unlike a dead server, leaves the store usable. A collective's checks use it so that a
        frozen rank 0 cannot hold them past the call's own deadline."""
        outer = getattr(self._bound, "until", None)
        until = time.monotonic() + max(seconds, 0.0)
        self._bound.until = until if outer is None else min(outer, until)
        try:
            yield
        finally:
            self._bound.until = outer

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any earlier value, and wake its waiters."""
        self._request(Op.SET, key, _as_bytes(value, "value"))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``; waits up to ``timeout`` s (default: the store's) for it to be set.

        Raises builtin TimeoutError naming the key if it does not appear in time.
        """
        wait = self._wait_seconds(timeout)
        status, value, _ = self._request(Op.GET, key, argument=_millis(wait), wait=wait)
        if status is not Status.OK:
            raise TimeoutError(f"rendezvous store: key {key!r} did not appear within {wait:g} s")
        return value

    def try_get(self, key: str) -> bytes | None:
        """The value of ``key``, or None at once if it is not set."""
        status, value, _ = self._request(Op.GET, key, argument=NO_WAIT)
        return value if status is Status.OK else None

    def wait(self, keys: list[str], timeout: float | None = None) -> None:
        """Wait until every key in ``keys`` is set; TimeoutError names those still missing."""
        wait = self._wait_seconds(timeout)
        deadline = time.monotonic() + wait
        for key in keys:
            remaining = max(0.0, deadline - time.monotonic())
            status, _, _ = self._request(Op.WAIT, key, argument=_millis(remaining), wait=remaining)
            if status is not Status.OK:
                missing = [
                    k
                    for k in keys
                    if self._request(Op.WAIT, k, argument=NO_WAIT)[0] is not Status.OK
                ]
                raise TimeoutError(
                    f"rendezvous store: keys {missing!r} did not appear within {wait:g} s"
                )

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (missing is 0); returns the sum."""
        if not isinstance(amount, int) or isinstance(amount, bool) or amount not in INT64:
            raise TypeError(f"add() amount must be an int64, got {amount!r}")
        status, message, total = self._request(Op.ADD, key, argument=amount)
        if status is Status.ERROR:
            raise ValueError(f"rendezvous store: {message.decode('utf-8', 'replace')}")
        return total

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (b"" matches a missing key).

        Returns the value held afterwards; for a missing key and a non-empty ``expected``, returns
        ``expected`` and changes nothing (torch TCPStore's rule).
        """
        expected = _as_bytes(expected, "expected")
        desired = _as_bytes(desired, "desired")
        return self._request(Op.COMPARE_SET, key, expected, desired)[1]

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was set."""
        return bool(self._request(Op.DELETE, key)[2])

    def close(self) -> None:
        """Close every connection; a thread blocked in a request gets a RingletError. Idempotent."""
        with self._lock:
            self._closed = True
            sockets = list(self._open)
            self._open.clear()
            self._idle.clear()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it
            except OSError:
                pass
            sock.close()

    def _wait_seconds(self, timeout: float | None) -> float:
        if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout}")
        wait = self.timeout if timeout is None else float(timeout)
        if (until := getattr(self._bound, "until", None)) is not None:
            wait = max(min(wait, until - time.monotonic()), 0.0)
        return wait

    def _connect(self, *, retry: bool) -> socket.socket:
        """A new authenticated connection; with ``retry``, keep trying until the timeout passes."""
        address = f"{self.host}:{self.port}"
        deadline = time.monotonic() + self.timeout
        bounded = (until := getattr(self._bound, "until", None)) is not None
        if until is not None:
            deadline = min(deadline, until)
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection(
                    (self.host, self.port), timeout=max(remaining, 0.01)
                )
                break
            except OSError as exc:  # refused, unreachable, name not resolvable yet
                if not retry:
                    raise self._mark_gone(f"cannot open another connection: {exc}") from exc
                if remaining <= 0:
                    raise CollectiveTimeout(
                        f"could not reach the rendezvous store at {address} within"
                        f" {self.timeout:g} s (last error: {exc}); check that rank 0 is running"
                        " and that the master address and port are right"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 1.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            authenticate(
                sock,
                self._secret,
                initiator=True,
                timeout=max(deadline - time.monotonic(), 0.01 if bounded else 1.0),
                context=AUTH_CONTEXT,
                job=self._job,
            )
        except AuthenticationError as exc:
            sock.close()
            if bounded and time.monotonic() >= deadline:  # no hello in time: a stalled server
                raise CollectiveTimeout(
                    f"rendezvous store at {address} accepted a connection but did not answer"
                    f" within the bound: the process that hosts it (usually rank 0) is stopped"
                    f" or stalled ({exc})"
                ) from exc
            raise type(exc)(f"rendezvous store at {address}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _mark_gone(self, why: str) -> PeerError:
        message = (
            f"rendezvous store at {self.host}:{self.port} is gone ({why}); the process that hosts"
            " it (usually rank 0) has probably exited or its host is unreachable"
        )
        with self._lock:
            if self._gone is None:
                self._gone = message
        return PeerError(message)

    def _acquire(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise RingletError("this rendezvous store client was closed")
            if self._gone is not None:
                raise PeerError(self._gone)
            if self._idle:
                return self._idle.pop()
        sock = self._connect(retry=False)  # every connection is busy: open one more
        with self._lock:
            if self._closed:
                sock.close()
                raise RingletError("this rendezvous store client was closed")
            self._open.add(sock)
        return sock

    def _release(self, sock: socket.socket, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(sock)
                return
            self._open.discard(sock)
        sock.close()

    def _request(
        self,
        op: Op,
        key: str,
        value: bytes = b"",
        second: bytes = b"",
        *,
        argument: int = 0,
        wait: float = 0.0,
    ) -> tuple[Status, bytes, int]:
        """Send one request and read its answer on a connection of our own."""
        raw_key = _encode_key(key)
        limit, until = self.timeout, getattr(self._bound, "until", None)
        if until is not None:
            limit = max(min(limit, until - time.monotonic()), 0.01)
        sock = self._acquire()
        reusable = False
        try:
            sock.settimeout(limit + wait)  # the server answers a wait when it ends
            header = REQUEST.pack(op, len(raw_key), len(value), len(second), argument)
            send_parts(sock, header, raw_key, value, second)
            status, length, out_argument = RESPONSE.unpack(recv_bytes(sock, RESPONSE.size))
            if length > MAX_VALUE_BYTES or status not in Status._value2member_map_:
                raise EOFError(f"malformed answer (status {status}, {length} bytes)")
            answer = recv_bytes(sock, length)
            reusable = True
        except (OSError, EOFError) as exc:  # socket.timeout is an OSError too
            if self._closed:
                raise RingletError(
                    f"this rendezvous store client was closed during {op.name.lower()}({key!r})"
                ) from exc
            if until is not None and isinstance(exc, TimeoutError):
                raise CollectiveTimeout(  # bounded: its host stalls; the store may answer later
                    f"rendezvous store at {self.host}:{self.port} did not answer "
                    f"{op.name.lower()}({key!r}) within {limit + wait:.3g} s: the process that "
                    "hosts it (usually rank 0) is stopped or stalled"
                ) from exc
            raise self._mark_gone(f"{op.name.lower()}({key!r}) failed: {exc}") from exc
        finally:
            self._release(sock, reusable)
        return Status(status), answer, out_argument


def _millis(seconds: float) -> int:
    return min(int(seconds * 1000), INT64.stop - 1)


class PrefixStore:
    """A view of a store whose keys all start with ``prefix + "/"``; for sub-communicators.

    Closing it leaves the wrapped store open: the view does not own it.
    """

    def __init__(self, prefix: str, store: KeyValueStore) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.store = store

    def __repr__(self) -> str:
        return f"PrefixStore({self.prefix!r}, {self.store!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def set(self, key: str, value: bytes) -> None:
        self.store.set(self._key(key), value)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        return self.store.get(self._key(key), timeout)

    def bounded(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        inner = getattr(self.store, "bounded", None)
        return inner(seconds) if inner is not None else contextlib.nullcontext()

    def try_get(self, key: str) -> bytes | None:
        return self.store.try_get(self._key(key))

    def wait(self, keys: list[str], timeout: float | None = None) -> None:
        self.store.wait([self._key(k) for k in keys], timeout)

    def add(self, key: str, amount: int) -> int:
        return self.store.add(self._key(key), amount)

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self.store.compare_set(self._key(key), expected, desired)

    def delete(self, key: str) -> bool:
        return self.store.delete(self._key(key))

    def close(self) -> None:
        """Does nothing: the wrapped store belongs to whoever created it."""


class OwnedPrefixStore(PrefixStore):
    """A :class:`PrefixStore` that owns the :class:`Store` it wraps (closing it closes that): the
    later worlds of one process in a job whose store outlives them (served by ``ringlet run``),
    each under its own prefix so that none meets an earlier world's keys."""

    def __init__(self, prefix: str, store: Store) -> None:
        super().__init__(prefix, store)
        self.host, self.port = store.host, store.port

    def close(self) -> None:
        self.store.close()

"""The rendezvous store's server: a dict behind a lock, served one thread per authenticated client.

Every connection first proves it knows the job secret and names the same job
(:class:`ringlet.gate.Gate`: one thread handshakes every pending connection, a bounded number of
them, each with a deadline, so unauthenticated connections cost no thread and cannot stop the
accept loop). One that fails, or that later breaks the protocol (unknown operation, oversized
header, bad key), is logged on ``ringlet.store`` and dropped, and nothing it sent is acted on. A
misbehaving client costs only its own thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from ringlet.gate import Gate
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
    recv_exact,
    send_parts,
)

log = logging.getLogger("ringlet.store")

MAX_CLIENTS = 4096


class _DropClient(Exception):
    """The client broke the protocol; the server logs why and closes its connection."""


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        raise OSError(
            exc.errno, f"the rendezvous store cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc


class StoreServer:
    """Serves the key-value store from a daemon thread, one more daemon thread per client."""

    def __init__(
        self, host: str, port: int, secret: bytes, *, auth_timeout: float = 10.0, job: str = ""
    ) -> None:
        """Bind and listen on ``host:port`` at once; port 0 picks a free port (see ``.port``).

        Only clients that know ``secret`` and name the same ``job`` id get in. Clients that connect
        before :meth:`start` wait in the listen queue. Raises OSError if the address cannot be
        bound.
        """
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
        self._listener = _listen(host, port)
        self.host: str = host
        self.port: int = self._listener.getsockname()[1]
        self._secret = bytes(secret)
        self._auth_timeout = auth_timeout
        self._data: dict[str, bytes] = {}
        lock = threading.Lock()
        self._changed = threading.Condition(lock)  # guards the state below; wakes key waiters
        self._settled = threading.Condition(lock)  # wakes settle() when no answer is in flight
        self._answering = 0  # requests applied whose answer is not yet sent
        self._clients: set[socket.socket] = set()
        self._closed = False
        self._gate = Gate(
            self._listener,
            self._secret,
            self._admit,
            name=f"ringlet-store-{self.port}",
            context=AUTH_CONTEXT,
            logger=log,
            job=job,
            deadline=auth_timeout,
        )
        self._started = False

    def __repr__(self) -> str:
        return f"StoreServer({self.host!r}, {self.port})"

    @property
    def pending(self) -> int:
        """Connections accepted but not yet authenticated (at most ``ringlet.gate.MAX_PENDING``)."""
        return self._gate.pending

    def settle(self, keys: list[str], timeout: float) -> bool:
        """Wait until every key is set and every answer already decided has been sent; False if
        that takes longer than ``timeout`` seconds (or the server closed).

        Once it returns True, each client that set one of the keys has its answer in its socket:
        the process hosting the server may then stop running Python (a call that holds the GIL,
        such as MPI_Init) without leaving those clients waiting. Requests still waiting for a key
        to appear do not count; their answers come when it does.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                missing = any(key not in self._data for key in keys)
                if not missing and not self._answering:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                (self._changed if missing else self._settled).wait(remaining)

    def start(self) -> None:
        """Start accepting clients in a daemon thread (a second call does nothing)."""
        if not self._started:
            self._started = True
            self._gate.start()

    def close(self) -> None:
        """Stop serving and close every socket; clients then see the store as gone. Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
            self._changed.notify_all()
        self._gate.close()
        # shutdown (unlike close) wakes a thread blocked in recv on the socket
        for sock in (self._listener, *clients):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _admit(self, conn: socket.socket, peer: str, _extra: bytes) -> None:
        """Serve an authenticated client on a thread of its own, up to MAX_CLIENTS of them."""
        with self._changed:
            refuse = self._closed or len(self._clients) >= MAX_CLIENTS
            if not refuse:
                self._clients.add(conn)
        if refuse:
            if not self._closed:
                log.warning("rendezvous store: %d clients already, refused %s", MAX_CLIENTS, peer)
            conn.close()
            return
        try:
            threading.Thread(
                target=self._serve_client,
                args=(conn, peer),
                name=f"ringlet-store-{peer}",
                daemon=True,
            ).start()
        except BaseException:  # e.g. RuntimeError "can't start new thread": this client only
            with self._changed:
                self._clients.discard(conn)
            raise

    def _serve_client(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(None)  # a client may stay idle between requests as long as it likes
            while self._serve_request(conn):
                pass
        except _DropClient as exc:
            log.warning("rendezvous store: dropped client %s: %s", peer, exc)
        except (OSError, EOFError) as exc:
            if not self._closed:
                log.info("rendezvous store: lost client %s: %s", peer, exc)
        except Exception:  # a bug must cost this client only, never the server or other clients
            log.exception("rendezvous store: internal error serving %s", peer)
        finally:
            with self._changed:
                self._clients.discard(conn)
            conn.close()

    def _serve_request(self, conn: socket.socket) -> bool:
        """Read, apply and answer one request; False when the client closed between requests."""
        header = recv_exact(conn, REQUEST.size, eof_ok=True)
        if header is None:
            return False
        code, key_len, value_len, second_len, argument = REQUEST.unpack(header)
        try:
            op = Op(code)
        except ValueError:
            raise _DropClient(f"unknown operation code {code}") from None
        if key_len > MAX_KEY_BYTES or value_len > MAX_VALUE_BYTES or second_len > MAX_VALUE_BYTES:
            raise _DropClient(
                f"oversized request header: key {key_len} bytes, values {value_len} and"
                f" {second_len} bytes (limits {MAX_KEY_BYTES} and {MAX_VALUE_BYTES})"
            )
        raw_key = recv_bytes(conn, key_len)
        value = recv_bytes(conn, value_len)
        second = recv_bytes(conn, second_len)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise _DropClient("key is not valid UTF-8") from None
        status, answer, out_argument = self._apply(op, key, value, second, argument, conn)
        try:
            send_parts(conn, RESPONSE.pack(status, len(answer), out_argument), answer)
        finally:
            with self._changed:
                self._answering -= 1
                if not self._answering:
                    self._settled.notify_all()
        return True

    def _apply(
        self, op: Op, key: str, value: bytes, second: bytes, argument: int, conn: socket.socket
    ) -> tuple[Status, bytes, int]:
        """Apply one request under the lock; its answer counts as in flight until it is sent."""
        with self._changed:
            result = self._apply_locked(op, key, value, second, argument, conn)
            self._answering += 1
            return result

    def _apply_locked(
        self, op: Op, key: str, value: bytes, second: bytes, argument: int, conn: socket.socket
    ) -> tuple[Status, bytes, int]:
        if op is Op.SET:
            self._data[key] = value
            self._changed.notify_all()
            return Status.OK, b"", 0
        if op is Op.GET or op is Op.WAIT:
            if argument != NO_WAIT and not self._wait_for(key, argument / 1000.0, conn):
                return Status.TIMEOUT, b"", 0
            if key not in self._data:
                return Status.MISSING, b"", 0
            return Status.OK, (self._data[key] if op is Op.GET else b""), 0
        if op is Op.ADD:
            return self._add(key, argument)
        if op is Op.COMPARE_SET:
            return self._compare_set(key, value, second)
        existed = self._data.pop(key, None) is not None  # Op.DELETE
        return Status.OK, b"", int(existed)

    def _add(self, key: str, amount: int) -> tuple[Status, bytes, int]:
        current = self._data.get(key, b"0")
        try:
            total = int(current) + amount
        except ValueError:
            message = f"add({key!r}): the key holds {current[:40]!r}, which is not an integer"
            return Status.ERROR, message.encode(), 0
        if total not in INT64:
            return Status.ERROR, f"add({key!r}): the result overflows int64".encode(), 0
        self._data[key] = str(total).encode("ascii")
        self._changed.notify_all()
        return Status.OK, b"", total

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> tuple[Status, bytes, int]:
        # torch TCPStore semantics: a missing key counts as b""; the answer is the value now held,
        # except that a missing key with a non-empty expectation answers the expectation.
        current = self._data.get(key)
        if current is None and expected:
            return Status.OK, expected, 0
        if current is None or current == expected:
            self._data[key] = desired
            self._changed.notify_all()
            return Status.OK, desired, 0
        return Status.OK, current, 0

    def _wait_for(self, key: str, timeout: float, conn: socket.socket) -> bool:
        """With the lock held, wait until ``key`` exists; False on timeout.

        Raises EOFError, which ends the connection without an answer, when the server closes or
        the client goes away meanwhile.
        """
        deadline = time.monotonic() + timeout
        while key not in self._data:
            if self._closed:  # no answer at all: the client must see the store as gone
                raise EOFError("the store is closing")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Wake at least once a second to notice a client that left while we waited for it.
            self._changed.wait(min(remaining, 1.0))
            if key not in self._data and _peer_hung_up(conn):
                raise EOFError("the client left (or sent data out of turn) while waiting")
        return True


def _peer_hung_up(conn: socket.socket) -> bool:
    """True if a waiting client closed its connection or sent something out of turn."""
    try:
        conn.settimeout(0.0)
        conn.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        try:
            conn.settimeout(None)
        except OSError:
            pass
    return True

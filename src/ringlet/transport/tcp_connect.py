"""Connections between ranks: the process's authenticating listener and the connecting side.

A connection proves the job secret (HMAC challenge-response) and then names its communicator
and rank, so that the transport of that communicator can take it (:mod:`ringlet.transport.tcp`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from ..auth import authenticate
from ..gate import Gate

log = logging.getLogger("ringlet.tcp")

HELLO = struct.Struct("<QI")
AUTH_CONTEXT = b"ringlet-peer"
#: How often a waiting connection or exchange checks the job's abort flag (seconds).
POLL_INTERVAL = 0.1
SOCKET_BUFFER = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class Listener:
    """The process's listening socket: authenticates incoming peers and hands them out by (comm, rank).

    Accepting and authenticating run on one :class:`ringlet.gate.Gate` thread: a bounded number of
    unauthenticated connections, each with a deadline, no thread each, and an accept loop that
    survives every error (another local user holding a thousand connections open does not stop
    it). A peer that authenticates sends its (communicator, rank) and waits in :meth:`take`.
    """

    def __init__(self, host: str, secret: bytes, auth_timeout: float = 10.0) -> None:
        """Listen on ``host`` at a free port (``.address``) and start accepting at once."""
        self._sock = socket.create_server((host, 0), backlog=128)
        self.address: tuple[str, int] = (host, self._sock.getsockname()[1])
        self._ready: dict[tuple[int, int], socket.socket] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._gate = Gate(
            self._sock,
            secret,
            self._admit,
            name="ringlet-accept",
            context=AUTH_CONTEXT,
            logger=log,
            extra=HELLO.size,
            deadline=auth_timeout,
        )
        self._gate.start()

    def _admit(self, conn: socket.socket, peer: str, hello: bytes) -> None:
        """File an authenticated peer under the (communicator, rank) it named."""
        comm, rank = HELLO.unpack(hello)
        conn.settimeout(None)
        _tune(conn)
        with self._cond:
            if self._closed:
                conn.close()
                return
            old = self._ready.pop((comm, rank), None)
            if old is not None:
                old.close()
            self._ready[(comm, rank)] = conn
            self._cond.notify_all()

    def take(
        self, comm: int, rank: int, deadline: float, poll: Callable[[], None]
    ) -> socket.socket:
        """Wait for rank ``rank`` of communicator ``comm`` to connect; raises TimeoutError at the deadline."""
        with self._cond:
            while (comm, rank) not in self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {rank} did not connect")
                self._cond.wait(min(left, POLL_INTERVAL))
                poll()
            return self._ready.pop((comm, rank))

    def close(self) -> None:
        """Stop accepting and close every connection not yet taken. Idempotent."""
        with self._cond:
            self._closed = True
        self._gate.close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._cond:
            for s in self._ready.values():
                s.close()
            self._ready.clear()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a blocking socket; ConnectionError if it closes first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed during handshake")
        got += k
    return bytes(buf)


def connect(
    address: tuple[str, int],
    secret: bytes,
    comm: int,
    rank: int,
    deadline: float,
    poll: Callable[[], None] | None = None,
) -> socket.socket:
    """Open an authenticated connection to a peer's listener, retrying until the deadline.

    ``poll`` runs between attempts, so a job-wide failure ends the retrying at once.
    """
    delay = 0.01
    while True:
        left = deadline - time.monotonic()
        try:
            sock = socket.create_connection(address, timeout=max(left, 0.1))
            break
        except OSError:
            if left <= 0:
                raise
            time.sleep(min(delay, max(left, 0.0)))
            delay = min(delay * 2, 0.5)
            if poll is not None:
                poll()
    try:
        authenticate(sock, secret, initiator=True, timeout=max(left, 1.0), context=AUTH_CONTEXT)
        sock.sendall(HELLO.pack(comm, rank))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    _tune(sock)
    return sock

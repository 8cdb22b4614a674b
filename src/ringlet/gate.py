"""An accept loop that cannot be silenced: one thread, one selector, every handshake at once.

Both servers of a job (the rendezvous store and each rank's peer listener) accept through a
:class:`Gate`. It accepts without blocking, runs the acceptor side of the HMAC handshake
(:class:`ringlet.auth.AcceptorHandshake`) for every pending connection on one selector, and hands
a connection to ``admit`` only once it has authenticated. So:

- at most ``max_pending`` unauthenticated connections are held; a newer one pushes out the oldest
  silent one (else the oldest), so connections an attacker holds open make way instead of locking
  peers out;
- each has ``deadline`` seconds to finish; each costs a socket and under 200 bytes, no thread;
- every error (out of file descriptors, a reset, a failing ``admit``) is logged on ``logger`` (a
  burst of 20, then one a second) and the loop goes on; only :meth:`close` ends it.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ringlet.auth import AcceptorHandshake
from ringlet.errors import AuthenticationError

log = logging.getLogger("ringlet.gate")

MAX_PENDING = 64
HANDSHAKE_DEADLINE = 10.0
_TICK = 0.5  # the longest the loop sleeps: how soon close() and deadlines are noticed
_ERROR_PAUSE = 0.05  # after accept fails (e.g. EMFILE): do not spin on a listener that stays ready
_LOG_BURST = (
    20  # warnings logged at once; beyond that one a second, so a flood cannot flood the log
)

Admit = Callable[[socket.socket, str, bytes], None]


class _Pending:
    __slots__ = ("conn", "deadline", "handshake", "peer")

    def __init__(self, conn: socket.socket, peer: str, handshake: AcceptorHandshake, end: float):
        self.conn, self.peer, self.handshake, self.deadline = conn, peer, handshake, end


class Gate:
    """Accepts on ``listener`` and passes authenticated connections to ``admit(conn, peer, extra)``.

    ``admit`` runs on the gate's thread and gets a blocking socket plus the ``extra`` fixed bytes
    the peer sent after authenticating; it must not block for long. An exception from it is
    logged and the connection closed.
    """

    def __init__(
        self,
        listener: socket.socket,
        secret: bytes,
        admit: Admit,
        *,
        name: str,
        context: bytes,
        logger: logging.Logger = log,
        job: str = "",
        extra: int = 0,
        max_pending: int = MAX_PENDING,
        deadline: float = HANDSHAKE_DEADLINE,
    ) -> None:
        self._listener = listener
        self._secret, self._context, self._job, self._extra = bytes(secret), context, job, extra
        self._admit = admit
        self._name, self._log = name, logger
        self._max_pending, self._deadline = max_pending, deadline
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._selector = selectors.DefaultSelector()
        self._closed = False
        self._log_tokens, self._log_refilled = float(_LOG_BURST), time.monotonic()
        self._quiet = 0  # messages held back since the last one logged
        self._wake_r, self._wake_w = socket.socketpair()
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def pending(self) -> int:
        """How many connections are still authenticating."""
        return len(self._pending)

    def start(self) -> None:
        """Start the accept thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, drop every pending connection and wait for the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        try:
            while not self._closed:
                try:
                    self._step()
                except Exception as exc:  # the loop must outlive any error
                    self._warn("internal error in the accept loop: %r", exc)
                    time.sleep(_ERROR_PAUSE)
        finally:
            for item in list(self._pending.values()):
                self._drop(item)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _step(self) -> None:
        now = time.monotonic()
        first = next(iter(self._pending.values()), None)
        timeout = _TICK if first is None else max(0.0, min(_TICK, first.deadline - now))
        for key, events in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                return
            else:
                item = key.data
                assert isinstance(item, _Pending)
                self._serve(item, events)
        now = time.monotonic()
        while self._pending:  # oldest first: they were accepted in deadline order
            item = next(iter(self._pending.values()))
            if item.deadline > now:
                break
            self._warn("%s: %s did not authenticate within %g s", self._name, item.peer,
                       self._deadline)  # fmt: skip
            self._drop(item)

    def _accept(self) -> None:
        for _ in range(256):  # take what is queued, then serve the others
            try:
                conn, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self._closed:
                    return
                self._warn("%s: accept failed: %s", self._name, exc)
                time.sleep(_ERROR_PAUSE)
                return
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            try:
                self._start(conn, peer)
            except OSError as exc:
                self._warn("%s: dropped %s: %s", self._name, peer, exc)
                conn.close()

    def _start(self, conn: socket.socket, peer: str) -> None:
        while len(self._pending) >= self._max_pending:
            # the oldest that has sent nothing yet (held open, not a peer mid-handshake), else the oldest
            items = self._pending.values()
            victim = next((i for i in items if not i.handshake.started), next(iter(items)))
            self._warn("%s: %d connections authenticating; dropped %s",
                       self._name, self._max_pending, victim.peer)  # fmt: skip
            self._drop(victim)
        conn.setblocking(False)
        handshake = AcceptorHandshake(
            self._secret, context=self._context, job=self._job, extra=self._extra
        )
        item = _Pending(conn, peer, handshake, time.monotonic() + self._deadline)
        self._pending[conn] = item
        self._selector.register(conn, selectors.EVENT_READ, item)
        self._flush(item)

    def _serve(self, item: _Pending, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not item.handshake.done:
                data = item.conn.recv(max(1, item.handshake.wanted()))
                if not data:
                    raise AuthenticationError("closed the connection while authenticating")
                item.handshake.received(data)
            self._flush(item)
        except (AuthenticationError, OSError) as exc:
            self._warn("%s: dropped connection from %s: %s", self._name, item.peer, exc)
            self._drop(item)
            return
        if item.handshake.done and not item.handshake.outgoing:
            self._pending.pop(item.conn, None)
            self._selector.unregister(item.conn)
            item.conn.setblocking(True)
            try:
                self._admit(item.conn, item.peer, item.handshake.extra)
            except Exception as exc:  # one connection's failure is its own
                self._warn("%s: could not admit %s: %r", self._name, item.peer, exc)
                item.conn.close()

    def _flush(self, item: _Pending) -> None:
        """Send what the handshake has for the peer; wait for writability if the kernel is full."""
        out = item.handshake.outgoing
        if out:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                del out[: item.conn.send(out)]
        # done: nothing more to read until admitted (the peer waits for our proof before it speaks)
        events = 0 if item.handshake.done else selectors.EVENT_READ
        events |= selectors.EVENT_WRITE if out else 0
        if events:
            self._selector.modify(item.conn, events, item)

    def _drop(self, item: _Pending) -> None:
        self._pending.pop(item.conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(item.conn)
        item.conn.close()

    def _warn(self, message: str, *args: object) -> None:
        """Log a warning: every one of a burst of 20, then one a second (a token bucket)."""
        now = time.monotonic()
        self._log_tokens = min(_LOG_BURST, self._log_tokens + now - self._log_refilled)
        self._log_refilled = now
        if self._log_tokens < 1.0:
            self._quiet += 1
            return
        self._log_tokens -= 1.0
        if self._quiet:
            message += f" (and {self._quiet} similar messages held back)"
            self._quiet = 0
        self._log.warning(message, *args)

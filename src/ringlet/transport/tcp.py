"""TCP transport: authenticated sockets between ranks, connected on first use, framed messages.

One :class:`~ringlet.transport.tcp_connect.Listener` per process accepts peers of every
communicator. Within a communicator the lower rank connects and the higher accepts, so a pair
never opens two sockets. Payloads stream straight between the caller's buffers and the socket:
nothing is buffered whole.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import AuthenticationError, MismatchError, PeerError, ProtocolError
from . import frames
from .base import Tag
from .tcp_connect import POLL_INTERVAL, Listener, connect, recv_exact

#: Seconds a waiting exchange keeps retrying its sockets before it sleeps in poll(), where the
#: host has a core for each of its ranks: waking a rank asleep in poll() (an idle virtual CPU's
#: wake-up most of all) costs more than a small message's whole trip.
SPIN_SECONDS = 50e-6
#: ...for rounds of at most this many bytes: a receiver that keeps reading a large message as it
#: streams in slows its sender (2 ranks over loopback: one-way 1 MiB 274-390 us spinning only
#: up to here, 394-414 us not at all).
SPIN_MAX_BYTES = 64 << 10
#: How long ``first_ready`` retries a refused connection before it reports the peer gone (seconds).
CONNECT_GRACE = 1.0

_EV_IN = select.POLLIN | select.POLLPRI
_EV_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)


class _Incoming:
    """State of one receive: first the fixed header, then the payload straight into ``into``."""

    __slots__ = ("got", "header", "hview", "into", "peer")

    def __init__(self, peer: int, into: memoryview) -> None:
        self.peer = peer
        self.into = into
        self.header = bytearray(frames.HEADER_SIZE)
        self.hview = memoryview(self.header)
        self.got = -frames.HEADER_SIZE  # negative while the header is incomplete


class _Outgoing:
    __slots__ = ("parts", "peer")

    def __init__(self, peer: int, header: bytes, data: memoryview) -> None:
        self.peer = peer
        self.parts = [memoryview(header), data] if data.nbytes else [memoryview(header)]


class TcpTransport:
    """Framed point-to-point messages over TCP between the ranks of one communicator."""

    def __init__(
        self,
        comm: int,
        rank: int,
        addresses: Sequence[tuple[str, int]],
        listener: Listener,
        secret: bytes,
        poll: Callable[[], None],
        spin: bool = False,
    ) -> None:
        """``spin``: retry a round's sockets for SPIN_SECONDS before sleeping (a core per rank)."""
        self.comm, self.rank, self.size = comm, rank, len(addresses)
        self._spin = SPIN_SECONDS if spin else 0.0
        self._addresses = list(addresses)
        self._listener = listener
        self._secret = secret
        self._poll = poll
        self._socks: dict[int, socket.socket] = {}
        self._partial: set[int] = set()  # peers holding a frame we only half sent
        self._connecting = threading.Lock()  # send and recv threads may both want a new peer

    # -- connections -------------------------------------------------------------------------
    def _sock(self, peer: int, deadline: float) -> socket.socket:
        sock = self._socks.get(peer)
        if sock is not None:
            return sock
        with self._connecting:
            sock = self._socks.get(peer)
            if sock is not None:
                return sock
            if self.rank < peer:
                sock = connect(
                    self._addresses[peer], self._secret, self.comm, self.rank, deadline, self._poll
                )
            else:
                sock = self._listener.take(self.comm, peer, deadline, self._poll)
            sock.setblocking(False)
            self._socks[peer] = sock
        return sock

    # -- the one data path ---------------------------------------------------------------------
    def exchange(
        self,
        sends: Sequence[tuple[int, memoryview]],
        recvs: Sequence[tuple[int, memoryview]],
        tag: Tag,
        deadline: float,
    ) -> None:
        """Send and receive one round; see :class:`ringlet.transport.base.Transport`."""
        try:
            for peer, _ in (*recvs, *sends):
                self._sock(peer, deadline)
        except TimeoutError:
            raise  # the caller turns it into CollectiveTimeout with context
        except OSError as exc:
            raise PeerError(f"cannot connect to rank {peer}: {exc}", rank=peer) from exc
        pending_out = [
            _Outgoing(
                p,
                frames.Header(
                    frames.DATA, self.comm, tag.seq, tag.round, tag.segment, tag.sig, d.nbytes
                ).pack(),
                d,
            )
            for p, d in sends
        ]
        pending_in = [_Incoming(p, d) for p, d in recvs]
        small = sum(d.nbytes for _, d in (*sends, *recvs)) <= SPIN_MAX_BYTES
        end = time.perf_counter() + (self._spin if small else 0.0)
        while True:  # once, or until the round is done or the spin is over
            pending_out = [o for o in pending_out if not self._push(o)]
            pending_in = [i for i in pending_in if not self._pull(i, tag)]
            if not pending_out and not pending_in:
                return
            if time.perf_counter() >= end:
                break
        self._wait(pending_out, pending_in, tag, deadline)

    def _wait(self, outs: list[_Outgoing], ins: list[_Incoming], tag: Tag, deadline: float) -> None:
        """Wait on this round's sockets only: a peer that finished and left is no error until needed."""
        poller = select.poll()
        by_fd_in = {self._socks[i.peer].fileno(): i for i in ins}
        by_fd_out = {self._socks[o.peer].fileno(): o for o in outs}

        def events(fd: int) -> int:
            ev = _EV_HUP | (_EV_IN if fd in by_fd_in else 0)
            return ev | (select.POLLOUT if fd in by_fd_out else 0)

        for fd in {*by_fd_in, *by_fd_out}:
            poller.register(fd, events(fd))
        next_poll = time.monotonic() + POLL_INTERVAL
        while by_fd_in or by_fd_out:
            now = time.monotonic()
            if now >= deadline:
                waiting = sorted(
                    {i.peer for i in by_fd_in.values()} | {o.peer for o in by_fd_out.values()}
                )
                raise TimeoutError(f"still waiting for ranks {waiting}")
            if now >= next_poll:
                self._poll()
                next_poll = now + POLL_INTERVAL
            for fd, ev in poller.poll(max(1, int(1000 * min(deadline - now, POLL_INTERVAL)))):
                if fd in by_fd_in and ev & (_EV_IN | _EV_HUP) and self._pull(by_fd_in[fd], tag):
                    del by_fd_in[fd]
                if (
                    fd in by_fd_out
                    and ev & (select.POLLOUT | _EV_HUP)
                    and self._push(by_fd_out[fd])
                ):
                    del by_fd_out[fd]
                if fd in by_fd_in or fd in by_fd_out:
                    poller.modify(fd, events(fd))
                else:
                    poller.unregister(fd)

    def _push(self, out: _Outgoing) -> bool:
        """Write as much as the socket takes; True when the whole frame is out."""
        sock = self._socks[out.peer]
        self._partial.add(out.peer)
        while out.parts:
            try:
                n = sock.sendmsg(out.parts)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise PeerError(
                    f"sending to rank {out.peer} failed: {exc} (did it exit?)", rank=out.peer
                ) from exc
            while n and out.parts:
                head = out.parts[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    out.parts.pop(0)
                else:
                    out.parts[0] = head[n:]
                    n = 0
        self._partial.discard(out.peer)
        return True

    def _pull(self, inc: _Incoming, tag: Tag) -> bool:
        """Read what has arrived; True when the whole expected frame is in ``inc.into``."""
        sock = self._socks[inc.peer]
        while True:
            if inc.got < 0:
                view = inc.hview[frames.HEADER_SIZE + inc.got :]
            else:
                view = inc.into[inc.got :]
                if not view.nbytes:
                    return True
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise PeerError(
                    f"receiving from rank {inc.peer} failed: {exc}", rank=inc.peer
                ) from exc
            if n == 0:
                raise PeerError(
                    f"rank {inc.peer} closed its connection (it exited or crashed)", rank=inc.peer
                )
            inc.got += n
            if inc.got == 0:
                self._check_header(inc, tag)
                if not inc.into.nbytes:
                    return True

    def _check_header(self, inc: _Incoming, tag: Tag) -> None:
        peer = inc.peer
        try:
            h = frames.unpack(inc.header)
        except ValueError as exc:
            raise ProtocolError(f"rank {peer} sent a malformed frame: {exc}") from exc
        if h.kind == frames.ABORT:
            reason = _recv_blocking(self._socks[peer], h.length).decode("utf-8", "replace")
            raise PeerError(f"rank {peer} gave up: {reason}", rank=peer)
        if h.comm != self.comm:
            raise ProtocolError(f"rank {peer} sent a frame of communicator {h.comm:#x}")
        if (h.seq, h.sig) != (tag.seq, tag.sig):
            raise MismatchError(
                f"rank {peer} is in call #{h.seq} (signature {h.sig:#018x}) while this rank is in "
                f"call #{tag.seq} (signature {tag.sig:#018x})"
            )
        if (h.round, h.segment, h.length) != (tag.round, tag.segment, inc.into.nbytes):
            raise MismatchError(
                f"rank {peer} sent round {h.round} segment {h.segment} of {h.length} bytes where "
                f"this rank expects round {tag.round} segment {tag.segment} of {inc.into.nbytes} "
                "bytes (ranks chose different algorithms or sizes; check RINGLET_ALGO)"
            )

    # -- waiting for whichever peer speaks first -----------------------------------------------
    def first_ready(self, peers: Sequence[int], deadline: float) -> int:
        """The first of ``peers``, in the order given, whose connection has a frame or its end to
        read (the next ``exchange`` with it reports the end). Blocks in poll(): connects to higher
        peers at once, looks for lower ones not connected yet between polls (backing off from
        1 ms). PeerError (with ``rank``) for a peer that cannot be reached; TimeoutError."""
        unconnected, pause = [p for p in peers if p not in self._socks], 0.001
        next_poll, by_fd = time.monotonic() + POLL_INTERVAL, dict[int, int]()
        while True:
            if unconnected or not by_fd:
                unconnected = [p for p in unconnected if not self._try_connect(p, deadline)]
                by_fd = {self._socks[p].fileno(): p for p in peers if p in self._socks}
                poller = select.poll()
                for fd in by_fd:
                    poller.register(fd, _EV_IN | _EV_HUP)
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no message from ranks {sorted(peers)}")
            if now >= next_poll:
                self._poll()
                next_poll = now + POLL_INTERVAL
            wait = min(deadline - now, pause if unconnected else POLL_INTERVAL)
            ready = {by_fd[fd] for fd, _ in poller.poll(max(1, int(1000 * wait)))}
            if ready:
                return next(p for p in peers if p in ready)
            pause = min(2 * pause, POLL_INTERVAL)

    def _try_connect(self, peer: int, deadline: float) -> bool:
        """Connect to a higher ``peer`` (refused for CONNECT_GRACE: it is gone), or take a lower one
        that connected already; skipped while another thread connects. True once connected."""
        if peer in self._socks or not self._connecting.acquire(blocking=False):
            return peer in self._socks
        try:
            if peer in self._socks:
                return True
            if self.rank > peer:  # a lower peer connects to us: only if it already has
                try:
                    sock = self._listener.take(self.comm, peer, 0.0, self._poll)
                except TimeoutError:
                    return False
            else:
                until = min(deadline, time.monotonic() + CONNECT_GRACE)
                addr = self._addresses[peer]
                sock = connect(addr, self._secret, self.comm, self.rank, until, self._poll)
            sock.setblocking(False)
            self._socks[peer] = sock
            return True
        except (OSError, AuthenticationError) as exc:  # refused, or reset while it exits
            raise PeerError(f"cannot connect to rank {peer}: {exc}", rank=peer) from exc
        finally:
            self._connecting.release()

    # -- errors and shutdown -------------------------------------------------------------------
    def abort(self, message: str) -> None:
        payload = message.encode()[: frames.MAX_ABORT_PAYLOAD]
        header = frames.Header(frames.ABORT, self.comm, 0, 0, 0, 0, len(payload)).pack()
        for peer, sock in self._socks.items():
            with contextlib.suppress(OSError):
                if peer in self._partial:  # mid-frame: an abort would read as payload; hang up
                    sock.shutdown(socket.SHUT_RDWR)
                    continue
                sock.setblocking(True)
                sock.settimeout(0.2)
                sock.sendall(header + payload)

    def close(self) -> None:
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._socks.clear()


def _recv_blocking(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(True)
    sock.settimeout(1.0)
    try:
        return recv_exact(sock, n)
    except OSError:
        return b"(reason lost)"

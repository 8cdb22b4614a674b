"""Point-to-point messages between the ranks of one host through a shared-memory segment.

:class:`ShmTransport` has the same vocabulary as TCP (``exchange`` a round of sends and receives,
``abort``, ``close``), so any schedule runs over it, and a communicator that spans hosts can reach
its same-host peers through it while the others go over TCP (see routes.py). It never knows which
collective it serves.

Each ordered pair of ranks (a → b) owns a mailbox: two slots of ``chunk`` bytes, each with a
header (call sequence, signature, round, segment, length, piece), and two counters — ``posted``,
written only by the sender, and ``taken``, written only by the receiver. A message is cut into
pieces of at most ``chunk`` bytes; the sender fills slot ``posted % 2`` and bumps ``posted``, the
receiver checks the header against what it expects (a peer in another call is a MismatchError,
never a corrupted buffer), copies the piece out and bumps ``taken``. Where Linux cross-memory
attach works, a large message is one piece that carries the sender's buffer address instead: the
receiver copies straight from the sender's memory with one kernel copy, and the send completes
when the receiver took it. Memory stays two chunks per pair whatever the message size.

Waiting spins briefly, then yields the CPU, then sleeps in a futex wait on the rank's doorbell,
which a peer rings when it posts to or takes from a mailbox of this rank (see shm_wait).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import CollectiveTimeout, MismatchError, PeerError
from .base import Tag
from .cma import CrossMemory
from .shm_mailboxes import (
    BOX_WORDS,
    DIRECT_MIN_BYTES,
    G_ABORT,
    G_ABORT_RANK,
    G_REASON_LEN,
    H_ADDRESS,
    H_LENGTH,
    H_PIECE,
    H_ROUND,
    H_SEGMENT,
    H_SEQ,
    H_SIG,
    HDR,
    HEADERS,
    POSTED,
    R_LEFT,
    R_SLEEPING,
    REASON_MAX,
    REASON_OFFSET,
    TAKEN,
    _Segment,
    attach,
)
from .shm_segment import LINE
from .shm_wait import (
    POLL_SECONDS,
    SLEEP_MAX_SECONDS,
    SLEEP_MIN_SECONDS,
    YIELD_SECONDS,
    Futex,
    PeerWatch,
    spin_for,
)


def _bytes_of(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, np.uint8)


def _flat(view: memoryview) -> memoryview:
    """``view`` as one-dimensional bytes, which slot copies need."""
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _Op:
    """One message of a round in progress: ``done`` once every piece moved. ``data`` is its
    bytes (a NumPy view only where cross-memory attach needs an address)."""

    __slots__ = ("box", "data", "direct", "done", "length", "peer", "piece", "pieces", "send")

    def __init__(
        self, send: bool, peer: int, box: int, data: memoryview | np.ndarray, pieces: int
    ) -> None:
        self.send, self.peer, self.box, self.data = send, peer, box, data
        self.length = data.nbytes
        self.pieces = pieces  # 0 for a direct (cross-memory) message
        self.piece = 0
        self.direct = pieces == 0
        self.done = False


class ShmTransport:
    """Framed messages between the same-host ranks ``local`` (communicator ranks, sorted) of one
    communicator, through a segment they share."""

    def __init__(
        self,
        rank: int,
        size: int,
        local: Sequence[int],
        seg: _Segment,
        cma: CrossMemory | None,
        watch: PeerWatch,
        poll: Callable[[], None],
    ) -> None:
        self.rank, self.size = rank, size
        self.peers = frozenset(q for q in local if q != rank)
        self._index = {q: i for i, q in enumerate(local)}
        self._me = self._index[rank]
        self._seg = seg
        self._cma = cma
        self._watch = watch
        self._poll = poll
        self._futex = Futex()
        self._spin = spin_for(len(local))
        self._chunk = seg.layout.chunk
        self._bell_address = [seg.address + seg.layout.ranks + i * LINE for i in range(len(local))]
        self.cancel = threading.Event()  # set by routes.py when the other half of a round failed
        self._closed = False
        # Per peer: its mailbox (first control word) and the byte offsets of its two slots, for
        # sending to it and for receiving from it.
        me, lay = self._me, seg.layout
        self._out = {q: (self._box(me, i), (lay.slot(me, i, 0), lay.slot(me, i, 1)))
                     for q, i in self._index.items() if q != rank}  # fmt: skip
        self._in = {q: (self._box(i, me), (lay.slot(i, me, 0), lay.slot(i, me, 1)))
                    for q, i in self._index.items() if q != rank}  # fmt: skip
        #: A message of at most this many bytes is one piece through a slot (not a direct copy).
        self._small = min(self._chunk, DIRECT_MIN_BYTES - 1) if cma is not None else self._chunk

    def _box(self, src: int, dst: int) -> int:
        """The first control word of the mailbox from local index ``src`` to ``dst``."""
        return (src * self._seg.layout.k + dst) * BOX_WORDS

    # -- set-up -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        rank: int,
        size: int,
        local: Sequence[int],
        *,
        job: str,
        exchange: Callable[[bytes], list[bytes]],
        poll: Callable[[], None],
    ) -> ShmTransport:
        """Create (lowest local rank) or attach the segment; every rank of ``local`` calls this.

        ``exchange(b)`` all-gathers a small value among the ``local`` ranks (three rounds), so all
        of them reach the same verdict: raises ShmUnavailable alike on every one of them.
        """
        local = sorted(local)
        seg, cma, watch = attach(rank, local, job, exchange)
        return cls(rank, size, local, seg, cma, watch, poll)

    @property
    def direct(self) -> bool:
        """True when large messages are copied straight from the sender's memory."""
        return self._cma is not None

    @property
    def crowded(self) -> bool:
        """True when this host's ranks outnumber the cores (the same answer on every rank)."""
        return self._seg.crowded

    # -- the data path -------------------------------------------------------------------------
    def exchange(
        self,
        sends: Sequence[tuple[int, memoryview]],
        recvs: Sequence[tuple[int, memoryview]],
        tag: Tag,
        deadline: float,
    ) -> None:
        """Send and receive one round; see :class:`ringlet.transport.base.Transport`.

        A message that fits one slot moves at once, inline, when its slot is free (a send) or
        already filled and its header is the expected one (a receive): the common small message
        costs a few word reads and writes and one copy. Every other message, and any header that
        differs (reported by the general path), goes through :meth:`_step` and :meth:`_wait`.
        """
        words, raw, small = self._seg.words, self._seg.raw, self._small
        sig = tag.sig & 0xFFFFFFFFFFFFFFFF
        pending: list[_Op] = []
        for p, d in sends:
            n = d.nbytes
            if n <= small:
                b, slots = self._out[p]
                posted = words[b + POSTED]
                if posted - words[b + TAKEN] < 2:
                    start = slots[posted & 1]
                    raw[start : start + n] = _flat(d)
                    self._publish(b, posted, tag, n, 0)
                    self._ring(p)
                    continue
            op = self._op(True, p, self._out[p][0], d)
            if not self._step(op, tag):
                pending.append(op)
        for p, d in recvs:
            n = d.nbytes
            if n <= small:
                b, slots = self._in[p]
                taken = words[b + TAKEN]
                h = b + HEADERS + (taken & 1) * HDR
                if words[b + POSTED] > taken and words[h : h + H_ADDRESS].tolist() == [
                    tag.seq, sig, tag.round, tag.segment, n, 0
                ]:  # fmt: skip
                    start = slots[taken & 1]
                    _flat(d)[:] = raw[start : start + n]
                    words[b + TAKEN] = taken + 1
                    self._ring(p)
                    continue
            op = self._op(False, p, self._in[p][0], d)
            if not self._step(op, tag):
                pending.append(op)
        if pending:
            self._wait(pending, tag, deadline)

    def _op(self, send: bool, peer: int, box: int, data: memoryview) -> _Op:
        if self._cma is not None and data.nbytes >= DIRECT_MIN_BYTES:
            return _Op(send, peer, box, _bytes_of(data), 0)
        pieces = max(1, -(-data.nbytes // self._chunk))
        return _Op(send, peer, box, _flat(data), pieces)

    def _step(self, op: _Op, tag: Tag) -> bool:
        """Move what can move without waiting; True once the message is complete."""
        boxes = self._seg.words
        b = op.box
        while not op.done:
            posted, taken = boxes[b + POSTED], boxes[b + TAKEN]
            if op.send:
                if op.direct and op.piece:  # our buffer was published: done when it was taken
                    if taken < posted:
                        return False
                    op.done = True
                    break
                if posted - taken >= 2:
                    return False  # both slots full
                self._post(op, b, posted, tag)
            else:
                if posted <= taken:
                    return False
                self._take(op, b, taken, tag)
        return True

    def _post(self, op: _Op, b: int, posted: int, tag: Tag) -> None:
        parity = posted & 1
        if op.direct:
            h = b + HEADERS + parity * HDR
            self._seg.words[h + H_ADDRESS] = op.data.ctypes.data if op.length else 0  # type: ignore[union-attr]
        else:
            lo = op.piece * self._chunk
            n = min(self._chunk, op.length - lo)
            start = self._out[op.peer][1][parity]
            self._seg.raw[start : start + n] = op.data[lo : lo + n]  # type: ignore[assignment]
        self._publish(b, posted, tag, op.length, op.piece | (op.direct << 32))
        self._ring(op.peer)
        op.piece += 1
        if not op.direct and op.piece >= op.pieces:
            op.done = True

    def _publish(self, b: int, posted: int, tag: Tag, length: int, piece: int) -> None:
        """Write the header of mailbox ``b``'s next slot (the piece's data is already there),
        then bump ``posted``, last, so the receiver sees a complete piece."""
        words, h = self._seg.words, b + HEADERS + (posted & 1) * HDR
        words[h + H_SEQ], words[h + H_SIG] = tag.seq, tag.sig & 0xFFFFFFFFFFFFFFFF
        words[h + H_ROUND], words[h + H_SEGMENT] = tag.round, tag.segment
        words[h + H_LENGTH], words[h + H_PIECE] = length, piece
        words[b + POSTED] = posted + 1

    def _take(self, op: _Op, b: int, taken: int, tag: Tag) -> None:
        boxes, parity = self._seg.words, taken & 1
        h = b + HEADERS + parity * HDR
        self._check(op, boxes, h, tag)
        if op.direct:
            if op.length:
                assert self._cma is not None and isinstance(op.data, np.ndarray)
                try:
                    self._cma.read(self._index[op.peer], boxes[h + H_ADDRESS], op.data)
                except PeerError as exc:  # it names the peer's index on this host: say its rank
                    raise PeerError(
                        f"rank {self.rank}: rank {op.peer} exited during a shared-memory copy "
                        "from its memory",
                        rank=op.peer,
                    ) from exc
        else:
            lo = op.piece * self._chunk
            n = min(self._chunk, op.length - lo)
            start = self._in[op.peer][1][parity]
            op.data[lo : lo + n] = self._seg.raw[start : start + n]
        boxes[b + TAKEN] = taken + 1
        self._ring(op.peer)
        op.piece += 1
        if op.direct or op.piece >= op.pieces:
            op.done = True

    def _check(self, op: _Op, boxes: memoryview, h: int, tag: Tag) -> None:
        seq, sig = boxes[h + H_SEQ], boxes[h + H_SIG]
        if (seq, sig) != (tag.seq, tag.sig & 0xFFFFFFFFFFFFFFFF):
            raise MismatchError(
                f"rank {op.peer} is in call #{seq} (signature {sig:#018x}) while this rank is in "
                f"call #{tag.seq} (signature {tag.sig & 0xFFFFFFFFFFFFFFFF:#018x})"
            )
        got = (boxes[h + H_ROUND], boxes[h + H_SEGMENT], boxes[h + H_LENGTH])
        piece, direct = boxes[h + H_PIECE] & 0xFFFFFFFF, bool(boxes[h + H_PIECE] >> 32)
        if got != (tag.round, tag.segment, op.length) or (piece, direct) != (op.piece, op.direct):
            raise MismatchError(
                f"rank {op.peer} sent round {got[0]} segment {got[1]} of {got[2]} bytes where "
                f"this rank expects round {tag.round} segment {tag.segment} of {op.length} bytes "
                "(ranks chose different algorithms or sizes; check RINGLET_ALGO)"
            )

    # -- waiting -------------------------------------------------------------------------------
    def _ring(self, peer: int) -> None:
        """Wake ``peer`` if it said it may be asleep on its doorbell."""
        i = self._index[peer]
        if self._seg.rank_words[i * (LINE // 8) + R_SLEEPING]:
            bell = i * (LINE // 4)
            self._seg.bells[bell] = (int(self._seg.bells[bell]) + 1) & 0xFFFFFFFF
            self._futex.wake(self._bell_address[i])

    def _wait(self, pending: list[_Op], tag: Tag, deadline: float) -> None:
        """Progress ``pending`` until all completed: spin, then yield, then sleep on the doorbell."""
        idle = time.monotonic()
        next_check = idle + POLL_SECONDS
        sleep = SLEEP_MIN_SECONDS
        while True:
            before = (len(pending), sum(op.piece for op in pending))
            pending = [op for op in pending if not self._step(op, tag)]
            if not pending:
                return
            now = time.monotonic()
            if (len(pending), sum(op.piece for op in pending)) != before:
                idle, sleep = now, SLEEP_MIN_SECONDS
                continue
            if now >= next_check or now >= deadline or self.cancel.is_set():
                next_check = now + POLL_SECONDS
                try:
                    self._check_health(pending, deadline, now)
                except PeerError:
                    # A peer may post its last message and exit between the step above and
                    # this check: take what it left before calling it lost.
                    moved = [op for op in pending if not self._step(op, tag)]
                    if (len(moved), sum(op.piece for op in moved)) == before:
                        raise
                    pending, idle = moved, now
                    continue
            if now - idle < self._spin:
                continue
            if now - idle < self._spin + YIELD_SECONDS:
                os.sched_yield()
                continue
            self._sleep(pending, tag, min(sleep, max(deadline - now, 0.0) + 1e-4))
            sleep = min(sleep * 2, SLEEP_MAX_SECONDS)

    def _sleep(self, pending: list[_Op], tag: Tag, seconds: float) -> None:
        line = self._me * (LINE // 8)
        bell = int(self._seg.bells[self._me * (LINE // 4)])
        self._seg.ranks[line + R_SLEEPING] = 1
        try:
            if any(self._step(op, tag) for op in pending):
                return  # something moved after we announced the sleep
            self._futex.wait(self._bell_address[self._me], bell, seconds)
        finally:
            self._seg.ranks[line + R_SLEEPING] = 0

    def _check_health(self, pending: list[_Op], deadline: float, now: float) -> None:
        """Raise why the round can never finish: abort, a dead peer, the deadline, a cancel."""
        header = self._seg.header
        if header[G_ABORT]:
            raise self._aborted()
        if self.cancel.is_set():
            raise PeerError(f"rank {self.rank}: the round was cancelled", rank=None)
        self._poll()
        waiting = sorted({op.peer for op in pending})
        dead = set(self._watch.dead([self._index[q] for q in waiting]))
        left = [q for q in waiting if self._seg.ranks[self._index[q] * (LINE // 8) + R_LEFT]]
        who = [q for q in waiting if self._index[q] in dead or q in left]
        if who:
            if header[G_ABORT]:
                raise self._aborted()
            how = "closed the communicator" if who[0] in left else "died"
            raise PeerError(
                f"rank {self.rank}: rank {who[0]} {how} while this rank waited for it over "
                "shared memory; the job cannot continue, restart it",
                rank=who[0],
            )
        if now >= deadline:
            raise CollectiveTimeout(f"still waiting for ranks {waiting} (shared memory)")

    def _aborted(self) -> PeerError:
        n = min(int(self._seg.header[G_REASON_LEN]), REASON_MAX)
        raw = bytes(self._seg.bytes[REASON_OFFSET : REASON_OFFSET + n])
        dead = int(self._seg.header[G_ABORT_RANK])
        return PeerError(
            f"rank {self.rank}: stopped because a peer gave up: "
            f"{raw.decode('utf-8', 'replace') or 'no reason given'}",
            rank=dead - 1 if dead else None,
        )

    # -- errors and shutdown -------------------------------------------------------------------
    def abort(self, message: str) -> None:
        """Mark the segment aborted and wake every local rank, so none waits on this one."""
        if self._closed:
            return
        h = self._seg.header
        if not h[G_ABORT]:
            raw = message.encode("utf-8", "replace")[:REASON_MAX]
            self._seg.bytes[REASON_OFFSET : REASON_OFFSET + len(raw)] = np.frombuffer(raw, np.uint8)
            h[G_REASON_LEN] = len(raw)
            h[G_ABORT] = 1
        for i, address in enumerate(self._bell_address):
            bell = i * (LINE // 4)
            self._seg.bells[bell] = (int(self._seg.bells[bell]) + 1) & 0xFFFFFFFF
            self._futex.wake(address)

    def close(self) -> None:
        """Say this rank left (a peer still waiting on it raises PeerError at once instead of
        timing out), then unmap the segment; idempotent."""
        if not self._closed:
            self._closed = True
            self._seg.ranks[self._me * (LINE // 8) + R_LEFT] = 1
            for peer in self.peers:
                self._ring(peer)
            self._seg.close()

"""The shared segment of the shm transport: its layout (rank table, mailboxes, slots) and mapping.

A segment for ``k`` ranks holds a header page (magic, size, chunk, abort state and reason), a
rank table (a cache line per rank: doorbell, sleeping flag, pid and start time, cross-memory
probe and verdict, and whether the rank left), ``k × k`` mailboxes of control words (the
``posted``/``taken`` counters and one header per slot) and two slots of ``chunk`` bytes per
ordered pair. shm_p2p.py moves messages through it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from .cma import CrossMemory, allow_peers
from .cma import enabled as cma_enabled
from .shm_segment import LINE, PAGE, SHM_DIR, _align, _safe_job
from .shm_wait import PeerWatch, process_start_time, usable_cores

NAME_PREFIX = "ringlet-p2p-"
MAGIC = 0x32_50325054454C47  # arbitrary, checked on attach
#: Messages of at least this many bytes are copied straight from the sender's memory (one kernel
#: copy) where cross-memory attach works; smaller ones go through the mailbox slots.
DIRECT_MIN_BYTES = 128 << 10
#: Bytes of mailbox slots in the whole segment; a slot is this split over 2 slots per pair.
SLOT_BUDGET = 8 << 20
CHUNK_MIN, CHUNK_MAX = 64 << 10, 1 << 20

# Mailbox control words (uint64): the counters, then one header of HDR words per slot.
POSTED, TAKEN, HEADERS, HDR = 0, 1, 2, 7
H_SEQ, H_SIG, H_ROUND, H_SEGMENT, H_LENGTH, H_PIECE, H_ADDRESS = range(HDR)
BOX_WORDS = 16  # 128 bytes
# Per-rank line words (uint64) in the rank table; the doorbell is the first 32-bit word.
R_SLEEPING, R_PID, R_START, R_PROBE, R_VERDICT, R_LEFT = 1, 2, 3, 4, 5, 6
# Header words.
G_MAGIC, G_SIZE, G_CHUNK, G_ABORT, G_REASON_LEN, G_ABORT_RANK = range(6)
REASON_OFFSET, REASON_MAX = 64, PAGE - 64
PROBE = b"ringlet-probe-01"


class ShmUnavailable(Exception):
    """The host refused the segment; the caller falls back to TCP for these peers."""


def chunk_bytes(local_size: int) -> int:
    """Slot size for ``local_size`` ranks: the slot budget over 2 slots per ordered pair."""
    pairs = max(1, local_size * (local_size - 1))
    return max(CHUNK_MIN, min(CHUNK_MAX, SLOT_BUDGET // (2 * pairs) // PAGE * PAGE))


class _Layout:
    """Byte offsets of the regions of a segment for ``k`` ranks and slots of ``chunk`` bytes."""

    def __init__(self, k: int, chunk: int) -> None:
        self.k, self.chunk = k, chunk
        self.ranks = PAGE
        self.boxes = self.ranks + _align(k * LINE)
        self.slots = self.boxes + _align(k * k * BOX_WORDS * 8)
        self.total = self.slots + k * k * 2 * chunk

    def slot(self, src: int, dst: int, parity: int) -> int:
        return self.slots + ((src * self.k + dst) * 2 + parity) * self.chunk


class _Segment:
    """The mapped segment and typed views of its regions."""

    def __init__(self, path: str, layout: _Layout, create: bool) -> None:
        import mmap

        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, layout.total)  # a full tmpfs fails here, not mid-call
            elif os.fstat(fd).st_size != layout.total:
                raise ShmUnavailable(f"segment {path} has an unexpected size")
            self._mm: mmap.mmap | None = mmap.mmap(fd, layout.total, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.layout = layout
        #: Set by :func:`attach`, alike on every rank: more ranks share the segment than the
        #: fewest cores any of them may run on.
        self.crowded = False
        self.bytes = np.frombuffer(self._mm, np.uint8)
        self.address = int(self.bytes.ctypes.data)
        self.header = self.bytes[:PAGE].view(np.uint64)
        self.ranks = self.bytes[layout.ranks : layout.ranks + layout.k * LINE].view(np.uint64)
        self.bells = self.bytes[layout.ranks : layout.ranks + layout.k * LINE].view(np.uint32)
        n = layout.k * layout.k * BOX_WORDS
        self.boxes = self.bytes[layout.boxes : layout.boxes + n * 8].view(np.uint64)
        # The same words and bytes as memoryviews: an item is a Python int (no NumPy scalar)
        # and a slice copy is one memmove, which is what the message path does per piece.
        self.words = memoryview(self._mm)[layout.boxes : layout.boxes + n * 8].cast("Q")
        self.rank_words = memoryview(self._mm)[layout.ranks : layout.boxes].cast("Q")
        self.raw = memoryview(self._mm)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is None:
            return
        for view in (self.words, self.rank_words, self.raw):
            view.release()
        del self.bytes, self.header, self.ranks, self.bells, self.boxes, self.words, self.raw
        del self.rank_words
        with contextlib.suppress(BufferError):
            mm.close()


def attach(
    rank: int, local: Sequence[int], job: str, exchange: Callable[[bytes], list[bytes]]
) -> tuple[_Segment, CrossMemory | None, PeerWatch]:
    """Create (lowest of the sorted ``local`` ranks) or attach the segment, and probe whether
    cross-memory attach works between every pair; every rank of ``local`` calls this.

    ``exchange(b)`` all-gathers a small value among the ``local`` ranks (three rounds), so all
    of them reach the same verdict: raises ShmUnavailable alike on every one of them.
    """
    me, k = local.index(rank), len(local)
    layout = _Layout(k, chunk_bytes(k))
    problem, seg, path = "", None, ""
    if me == 0:
        path = os.path.join(SHM_DIR, f"{NAME_PREFIX}{_safe_job(job)}-{os.urandom(6).hex()}")
        try:
            seg = _Segment(path, layout, create=True)
            seg.header[G_SIZE], seg.header[G_CHUNK] = k, layout.chunk
            seg.header[G_MAGIC] = MAGIC
        except (OSError, ShmUnavailable) as exc:
            problem = f"rank {rank} cannot create {path}: {exc}"
    first = [json.loads(b) for b in exchange(json.dumps([path, problem]).encode())]
    path, problem = first[0]
    if not problem and seg is None:
        try:
            seg = _Segment(path, layout, create=False)
            if int(seg.header[G_MAGIC]) != MAGIC or int(seg.header[G_SIZE]) != k:
                raise ShmUnavailable(f"segment {path} was not made for these {k} ranks")
        except (OSError, ShmUnavailable) as exc:
            problem = f"rank {rank} cannot attach {path}: {exc}"
    probe = np.frombuffer(PROBE, np.uint8).copy()
    if seg is not None:
        allow_peers()
        line = me * (LINE // 8)
        seg.ranks[line + R_PID] = os.getpid()
        seg.ranks[line + R_START] = process_start_time(os.getpid()) or 0
        seg.ranks[line + R_PROBE] = probe.ctypes.data
    second = [json.loads(b) for b in exchange(json.dumps(problem).encode())]
    if me == 0:
        with contextlib.suppress(OSError):
            os.unlink(path)  # every rank attached (or gave up): nothing is left behind
    problems = [p for p in second if p]
    if problems:
        if seg is not None:
            seg.close()
        raise ShmUnavailable("; ".join(problems))
    assert seg is not None
    pids = [int(seg.ranks[i * (LINE // 8) + R_PID]) for i in range(k)]
    starts = [int(seg.ranks[i * (LINE // 8) + R_START]) or None for i in range(k)]
    cma = CrossMemory(me, pids)
    ok = cma_enabled() and all(
        cma.probe(i, int(seg.ranks[i * (LINE // 8) + R_PROBE]), len(PROBE)) is None
        for i in range(k)
        if i != me
    )
    verdicts = [json.loads(b) for b in exchange(json.dumps([ok, usable_cores()]).encode())]
    del probe  # the peers finished probing it in the round above
    watch = PeerWatch(list(zip(pids, starts, strict=True)))
    seg.crowded = k > min(cores for _, cores in verdicts)  # the same verdict on every rank
    return seg, cma if all(ok for ok, _ in verdicts) else None, watch

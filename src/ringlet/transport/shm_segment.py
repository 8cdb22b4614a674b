"""The shared-memory segment of one shm group: layout, creation, attachment and the control words.

Layout (every region page-aligned)::

    header      magic, version, size, stage bytes, abort word and the abort reason text
    doorbells   one 64-byte line per rank: a 32-bit futex word the *others* bump to wake it
    slots       one 128-byte control slot per rank, written only by that rank (see the word indices)
    stages      two staging buffers per rank (by step parity), ``stage_bytes`` each

The segment lives in /dev/shm as ``ringlet-{job}-{random}``; rank 0 creates it and unlinks it as
soon as every rank has attached, so a crash later leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets

import numpy as np

from ringlet.errors import ProtocolError

SHM_DIR = "/dev/shm"
NAME_PREFIX = "ringlet-"
MAGIC = 0x31_54454C474E4952  # "RINGLET1" read as a little-endian integer
VERSION = 1
PAGE = 4096
LINE = 64

# Control slot words (uint64), per rank. Pairs are indexed by call parity (seq & 1) so a peer
# already in the next call never overwrites what the others still read for this one.
SEQ = 0  # the last call this rank arrived at; written last on arrival
STEP = 1  # the last step this rank published; steps count up across calls
SIG = 2  # [2] the call signature
LAYOUT = 4  # [2] a digest of the counts the rank was given (sizes, splits)
ADDR_A = 6  # [2] address of the rank's first user buffer, for cross-memory attach
ADDR_B = 8  # [2] address of the rank's second user buffer
SLEEPING = 10  # 1 while the rank may be blocked in a futex wait on its doorbell
LEFT = 11  # 1 once the rank closed the group: it will never publish again
SLOT_WORDS = 16

# Header words (uint64).
H_MAGIC, H_VERSION, H_SIZE, H_STAGE, H_ABORT, H_REASON_LEN, H_ABORT_RANK = range(7)
REASON_OFFSET = 64
REASON_MAX = PAGE - REASON_OFFSET


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


class Layout:
    """Byte offsets of every region for ``size`` ranks and ``stage_bytes`` per staging buffer."""

    def __init__(self, size: int, stage_bytes: int) -> None:
        self.size = size
        self.stage_bytes = stage_bytes
        self.doorbells = PAGE
        self.slots = self.doorbells + _align(size * LINE)
        self.stages = self.slots + _align(size * SLOT_WORDS * 8)
        self.total = self.stages + 2 * size * stage_bytes

    def stage(self, rank: int, parity: int) -> int:
        """Offset of ``rank``'s staging buffer for steps of ``parity``."""
        return self.stages + (2 * rank + parity) * self.stage_bytes


def _safe_job(job: str) -> str:
    # /dev/shm names are file names: keep them short and free of separators.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:120] or "job"


class Segment:
    """One mapping of the group's segment, with typed views of its regions."""

    def __init__(self, name: str, mm: mmap.mmap, layout: Layout) -> None:
        self.name = name
        self.layout = layout
        self._mm: mmap.mmap | None = mm
        self.bytes = np.frombuffer(mm, dtype=np.uint8)
        self.address: int = self.bytes.ctypes.data
        self.header = memoryview(mm)[:PAGE].cast("Q")
        self.slots = memoryview(mm)[
            layout.slots : layout.slots + layout.size * SLOT_WORDS * 8
        ].cast("Q")
        self.doorbells = memoryview(mm)[
            layout.doorbells : layout.doorbells + layout.size * LINE
        ].cast("I")
        self.unlinked = False

    @classmethod
    def create(cls, job: str, size: int, stage_bytes: int) -> Segment:
        """Create, size and map a new segment in /dev/shm (rank 0)."""
        layout = Layout(size, stage_bytes)
        name = f"{NAME_PREFIX}{_safe_job(job)}-{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                # Reserve the pages now: a full tmpfs must fail here, not SIGBUS mid-collective.
                os.posix_fallocate(fd, 0, layout.total)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot reserve {layout.total} bytes in {SHM_DIR} for the shm transport "
                    f"({exc.strerror}); free space there or set RINGLET_TRANSPORT=tcp",
                ) from None
            mm = mmap.mmap(fd, layout.total, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        seg = cls(name, mm, layout)
        h = seg.header
        h[H_VERSION], h[H_SIZE], h[H_STAGE] = VERSION, size, stage_bytes
        h[H_MAGIC] = MAGIC  # last: an attaching rank checks it
        return seg

    @classmethod
    def attach(cls, name: str, size: int) -> Segment:
        """Map the segment rank 0 created; checks it was made for a group of ``size`` ranks."""
        if not name.startswith(NAME_PREFIX) or "/" in name:
            raise ProtocolError(f"shm: refusing to attach to unexpected segment name {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            total = os.fstat(fd).st_size
            if total < PAGE:
                raise ProtocolError(f"shm: segment {name} is truncated ({total} bytes)")
            mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        head = memoryview(mm)[:PAGE].cast("Q")
        magic, version, seg_size, stage = (
            head[H_MAGIC],
            head[H_VERSION],
            head[H_SIZE],
            head[H_STAGE],
        )
        head.release()
        layout = Layout(seg_size, stage)
        if magic != MAGIC or version != VERSION or seg_size != size or layout.total != total:
            mm.close()
            raise ProtocolError(
                f"shm: segment {name} does not match this group (magic {magic:#x}, version "
                f"{version}, {seg_size} ranks, {total} bytes; expected {size} ranks); are all "
                "ranks running the same ringlet version?"
            )
        return cls(name, mm, layout)

    def unlink(self) -> None:
        """Remove the name from /dev/shm; mappings stay valid until closed."""
        if not self.unlinked:
            self.unlinked = True
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass

    def stage(self, rank: int, parity: int) -> np.ndarray:
        """``rank``'s staging buffer for steps of ``parity``, as bytes."""
        start = self.layout.stage(rank, parity)
        return self.bytes[start : start + self.layout.stage_bytes]

    def set_abort(self, reason: str, dead_rank: int | None = None) -> bool:
        """Record the first abort, its reason and the rank that died (if that is the cause);
        False when the segment was aborted already."""
        h = self.header
        if h[H_ABORT]:
            return False
        raw = reason.encode("utf-8", "replace")[:REASON_MAX]
        self.bytes[REASON_OFFSET : REASON_OFFSET + len(raw)] = np.frombuffer(raw, np.uint8)
        h[H_REASON_LEN] = len(raw)
        h[H_ABORT_RANK] = 0 if dead_rank is None else dead_rank + 1
        h[H_ABORT] = 1  # last: readers see the reason complete
        return True

    def abort_rank(self) -> int | None:
        """The rank whose death caused the abort, if that was the cause."""
        value = int(self.header[H_ABORT_RANK])
        return value - 1 if value else None

    @property
    def aborted(self) -> bool:
        return bool(self.header[H_ABORT])

    def abort_reason(self) -> str:
        n = min(int(self.header[H_REASON_LEN]), REASON_MAX)
        return bytes(self.bytes[REASON_OFFSET : REASON_OFFSET + n]).decode("utf-8", "replace")

    def close(self) -> None:
        """Drop the views and unmap; idempotent."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        for view in (self.header, self.slots, self.doorbells):
            view.release()
        del self.bytes
        try:
            mm.close()
        except BufferError:
            pass  # a view handed out earlier is still alive; the mapping goes with it


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

"""Waiting on peers' control words without hanging and without hogging a core.

A wait spins for a few microseconds (ranks on separate cores answer that fast), then yields the
CPU with sched_yield, then sleeps in a futex wait on the rank's own doorbell word with a timeout
that backs off to about a millisecond. A rank that publishes a step bumps and wakes the doorbell
of every peer that said it may be sleeping, so a sleeper normally wakes at once; the timeout only
bounds the rare wake-up lost to the race between the two sides. While waiting beyond the spin,
the abort word, the deadline, the caller's poll() and the peers' liveness are checked.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from ringlet.errors import CollectiveTimeout, PeerError

from .shm_segment import LEFT, LINE, SLEEPING, SLOT_WORDS, Segment

#: Seconds of pure spinning before yielding the CPU (see :func:`spin_for`).
SPIN_SECONDS = 20e-6
#: Seconds of sched_yield() before sleeping on the futex.
YIELD_SECONDS = 50e-6
#: First and longest futex sleep (seconds); the timeout doubles from one to the other.
SLEEP_MIN_SECONDS = 50e-6
SLEEP_MAX_SECONDS = 1e-3
#: How often poll() runs and peers' pids are checked while waiting (seconds).
POLL_SECONDS = 0.05
PID_CHECK_SECONDS = 0.1

_SYS_FUTEX = 202 if os.uname().machine == "x86_64" else 98  # aarch64 and most others: 98
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def core_each(ranks: int) -> bool:
    """Whether ``ranks`` ranks on this host have a core each: only then may a waiting rank spin
    (where they outnumber the cores, a spinning rank holds the core the one it waits for needs)."""
    return ranks <= usable_cores()


def spin_for(ranks: int) -> float:
    """Seconds a waiting rank spins before it yields (none where ranks outnumber cores)."""
    return SPIN_SECONDS if core_each(ranks) else 0.0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Futex:
    """futex(2) on words of a shared mapping (not FUTEX_PRIVATE: the waker is another process)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long

    def wait(self, address: int, expected: int, seconds: float) -> None:
        """Sleep until woken, the word no longer holds ``expected``, a signal, or the timeout."""
        ts = _Timespec(int(seconds), int((seconds % 1.0) * 1e9))
        self._syscall(
            ctypes.c_long(_SYS_FUTEX),
            ctypes.c_void_p(address),
            ctypes.c_int(_FUTEX_WAIT),
            ctypes.c_int(expected),
            ctypes.byref(ts),
            None,
            ctypes.c_int(0),
        )

    def wake(self, address: int) -> None:
        """Wake every waiter on the word."""
        self._syscall(
            ctypes.c_long(_SYS_FUTEX),
            ctypes.c_void_p(address),
            ctypes.c_int(_FUTEX_WAKE),
            ctypes.c_int(0x7FFFFFFF),
            None,
            None,
            ctypes.c_int(0),
        )


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks (field 22 of /proc/pid/stat), None if it is gone.

    A pid plus its start time names a process for good; a pid alone may be reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # dead, not yet reaped by its parent
    return int(fields[19])


class PeerWatch:
    """Tells whether each peer process is still alive."""

    def __init__(self, identities: Sequence[tuple[int, int | None]]) -> None:
        # (pid, start time); start time None means the pid is not visible here (another pid
        # namespace): such a peer cannot be watched, and the deadline is what catches it.
        self.identities = list(identities)

    def dead(self, ranks: Sequence[int]) -> list[int]:
        """The ranks among ``ranks`` whose process has exited."""
        gone = []
        for r in ranks:
            pid, start = self.identities[r]
            if start is not None and process_start_time(pid) != start:
                gone.append(r)
        return gone


class Waiter:
    """Waits until every peer's control word reaches a target, or raises why it never will."""

    def __init__(
        self, seg: Segment, rank: int, size: int, watch: PeerWatch, poll: Callable[[], None] | None
    ) -> None:
        self.seg = seg
        self.rank = rank
        self.futex = Futex()
        self._slots = seg.slots
        self._bells = seg.doorbells
        self._watch = watch
        self._poll = poll
        self._peer_bases = [q * SLOT_WORDS for q in range(size) if q != rank]
        self._bell_addresses = [seg.address + seg.layout.doorbells + q * LINE for q in range(size)]
        self._my_bell = rank * (LINE // 4)
        self._my_sleeping = rank * SLOT_WORDS + SLEEPING
        self._spin = spin_for(size)
        #: Describes the current call for error messages, e.g. "all_reduce (shm call #3)".
        self.what: Callable[[], str] = lambda: "shm call"

    def wake_sleepers(self) -> None:
        """After publishing: ring the doorbell of every peer that may be asleep."""
        slots = self._slots
        for base in self._peer_bases:
            if slots[base + SLEEPING]:
                q = base // SLOT_WORDS
                i = q * (LINE // 4)
                self._bells[i] = (self._bells[i] + 1) & 0xFFFFFFFF
                self.futex.wake(self._bell_addresses[q])

    def wake_all(self) -> None:
        """Ring every doorbell (after an abort)."""
        for q, address in enumerate(self._bell_addresses):
            i = q * (LINE // 4)
            self._bells[i] = (self._bells[i] + 1) & 0xFFFFFFFF
            self.futex.wake(address)

    def wait(self, word: int, target: int, deadline: float, step: str = "") -> None:
        """Return once every peer's ``word`` is at least ``target``.

        Raises PeerError when the group was aborted or a waited-for peer died, CollectiveTimeout
        (naming the ranks not there yet) when ``deadline`` (a time.monotonic() value) passes.
        """
        slots = self._slots
        for base in self._peer_bases:
            if slots[base + word] < target:
                break
        else:
            return
        self._wait_slow(word, target, deadline, step)

    def _pending(self, word: int, target: int) -> list[int]:
        slots = self._slots
        return [b // SLOT_WORDS for b in self._peer_bases if slots[b + word] < target]

    def _wait_slow(self, word: int, target: int, deadline: float, step: str) -> None:
        slots = self._slots
        indices = [b + word for b in self._peer_bases]
        start = time.monotonic()
        spin_end = start + self._spin
        while True:  # spin: the peers are probably running on other cores right now
            for i in indices:
                if slots[i] < target:
                    break
            else:
                return
            if time.monotonic() > spin_end:
                break
        yield_end = start + YIELD_SECONDS
        next_poll = start + POLL_SECONDS
        next_pid_check = start + PID_CHECK_SECONDS
        sleep = SLEEP_MIN_SECONDS
        while True:
            indices = [i for i in indices if slots[i] < target]
            if not indices:
                return
            now = time.monotonic()
            if self.seg.aborted:
                raise self.aborted_error()
            if now >= deadline:
                self._timeout(word, target, step)
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                if self._poll is not None:
                    self._poll()
            if now >= next_pid_check:
                next_pid_check = now + PID_CHECK_SECONDS
                self._check_alive([i // SLOT_WORDS for i in indices], word, target)
            if now < yield_end:
                os.sched_yield()
                continue
            self._sleep(indices, target, min(sleep, max(deadline - now, 0.0) + 1e-4))
            sleep = min(sleep * 2, SLEEP_MAX_SECONDS)

    def _sleep(self, indices: list[int], target: int, seconds: float) -> None:
        slots, bells = self._slots, self._bells
        bell = bells[self._my_bell]
        slots[self._my_sleeping] = 1
        try:
            for i in indices:  # re-check after announcing the sleep, so a publish is not missed
                if slots[i] < target:
                    break
            else:
                return
            self.futex.wait(self._bell_addresses[self.rank], bell, seconds)
        finally:
            slots[self._my_sleeping] = 0

    def aborted_error(self) -> PeerError:
        reason = self.seg.abort_reason() or "no reason given"
        return PeerError(
            f"rank {self.rank}: {self.what()} stopped because the job was aborted: {reason}",
            rank=self.seg.abort_rank(),
        )

    def _check_alive(self, ranks: list[int], word: int, target: int) -> None:
        """PeerError if a waited-for peer died or closed the group without publishing ``target``
        (checked after the death, so a last publish just before exiting still counts)."""
        slots = self._slots
        gone = set(self._watch.dead(ranks)) | {r for r in ranks if slots[r * SLOT_WORDS + LEFT]}
        lost = sorted(r for r in gone if slots[r * SLOT_WORDS + word] < target)
        if lost:
            if self.seg.aborted:  # a peer that saw the death first may have left already
                raise self.aborted_error()
            how = {r: "closed the group" if slots[r * SLOT_WORDS + LEFT] else "died" for r in lost}
            who = ", ".join(
                f"rank {r} (pid {self._watch.identities[r][0]}) {how[r]}" for r in lost
            )
            raise PeerError(
                f"rank {self.rank}: {self.what()}: {who} while this rank waited for it; "
                "the job cannot continue, restart it",
                rank=lost[0],
            )

    def _timeout(self, word: int, target: int, step: str) -> NoReturn:
        missing = tuple(self._pending(word, target))
        ranks = ", ".join(map(str, missing))
        if step == "arrival":
            what = f"rank(s) {ranks}, which have not arrived at this call"
        else:
            what = f"rank(s) {ranks}, which arrived at this call but stopped in it ({step})"
        raise CollectiveTimeout(
            f"rank {self.rank}: {self.what()} timed out waiting for {what}; they may be stuck, "
            "busy in other work, or in a different collective. Raise the timeout if they are "
            "just slow.",
            missing=missing,
        )

"""The step protocol every shm collective runs on: arrive, publish steps, wait, read the stages.

Each rank counts *calls* (``seq``) and *steps* (``step``), both only ever growing, and publishes
them in its own control slot. A call starts with an arrival: the rank writes its first step's
data into its staging buffer of that step's parity, then its signature, layout digest and buffer
addresses (in the call parity's words), then the step and finally the call number; it waits until
every rank arrived and compares signatures. Each further step publishes the step number and waits
for every rank to reach it.

Why that is safe without any other flag: every step waits for every rank, so when a rank is at
step t all ranks have published t - 1, i.e. finished reading the data of step t - 2, which is the
staging buffer (parity t % 2) it is about to overwrite. After the wait of step t a rank may also
write its buffer of parity t + 1 (everyone is past step t - 1). Stale words are harmless because
readers compare against the number they wait for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import numpy as np

from ringlet.errors import MismatchError

from .cma import CrossMemory
from .shm_segment import ADDR_A, ADDR_B, H_ABORT, LAYOUT, SEQ, SIG, SLOT_WORDS, STEP, Segment
from .shm_wait import Waiter

#: Applied in place to a fully reduced piece before peers read it (a mean's division).
Finish = Callable[[np.ndarray], None]


class SignatureMismatch(MismatchError):
    """Ranks entered the same shm call with different signatures or layouts."""

    def __init__(self, message: str, signatures: tuple[tuple[int, int], ...]) -> None:
        super().__init__(message)
        #: (rank, signature) of every rank of the call, in rank order.
        self.signatures = signatures


class Channel:
    """One rank's side of the step protocol over a mapped segment."""

    def __init__(
        self, seg: Segment, rank: int, size: int, waiter: Waiter, cma: CrossMemory | None
    ) -> None:
        self.seg = seg
        self.rank = rank
        self.size = size
        self.waiter = waiter
        self.cma = cma
        self.slots = seg.slots
        self._header = seg.header
        self.base = rank * SLOT_WORDS
        self.bases = [q * SLOT_WORDS for q in range(size)]
        self.seq = 0  # the last call this rank arrived at
        self.step = 0  # the last step this rank published
        self.kind = ""  # the current call's name, for messages
        self.stage_bytes = seg.layout.stage_bytes
        self._stages = [[seg.stage(q, p) for q in range(size)] for p in (0, 1)]
        Views = tuple[list[np.ndarray], list[np.ndarray]]
        self._flat: dict[tuple[np.dtype, int, int], Views] = {}
        self._parts: dict[tuple[np.dtype, tuple[int, ...]], Views] = {}
        waiter.what = self.describe

    def describe(self) -> str:
        return f"{self.kind or 'shm call'} (shm call #{self.seq})"

    @property
    def parity(self) -> int:
        """Parity of the next step to publish: the staging buffers to write before publishing."""
        return (self.step + 1) & 1

    def stage(self, rank: int, parity: int, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        """Elements ``[start, start + count)`` of ``rank``'s staging buffer ``parity``, typed."""
        size = dtype.itemsize
        return self._stages[parity][rank][start * size : (start + count) * size].view(dtype)

    def flat_views(self, dtype: np.dtype, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every rank's staging buffer as ``count`` elements of ``dtype``, per parity (cached)."""
        return self.part_views(dtype, 0, count)

    def part_views(
        self, dtype: np.dtype, start: int, count: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Elements ``[start, start + count)`` of every rank's staging buffer, per parity (cached:
        the one-step paths reuse them call after call)."""
        key = (dtype, start, count)
        views = self._flat.get(key)
        if views is None:
            if len(self._flat) >= 64:
                self._flat.clear()
            views = self._flat[key] = (
                [self.stage(q, 0, dtype, start, count) for q in range(self.size)],
                [self.stage(q, 1, dtype, start, count) for q in range(self.size)],
            )
        return views

    def flat_parts(
        self, dtype: np.dtype, counts: tuple[int, ...]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Rank q's staging buffer as ``counts[q]`` elements of ``dtype``, per parity (cached)."""
        key = (dtype, counts)
        views = self._parts.get(key)
        if views is None:
            if len(self._parts) >= 64:
                self._parts.clear()
            views = self._parts[key] = (
                [self.stage(q, 0, dtype, 0, c) for q, c in enumerate(counts)],
                [self.stage(q, 1, dtype, 0, c) for q, c in enumerate(counts)],
            )
        return views

    def arrive(
        self, kind: str, sig: int, layout: int, deadline: float, addr_a: int = 0, addr_b: int = 0
    ) -> None:
        """Publish arrival at the next call (its first step's data already staged) and wait for
        every rank; raise SignatureMismatch on every rank when their signatures differ."""
        self.kind = kind
        s = self.seq = self.seq + 1
        t = self.step = self.step + 1
        p = s & 1
        slots, b = self.slots, self.base
        slots[b + SIG + p] = sig
        slots[b + LAYOUT + p] = layout
        if addr_a:
            slots[b + ADDR_A + p] = addr_a
        if addr_b:
            slots[b + ADDR_B + p] = addr_b
        slots[b + STEP] = t
        slots[b + SEQ] = s  # last: a peer that sees it sees everything above
        waiter = self.waiter
        waiter.wake_sleepers()
        waiter.wait(SEQ, s, deadline, "arrival")
        if self._header[H_ABORT]:  # the others arrived, then gave up (a timeout): do not go on
            raise waiter.aborted_error()
        for q in self.bases:
            if slots[q + SIG + p] != sig or slots[q + LAYOUT + p] != layout:
                self._mismatch(p)

    def advance(self, deadline: float, what: str = "step") -> int:
        """Publish the next step and wait until every rank published it; returns its parity."""
        t = self.step = self.step + 1
        self.slots[self.base + STEP] = t
        self.waiter.wake_sleepers()
        self.waiter.wait(STEP, t, deadline, what)
        return t & 1

    def word(self, rank: int, word: int) -> int:
        """``rank``'s value of a per-call word pair (ADDR_A, ...) for the current call."""
        return int(self.slots[rank * SLOT_WORDS + word + (self.seq & 1)])

    def _mismatch(self, p: int) -> NoReturn:
        slots = self.slots
        sigs = tuple((q // SLOT_WORDS, int(slots[q + SIG + p])) for q in self.bases)
        layouts = [int(slots[q + LAYOUT + p]) for q in self.bases]
        listing = ", ".join(f"rank {r}: {sig:#018x}" for r, sig in sigs)
        if len({sig for _, sig in sigs}) == 1:
            detail = "the same call but different counts or splits: " + ", ".join(
                f"rank {r}: {lay:#x}" for r, lay in enumerate(layouts)
            )
        else:
            detail = f"different calls (signatures {listing})"
        raise SignatureMismatch(
            f"rank {self.rank}: {self.describe()}: the ranks entered {detail}; every rank "
            "must call the same collectives in the same order with the same dtype, shape, op, "
            "root and splits",
            sigs,
        )


class Guard:
    """``with guard as ch``: the channel ``get()`` returns, and any error inside is passed to
    ``fail`` first (the group marks itself failed). Made once per group: calls allocate nothing."""

    __slots__ = ("_fail", "_get")

    def __init__(self, get: Callable[[], Channel], fail: Callable[[BaseException], None]) -> None:
        self._get, self._fail = get, fail

    def __enter__(self) -> Channel:
        return self._get()

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._fail(exc)

"""Eager small gathers: a payload that fits travels with the row counts, in one exchange.

all_gather and gather must tell every rank every rank's row count before the data moves (the
counts size the output and cut the schedule). Every rank sends a fixed-size record instead: its
row count, whether its payload fits the record, and when it does the payload's bytes. When every
rank's payload fit, the records are the result and the data move is skipped; else the data moves
as before, cut by the counts from the records. The capacity depends on the world size alone, so
every rank sizes the records alike without talking, and every rank reads every "fits" flag, so all
take the same way. scatter's eager form (the root's input in its header) is in blocks.py.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .recorder import FlightRecorder

#: Payload bytes one rank's record carries at most. Every call's records are this big, also when
#: a payload does not fit, so the constant trades the exchange saved for small calls against the
#: bytes the records add to every call. Measured at 2 ranks over shm (all_gather, capacity P vs
#: two exchanges, interleaved): eager saves ~8 us from 8 B to 1 KiB, ~5 us at 4 KiB, nothing at
#: 16 KiB; a 64 KiB call that does not fit pays +0.3-1.6 us for 1 KiB records, +2-4 us for 4 KiB
#: ones. 1 KiB keeps the whole gain at ~1-2 % of a 64 KiB call (benchmarks/README.md, "Small
#: gathers and scatters: one exchange").
EAGER_BYTES = 1 << 10
#: Payload bytes all records of one call carry at most, so that at many ranks the records (which
#: every rank receives whole, also a gather's non-roots: they read every "fits" flag) stay one
#: small message per rank rather than size x EAGER_BYTES.
EAGER_TOTAL_BYTES = 64 << 10
#: Bytes of the root's whole input scatter's header carries at most (its eager tail). Every
#: scatter broadcasts the tail, also one whose input does not fit, so it is kept small: the
#: records' budget at 2-4 ranks (size x capacity), never more than 4 KiB (a 64 KiB scatter with
#: a 2 KiB tail measured -4 to +1 us from one without, in three runs: within the noise).
SCATTER_EAGER_BYTES = 4 << 10
#: The eager way, as the flight recorder names it: prefixed to the records' own algorithm.
EAGER = "eager"
_ROWS, _FITS, _HEAD = 0, 1, 2  # int64 words of a record before its payload
_HEADER = struct.Struct("=qq")  # rows, fits: native order, as the int64 words are read


def capacity(size: int) -> int:
    """Payload bytes a record carries at ``size`` ranks: alike on every rank, a multiple of 8."""
    return min(EAGER_BYTES, EAGER_TOTAL_BYTES // max(1, size)) // 8 * 8


def scatter_capacity(size: int) -> int:
    """Bytes of the root's input scatter's header carries at ``size`` ranks (a multiple of 8)."""
    return min(SCATTER_EAGER_BYTES, max(1, size) * capacity(size))


def note(recorder: FlightRecorder) -> None:
    """Name the running call's way in the flight recorder: eager, over what carried the records."""
    if (entry := recorder.current) is not None and not entry.algorithm.startswith(EAGER):
        entry.algorithm = f"{EAGER}/{entry.algorithm}" if entry.algorithm else EAGER


class Records:
    """One call's records: this rank's (``bufs["in"]``) and every rank's after the exchange
    (``bufs["out"]``), int64 words, ``counts`` words from each rank as the all_gather moves them.

    ``arr`` is this rank's input (rows along axis 0). With ``forced`` (the algorithm forced for
    the call, by ``algo=`` or RINGLET_ALGO) the "fits" flag stays unset: that call's data moves
    by the algorithm asked for, on every rank (each reads every rank's flag). Built and read as
    bytes (a few NumPy calls cost more than the copies of a small call)."""

    def __init__(self, arr: np.ndarray, size: int, forced: str | None = None) -> None:
        cap = capacity(size)
        self.size, self.dtype, self.trailing = size, arr.dtype, arr.shape[1:]
        self.words = _HEAD + cap // 8
        mine = bytearray(self.words * 8)  # zeros: no stale memory of this rank travels
        fits = forced is None and arr.nbytes <= cap
        mine[: _HEAD * 8] = _HEADER.pack(arr.shape[0], fits)
        if fits:
            mine[_HEAD * 8 : _HEAD * 8 + arr.nbytes] = arr.tobytes()  # C order, any dtype
        self.table = np.empty(size * self.words, np.int64)
        self.bufs = {"in": np.frombuffer(mine, np.int64), "out": self.table}
        self.counts = (self.words,) * size

    @property
    def rows(self) -> list[int]:
        """Every rank's row count (after the exchange)."""
        return self.table[_ROWS :: self.words].tolist()  # type: ignore[no-any-return]

    def eager(self, recorder: FlightRecorder) -> bool:
        """True (and the way noted in the recorder) when every rank's payload came in its record."""
        if not all(self.table[_FITS :: self.words].tolist()):
            return False
        note(recorder)
        return True

    def data_counts(self) -> tuple[int, ...]:
        """Elements from each rank, as the data move (when not eager) takes them."""
        row = math.prod(self.trailing)
        return tuple(r * row for r in self.rows)

    def gathered(self) -> np.ndarray:
        """The gathered array, built from the payloads in the records (rank order, axis 0)."""
        rows, raw, step = self.rows, self.table.tobytes(), self.words * 8
        row = math.prod(self.trailing) * self.dtype.itemsize
        joined, at = bytearray(), _HEAD * 8
        for n in rows:
            joined += raw[at : at + n * row]
            at += step
        return np.frombuffer(joined, self.dtype).reshape(sum(rows), *self.trailing)

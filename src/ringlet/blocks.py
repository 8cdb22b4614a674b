"""User arrays as the blocks a collective moves along axis 0, and scatter's description of them.

Blocks follow axis 0 (a 0-d array is one row). scatter's root describes what it sends in a small
header of int64s that every rank receives before any data moves, so an invalid input at the root
is a ValueError on every rank, never a local-only error that leaves the others waiting. A root's
list of arrays is sent from the arrays themselves, a piece at a time, never concatenated whole.
An input small enough travels in the header itself (its eager tail, see eager.py): one exchange.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .arrays import to_numpy
from .calls import Call
from .eager import note, scatter_capacity
from .ops import check_dtype, dtype_code, dtype_from_code
from .path import PIECE_BYTES, PIECE_SIG
from .recorder import FlightRecorder

#: The most trailing dimensions scatter's header carries.
MAX_TRAILING = 16
#: What scatter's root sends: one flat array (no copy), or one array per rank read piece by piece.
Source = np.ndarray | list[np.ndarray]
_SCATTER_ERRORS = {
    1: "the array's first dimension is not divisible by the number of ranks",
    2: "the list does not hold one array per rank",
    3: "the list's arrays differ in dtype or in dimensions after the first",
    4: "the dtype is not supported",
    5: f"arrays with more than {MAX_TRAILING + 1} dimensions are not supported",
    6: "it is neither an array (NumPy, torch, buffer) nor a list of arrays",
}


def rows(arr: np.ndarray) -> np.ndarray:
    """Arrays as rows along axis 0 (a 0-d array is one row)."""
    return arr.reshape(1) if arr.ndim == 0 else arr


def even_blocks(arr: np.ndarray, size: int, kind: str) -> int:
    """Elements per rank of an array split evenly on axis 0; ValueError if it does not split."""
    if arr.ndim == 0 or arr.shape[0] % size:
        raise ValueError(
            f"{kind}: the first dimension ({arr.shape[0] if arr.ndim else 'a 0-d array'}) must be "
            f"divisible by the number of ranks ({size})"
        )
    return arr.size // size


class ScatterHeader:
    """What scatter's root sends first: status, dtype, whether the data moves in pieces or came
    in the header, the trailing shape, rows per rank (int64s at fixed places, see the constants
    below) and the eager tail: the root's whole input when it fits (eager.scatter_capacity)."""

    _STATUS, _DTYPE, _NDIM, _PIECED, _EAGER, _TRAILING = 0, 1, 2, 3, 4, 5
    _ROWS = _TRAILING + MAX_TRAILING

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = np.zeros(self._ROWS + size + scatter_capacity(size) // 8, np.int64)

    @classmethod
    def describe(
        cls, x: Any, size: int, forced: str | None = None
    ) -> tuple[ScatterHeader, Source | None]:
        """The root's header for ``x`` (one array split evenly, or a list of one array per rank)
        and what it sends: nothing more when the input fits the header's tail (unless an
        algorithm is ``forced`` for the call), else the array itself as one flat buffer when it
        is contiguous (no copy), else its parts, each read from its own array a piece at a time
        (:meth:`moves`); an invalid input gives a header whose status says why, and None."""
        header = cls(size)
        try:
            counts, src = _inspect(x, size)
        except _Reject as rej:
            header.data[cls._STATUS] = rej.code
            return header, None
        first = src if isinstance(src, np.ndarray) else src[0]
        d, t, ndim = header.data, cls._TRAILING, first.ndim - 1
        d[cls._DTYPE], d[cls._NDIM] = dtype_code(first.dtype), ndim
        d[t : t + ndim] = first.shape[1:]
        d[cls._ROWS : cls._ROWS + size] = counts
        rowbytes = math.prod(first.shape[1:]) * first.itemsize
        if forced is None and sum(counts) * rowbytes <= scatter_capacity(size):
            d[cls._EAGER] = 1  # the whole input rides in the tail, as bytes in rank order
            each = [src] if isinstance(src, np.ndarray) else src
            raw = b"".join(p.tobytes() for p in each)  # C order, strided or not
            header.data.view(np.uint8).data[header._tail : header._tail + len(raw)] = raw
            return header, None
        if isinstance(src, np.ndarray) and src.flags.c_contiguous:
            return header, src.reshape(-1)
        d[cls._PIECED] = 1
        return header, src if isinstance(src, list) else list(np.split(src, size))

    @property
    def _tail(self) -> int:
        """Byte offset of the eager tail in :attr:`data`."""
        return (self._ROWS + self.size) * 8

    def take(self, out: np.ndarray, rank: int, recorder: FlightRecorder) -> None:
        """When the root's input came in the header (eager): copy ``rank``'s part from the tail
        into its flat ``out`` and name the eager way in the recorder (:meth:`moves` is then
        empty). Else nothing."""
        if not self.data[self._EAGER]:
            return
        note(recorder)
        before = sum(self.rows[:rank])
        start = self._tail + before * math.prod(self.trailing) * self.dtype.itemsize
        out.view(np.uint8).data[:] = self.data.view(np.uint8).data[start : start + out.nbytes]

    def check(self, root: int) -> None:
        """ValueError (on every rank, after the header arrived) if the root's input was invalid."""
        if status := int(self.data[self._STATUS]):
            raise ValueError(
                f"scatter: root rank {root} passed invalid input: "
                f"{_SCATTER_ERRORS.get(status, 'unknown error')}"
            )

    @property
    def dtype(self) -> np.dtype:
        return dtype_from_code(int(self.data[self._DTYPE]))

    @property
    def trailing(self) -> tuple[int, ...]:
        t = self._TRAILING
        return tuple(self.data[t : t + int(self.data[self._NDIM])].tolist())

    @property
    def rows(self) -> list[int]:
        return self.data[self._ROWS : self._ROWS + self.size].tolist()  # type: ignore[no-any-return]

    def moves(
        self, source: Source | None, out: np.ndarray, rank: int
    ) -> Iterator[tuple[int, dict[str, np.ndarray], tuple[int, ...]]]:
        """The scatters that move the root's ``source`` into every rank's flat ``out``: piece
        number, buffers and counts of each, cut alike on every rank from the header alone.

        A flat source is one scatter straight from the caller's memory. A list (or a strided
        array) moves in pieces of about PIECE_BYTES: a slice of every rank's block, staged in one
        buffer of the piece's size, so the root never holds a copy of the whole message. None
        when the header carried the input (:meth:`take`)."""
        if self.data[self._EAGER]:
            return
        row = int(np.prod(self.trailing, dtype=np.int64))
        counts = tuple(r * row for r in self.rows)
        if not self.data[self._PIECED]:
            assert not isinstance(source, list)
            yield 0, {"out": out} if source is None else {"out": out, "in": source}, counts
            return
        assert not isinstance(source, np.ndarray)
        itemsize = self.dtype.itemsize
        whole = sum(counts) * itemsize <= PIECE_BYTES
        step = max(1, max(counts) if whole else PIECE_BYTES // (itemsize * self.size))
        for k, lo in enumerate(range(0, max(counts), step)):
            part = tuple(max(0, min(c, lo + step) - lo) for c in counts)
            bufs: dict[str, np.ndarray] = {"out": out[lo : lo + part[rank]]}
            if source is not None:
                bufs["in"] = _stage(source, lo, part, row, self.dtype)
            yield k, bufs, part
            bufs.clear()  # this piece's staging and scratch go before the next piece is staged


def piece_call(call: Call, k: int) -> Call:
    """``call`` itself (k = 0) or its k-th piece under a signature of its own, as path.py does,
    so the frames of two pieces are never taken for each other."""
    if not k:
        return call
    return Call(call.kind, call.seq, (call.sig + k * PIECE_SIG) & ((1 << 64) - 1), call.desc)


def _stage(
    parts: list[np.ndarray], lo: int, part: tuple[int, ...], row: int, dtype: np.dtype
) -> np.ndarray:
    """Elements ``lo … lo + part[r]`` of every rank's block, one after another in one new buffer
    (a strided block copies only the rows the piece touches)."""
    staged = np.empty(sum(part), dtype)
    at = 0
    for p, n in zip(parts, part, strict=True):
        if not n:
            continue
        if p.flags.c_contiguous:
            staged[at : at + n] = p.reshape(-1)[lo : lo + n]
        else:  # strided: copy only the rows this piece touches
            r0, r1 = lo // row, -(-(lo + n) // row)
            flat = np.ascontiguousarray(p[r0:r1]).reshape(-1)
            staged[at : at + n] = flat[lo - r0 * row : lo - r0 * row + n]
        at += n
    return staged


def _inspect(x: Any, size: int) -> tuple[list[int], Source]:
    """Rows per rank of the root's input and the input itself (one array, or its list of arrays
    as rows), or a rejection that says why it is invalid."""
    if isinstance(x, (list, tuple)):
        if len(x) != size:
            raise _Reject(2)
        parts = [rows(_scatter_input(p)) for p in x]
        first = parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
            raise _Reject(3)
    else:
        first = rows(_scatter_input(x))
        if first.shape[0] % size:
            raise _Reject(1)
    if first.ndim - 1 > MAX_TRAILING:
        raise _Reject(5)
    try:
        check_dtype(first.dtype, call="scatter")
    except TypeError:
        raise _Reject(4) from None
    if isinstance(x, (list, tuple)):
        return [p.shape[0] for p in parts], parts
    return [first.shape[0] // size] * size, first


class _Reject(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _scatter_input(x: Any) -> np.ndarray:
    """Root's input as an array, or a rejection every rank hears of (never a local-only error)."""
    try:
        return to_numpy(x, call="scatter")
    except (TypeError, ValueError):
        raise _Reject(6) from None

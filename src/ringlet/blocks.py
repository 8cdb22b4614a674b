"""User arrays as the blocks a collective moves along axis 0, and scatter's description of them.

Blocks follow axis 0 (a 0-d array is one row). scatter's root describes what it sends in a small
header of int64s that every rank receives before any data moves, so an invalid input at the root
is a ValueError on every rank, never a local-only error that leaves the others waiting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import to_numpy
from .ops import check_dtype, dtype_code, dtype_from_code

#: The most trailing dimensions scatter's header carries.
MAX_TRAILING = 16
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
    """What scatter's root sends first: status, dtype, trailing shape and rows per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = np.zeros(4 + MAX_TRAILING + size, np.int64)

    @classmethod
    def describe(cls, x: Any, size: int) -> tuple[ScatterHeader, np.ndarray | None]:
        """The root's header for ``x`` (one array split evenly, or a list of one array per rank)
        and the parts as one flat array (the array itself when it is contiguous: no copy; a list
        is concatenated); an invalid input gives a header whose status says why, and None."""
        header = cls(size)
        whole: np.ndarray | None = None
        try:
            if isinstance(x, (list, tuple)):
                if len(x) != size:
                    raise _Reject(2)
                parts = [rows(_scatter_input(p)) for p in x]
            else:
                whole = rows(_scatter_input(x))
                if whole.shape[0] % size:
                    raise _Reject(1)
                parts = list(np.split(whole, size)) if size > 1 else [whole]
            first = parts[0]
            if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
                raise _Reject(3)
            if first.ndim - 1 > MAX_TRAILING:
                raise _Reject(5)
            try:
                check_dtype(first.dtype, call="scatter")
            except TypeError:
                raise _Reject(4) from None
        except _Reject as rej:
            header.data[0] = rej.code
            return header, None
        d = header.data
        d[1], d[2] = dtype_code(first.dtype), first.ndim - 1
        d[3 : 3 + first.ndim - 1] = first.shape[1:]
        d[4 + MAX_TRAILING :] = [p.shape[0] for p in parts]
        if whole is not None:
            return header, np.ascontiguousarray(whole).reshape(-1)
        return header, np.concatenate([p.reshape(-1) for p in parts])

    def check(self, root: int) -> None:
        """ValueError (on every rank, after the header arrived) if the root's input was invalid."""
        if status := int(self.data[0]):
            raise ValueError(
                f"scatter: root rank {root} passed invalid input: "
                f"{_SCATTER_ERRORS.get(status, 'unknown error')}"
            )

    @property
    def dtype(self) -> np.dtype:
        return dtype_from_code(int(self.data[1]))

    @property
    def trailing(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data[3 : 3 + int(self.data[2])])

    @property
    def rows(self) -> list[int]:
        return [int(r) for r in self.data[4 + MAX_TRAILING :]]


class _Reject(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _scatter_input(x: Any) -> np.ndarray:
    """Root's input as an array, or a rejection every rank hears of (never a local-only error)."""
    try:
        return to_numpy(x, call="scatter")
    except (TypeError, ValueError):
        raise _Reject(6) from None

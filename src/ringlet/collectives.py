"""The collectives that move blocks rather than reduce in place: gathers, scatter, reduce_scatter, all_to_all.

Blocks follow axis 0. gather and all_gather accept first dimensions that differ between ranks: the
ranks first all-gather their row counts (a few bytes), then move the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import from_numpy_like, staged, to_numpy
from .calls import Call
from .core import _check_root
from .inplace import InPlaceCollectives
from .ops import ReduceOp, check_dtype, dtype_code, dtype_from_code, finish_mean, wire_op
from .work import Work

#: Signature bit of the row-count exchange that precedes a gather's data.
COUNTS_PHASE = 0x5A5A_0000_0000_0001
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

_MEAN = ReduceOp.MEAN


def _phase(call: Call) -> Call:
    """The same call under its own signature, for the small exchange that precedes its data."""
    return Call(call.kind, call.seq, call.sig ^ COUNTS_PHASE, call.desc)


def _rows(arr: np.ndarray) -> np.ndarray:
    """Arrays as rows along axis 0 (a 0-d array is one row)."""
    return arr.reshape(1) if arr.ndim == 0 else arr


class Collectives(InPlaceCollectives):
    """gather, all_gather, scatter, reduce_scatter, all_to_all."""

    def _exchange_counts(self, call: Call, rows: int, deadline: float) -> list[int]:
        """All-gather every rank's row count (run inside a call, under its own signature)."""
        mine = np.array([rows], np.int64)
        out = np.empty(self.size, np.int64)
        phase = _phase(call)
        if (group := self._group("all_gather", None)) is not None:
            group.all_gather(mine, out, [1] * self.size, phase.sig, deadline)
        elif self.size > 1:
            self._run(
                phase,
                "all_gather",
                None,
                8,
                {"in": mine, "out": out},
                None,
                deadline,
                counts=(1,) * self.size,
            )
        else:
            out[:] = mine
        return [int(c) for c in out]

    def all_gather(
        self,
        x: Any,
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Every rank gets ``[x_0 | x_1 | … ]`` along axis 0 (first dimensions may differ)."""
        arr = _rows(to_numpy(x, call="all_gather"))
        check_dtype(arr.dtype, call="all_gather")
        call = self._call("all_gather", arr.dtype, arr.shape[1:])
        row = int(np.prod(arr.shape[1:], dtype=np.int64))

        def body(deadline: float) -> Any:
            rows = self._exchange_counts(call, arr.shape[0], deadline)
            out = np.empty((sum(rows), *arr.shape[1:]), arr.dtype)
            flat_in, _ = staged(arr)
            flat_out = out.reshape(-1)
            counts = [r * row for r in rows]
            if (group := self._group("all_gather", algo)) is not None:
                group.all_gather(flat_in, flat_out, counts, call.sig, deadline)
            elif self.size > 1:
                self._run(
                    call,
                    "all_gather",
                    algo,
                    flat_out.nbytes,
                    {"in": flat_in, "out": flat_out},
                    None,
                    deadline,
                    counts=tuple(counts),
                )
            else:
                flat_out[:] = flat_in
            return from_numpy_like(x, out)

        return self._submit(call, body, async_op, timeout)

    def gather(
        self,
        x: Any,
        root: int = 0,
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Root gets ``[x_0 | x_1 | … ]`` along axis 0 in rank order; the others get None."""
        arr = _rows(to_numpy(x, call="gather"))
        root = _check_root(root, self.size, "gather")
        check_dtype(arr.dtype, call="gather")
        call = self._call("gather", arr.dtype, arr.shape[1:], root=root)
        row = int(np.prod(arr.shape[1:], dtype=np.int64))

        def body(deadline: float) -> Any:
            rows = self._exchange_counts(call, arr.shape[0], deadline)
            counts = [r * row for r in rows]
            flat_in, _ = staged(arr)
            out = np.empty((sum(rows), *arr.shape[1:]), arr.dtype) if self.rank == root else None
            flat_out = out.reshape(-1) if out is not None else None
            if (group := self._group("gather", algo)) is not None:
                group.gather(flat_in, flat_out, counts, root, call.sig, deadline)
            elif self.size > 1:
                bufs = {"in": flat_in} if flat_out is None else {"in": flat_in, "out": flat_out}
                self._run(
                    call,
                    "gather",
                    algo,
                    sum(counts) * arr.itemsize,
                    bufs,
                    None,
                    deadline,
                    counts=tuple(counts),
                    root=root,
                )
            elif flat_out is not None:
                flat_out[:] = flat_in
            return None if out is None else from_numpy_like(x, out)

        return self._submit(call, body, async_op, timeout)

    def _scatter_header(self, x: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        """Root's description of what it scatters, as int64s every rank can read; status 0 = valid."""
        header = np.zeros(4 + MAX_TRAILING + self.size, np.int64)
        parts: list[np.ndarray] = []
        try:
            if isinstance(x, (list, tuple)):
                if len(x) != self.size:
                    raise _Reject(2)
                parts = [_rows(_scatter_input(p)) for p in x]
            else:
                whole = _rows(_scatter_input(x))
                if whole.shape[0] % self.size:
                    raise _Reject(1)
                parts = list(np.split(whole, self.size)) if self.size > 1 else [whole]
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
            header[0] = rej.code
            return header, []
        header[1], header[2] = dtype_code(first.dtype), first.ndim - 1
        header[3 : 3 + first.ndim - 1] = first.shape[1:]
        header[4 + MAX_TRAILING :] = [p.shape[0] for p in parts]
        return header, parts

    def scatter(
        self,
        x: Any,
        root: int = 0,
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Root passes one array (split evenly on axis 0) or a list of N arrays; each rank gets its part."""
        root = _check_root(root, self.size, "scatter")
        call = self._call("scatter", None, (), root=root)

        def body(deadline: float) -> Any:
            header, parts = (
                self._scatter_header(x)
                if self.rank == root
                else (np.zeros(4 + MAX_TRAILING + self.size, np.int64), [])
            )
            self._broadcast_in_call(call, header, root, deadline)
            if header[0]:
                raise ValueError(
                    f"scatter: root rank {root} passed invalid input: "
                    f"{_SCATTER_ERRORS.get(int(header[0]), 'unknown error')}"
                )
            dtype = dtype_from_code(int(header[1]))
            trailing = tuple(int(d) for d in header[3 : 3 + int(header[2])])
            row = int(np.prod(trailing, dtype=np.int64))
            counts = [int(r) * row for r in header[4 + MAX_TRAILING :]]
            out = np.empty((int(header[4 + MAX_TRAILING + self.rank]), *trailing), dtype)
            flat_in = np.concatenate([p.reshape(-1) for p in parts]) if parts else None
            if (group := self._group("scatter", algo)) is not None:
                group.scatter(flat_in, out.reshape(-1), counts, root, call.sig, deadline)
            elif self.size > 1:
                bufs = {"out": out.reshape(-1)}
                if flat_in is not None:
                    bufs["in"] = flat_in
                self._run(
                    call,
                    "scatter",
                    algo,
                    sum(counts) * dtype.itemsize,
                    bufs,
                    None,
                    deadline,
                    counts=tuple(counts),
                    root=root,
                )
            else:
                out.reshape(-1)[:] = flat_in if flat_in is not None else out.reshape(-1)
            template = (
                x
                if self.rank == root and not isinstance(x, (list, tuple))
                else (x[0] if isinstance(x, (list, tuple)) and x else out)
            )
            return from_numpy_like(template, out)

        return self._submit(call, body, async_op, timeout)

    def _broadcast_in_call(
        self, call: Call, header: np.ndarray, root: int, deadline: float
    ) -> None:
        self._broadcast_flat(_phase(call), header, root, deadline)

    def _even_blocks(self, arr: np.ndarray, kind: str) -> int:
        if arr.ndim == 0 or arr.shape[0] % self.size:
            raise ValueError(
                f"{kind}: the first dimension ({arr.shape[0] if arr.ndim else 'a 0-d array'}) must be "
                f"divisible by the number of ranks ({self.size})"
            )
        return arr.size // self.size

    def reduce_scatter(
        self,
        x: Any,
        op: str | ReduceOp = "sum",
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """``x`` split evenly on axis 0; rank i gets part i of the reduction over ranks."""
        arr, rop = self._reducible(x, op, "reduce_scatter")
        block = self._even_blocks(arr, "reduce_scatter")
        call = self._call("reduce_scatter", arr.dtype, arr.shape, rop.value)

        def body(deadline: float) -> Any:
            out = np.empty((arr.shape[0] // self.size, *arr.shape[1:]), arr.dtype)
            flat_in, _ = staged(arr)
            sent = wire_op(rop)
            counts = [block] * self.size
            if (group := self._group("reduce_scatter", algo)) is not None:
                group.reduce_scatter(flat_in, out.reshape(-1), counts, sent, call.sig, deadline)
            elif self.size > 1:
                self._run(
                    call,
                    "reduce_scatter",
                    algo,
                    flat_in.nbytes,
                    {"in": flat_in, "out": out.reshape(-1)},
                    sent,
                    deadline,
                    counts=tuple(counts),
                )
            else:
                out.reshape(-1)[:] = flat_in
            if rop is _MEAN:
                finish_mean(out.reshape(-1), self.size)
            return from_numpy_like(x, out)

        return self._submit(call, body, async_op, timeout)

    def all_to_all(
        self,
        x: Any,
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """``x`` split evenly on axis 0; part j goes to rank j; returns the received parts in rank order."""
        arr = to_numpy(x, call="all_to_all")
        check_dtype(arr.dtype, call="all_to_all")
        block = self._even_blocks(arr, "all_to_all")
        call = self._call("all_to_all", arr.dtype, arr.shape)

        def body(deadline: float) -> Any:
            out = np.empty_like(arr, order="C")
            flat_in, _ = staged(arr)
            counts = [block] * self.size
            if (group := self._group("all_to_all", algo)) is not None:
                group.all_to_all(flat_in, out.reshape(-1), counts, counts, call.sig, deadline)
            elif self.size > 1:
                self._run(
                    call,
                    "all_to_all",
                    algo,
                    flat_in.nbytes,
                    {"in": flat_in, "out": out.reshape(-1)},
                    None,
                    deadline,
                    send_counts=tuple(counts),
                    recv_counts=tuple(counts),
                )
            else:
                out.reshape(-1)[:] = flat_in
            return from_numpy_like(x, out)

        return self._submit(call, body, async_op, timeout)


class _Reject(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _scatter_input(x: Any) -> np.ndarray:
    """Root's input as an array, or a rejection every rank hears of (never a local-only error)."""
    try:
        return to_numpy(x, call="scatter")
    except (TypeError, ValueError):
        raise _Reject(6) from None


__all__ = ["Collectives", "Work"]

"""barrier, broadcast and the reducing collectives that work in place: all_reduce and reduce.

``mean`` travels as a sum and is divided once at the end (over shared memory: each reduced piece,
while it is in cache), so it is exact for floats.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from .arrays import staged, to_numpy
from .calls import Call
from .core import CommunicatorCore, _check_root, _checked
from .ops import ReduceOp, check_dtype, finish_mean, wire_op
from .work import Work

_MEAN = ReduceOp.MEAN


class InPlaceCollectives(CommunicatorCore):
    """barrier, broadcast, all_reduce, reduce (results land in the caller's array)."""

    def barrier(self, *, async_op: bool = False, timeout: float | None = None) -> Work | None:
        """Block until every rank of the communicator has entered the barrier."""
        call = self._call("barrier", None, ())

        def body(deadline: float) -> None:
            if (group := self._group("barrier", None)) is not None:
                group.barrier(call.sig, deadline)
            elif self.size > 1:
                self._run(call, "barrier", None, 1, {"tmp": np.zeros(1, np.uint8)}, None, deadline)

        return self._submit(call, body, async_op, timeout)  # type: ignore[no-any-return]

    def broadcast(
        self,
        x: Any,
        root: int = 0,
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Copy root's ``x`` into ``x`` on every rank, in place; returns ``x``."""
        arr = to_numpy(x, call="broadcast", writable=True)
        root = _check_root(root, self.size, "broadcast")
        check_dtype(arr.dtype, call="broadcast")
        call = self._call("broadcast", arr.dtype, arr.shape, root=root)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            self._broadcast_flat(call, flat, root, deadline, algo)
            if self.rank != root:
                writeback()
            return x

        return self._submit(call, body, async_op, timeout)

    def _broadcast_flat(
        self, call: Call, flat: np.ndarray, root: int, deadline: float, algo: str | None = None
    ) -> None:
        """Copy root's contiguous ``flat`` into ``flat`` on every rank, as part of ``call``."""
        if (group := self._group("broadcast", algo)) is not None:
            group.broadcast(flat, root, call.sig, deadline)
        elif self.size > 1:
            self._run(
                call,
                "broadcast",
                algo,
                flat.nbytes,
                {"out": flat},
                None,
                deadline,
                count=flat.size,
                root=root,
            )

    def all_reduce(
        self,
        x: Any,
        op: str | ReduceOp = "sum",
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Reduce ``x`` over all ranks with ``op``; every rank gets the result in place. Returns ``x``."""
        arr, rop = self._reducible(x, op, "all_reduce")
        call = self._call("all_reduce", arr.dtype, arr.shape, rop.value)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            sent = wire_op(rop)
            finish = partial(finish_mean, size=self.size) if rop is _MEAN else None
            if (group := self._group("all_reduce", algo)) is not None:
                group.all_reduce(flat, sent, call.sig, deadline, finish)  # divides in cache
            else:
                if self.size > 1:
                    self._run(
                        call,
                        "all_reduce",
                        algo,
                        flat.nbytes,
                        {"out": flat},
                        sent,
                        deadline,
                        count=flat.size,
                    )
                if finish is not None:
                    finish(flat)
            writeback()
            return x

        return self._submit(call, body, async_op, timeout)

    def reduce(
        self,
        x: Any,
        root: int = 0,
        op: str | ReduceOp = "sum",
        *,
        async_op: bool = False,
        timeout: float | None = None,
        algo: str | None = None,
    ) -> Any:
        """Reduce ``x`` over all ranks into ``x`` on ``root``; other ranks' ``x`` is unchanged."""
        arr, rop = self._reducible(x, op, "reduce")
        root = _check_root(root, self.size, "reduce")
        call = self._call("reduce", arr.dtype, arr.shape, rop.value, root)

        def body(deadline: float) -> Any:
            flat, writeback = staged(arr)
            sent = wire_op(rop)
            result = flat if self.rank == root else None
            if (group := self._group("reduce", algo)) is not None:
                group.reduce(flat, result, root, sent, call.sig, deadline)
            elif self.size > 1:
                work = flat if self.rank == root else flat.copy()
                self._run(
                    call,
                    "reduce",
                    algo,
                    flat.nbytes,
                    {"out": work},
                    sent,
                    deadline,
                    count=flat.size,
                    root=root,
                )
            if result is not None:
                if rop is _MEAN:
                    finish_mean(result, self.size)
                writeback()
            return x

        return self._submit(call, body, async_op, timeout)

    def _reducible(self, x: Any, op: str | ReduceOp, kind: str) -> tuple[np.ndarray, ReduceOp]:
        arr = to_numpy(x, call=kind, writable=True)
        try:
            return arr, _checked(op, arr.dtype, kind)
        except TypeError:
            if isinstance(op, str | ReduceOp):
                raise
            return arr, _checked.__wrapped__(op, arr.dtype, kind)  # unhashable op: a clear error

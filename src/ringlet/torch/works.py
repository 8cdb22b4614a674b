"""torch Works and Futures over ringlet's asynchronous calls, and torch's reduce ops in ringlet's terms.

A torch.distributed call on backend "ringlet" issues one or more ringlet calls with
``async_op=True`` (issue order is execution order, so every rank runs them alike) and returns a
:class:`RingletWork`. Its torch Future completes on ringlet's progress thread once the last of
those calls finished and an optional ``finish`` step (copying results into torch's output
tensors) ran; its value is what torch's own backends return: the list of output tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

import ringlet
from ringlet.errors import PeerError, RingletError

from .resolvers import resolve

__all__ = [
    "Delivery",
    "RecvWork",
    "RingletWork",
    "as_future",
    "completed",
    "received",
    "reduce_op",
    "torch_error",
]


def torch_error(exc: BaseException) -> BaseException:
    """ringlet's errors as torch's: PeerError → DistNetworkError, others → DistBackendError.

    Argument errors (ValueError, TypeError) are already what torch raises and pass unchanged; the
    original error stays attached as ``__cause__``.
    """
    if not isinstance(exc, RingletError):
        return exc
    kind = dist.DistNetworkError if isinstance(exc, PeerError) else dist.DistBackendError
    err = kind(f"ringlet: {exc}")
    err.__cause__ = exc
    return err


class RingletWork(dist.Work):  # type: ignore[misc]
    """The torch Work of a ringlet call: ``wait()`` raises the call's error, ``get_future()`` chains."""

    def __init__(
        self, future: torch.futures.Future[Any], desc: str = "", delivery: Delivery | None = None
    ) -> None:
        super().__init__()
        self._future = future
        self._desc = desc
        self._delivery = delivery  # lets wait() resolve the future itself, a thread hop sooner
        # Set by a done callback, which torch may run after ``future.wait()`` has already returned
        # to another thread: completion is read from the future itself, the event only serves a
        # wait with a timeout.
        self._done = threading.Event()
        future.add_done_callback(lambda _: self._done.set())

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        """Block until the call finished (or ``timeout`` passed, if not zero); raise its error."""
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout or 0)
        if self._future.done():
            pass
        elif self._delivery is not None:  # wake as the outcome is known, and deliver it here
            if not self._delivery.known.wait(seconds if seconds > 0 else None):
                raise self._late(seconds)
            self._delivery.hand_over()  # unless the resolver thread already did
        elif seconds > 0 and not self._done.wait(seconds):
            raise self._late(seconds)
        self._future.wait()  # raises the call's error
        return True

    def _late(self, seconds: float) -> BaseException:
        return dist.DistBackendError(
            f"ringlet: {self._desc or 'the call'} did not finish within {seconds} s of waiting; "
            "a rank may be late or stuck (the call itself keeps its own deadline)"
        )

    def get_future(self) -> torch.futures.Future[Any]:
        return self._future

    def is_completed(self) -> bool:
        """True once the call finished, in success or error (at the latest when ``wait()`` returned)."""
        return bool(self._future.done())

    def is_success(self) -> bool:
        return self.is_completed() and self.exception() is None

    def exception(self) -> BaseException | None:
        if not self.is_completed():
            return None
        try:
            self._future.wait()
        except BaseException as exc:
            return exc
        return None

    def result(self) -> Any:
        return self._future.wait()

    def synchronize(self) -> None:
        """CPU tensors have no streams to synchronize."""

    def __repr__(self) -> str:
        return f"<RingletWork {self._desc} {'done' if self.is_completed() else 'pending'}>"


class Delivery:
    """Who resolves a future once its outcome is known: a resolver thread, or a thread waiting in
    ``RingletWork.wait()`` that gets there first (it wakes straight from ringlet's progress
    thread, one thread hop sooner; the future's callbacks then run on that thread)."""

    def __init__(self) -> None:
        self.known = threading.Event()
        self._lock = threading.Lock()
        self._deliver: Callable[[], None] | None = None

    def settle(self, deliver: Callable[[], None]) -> None:
        """The outcome is known (on ringlet's progress thread): hand ``deliver`` on."""
        self._deliver = deliver
        self.known.set()
        resolve(self.hand_over)

    def hand_over(self) -> None:
        """Resolve the future, unless another thread already took that on."""
        with self._lock:
            deliver, self._deliver = self._deliver, None
        if deliver is not None:
            deliver()


def _pending(
    works: Sequence[ringlet.Work], finish: Callable[[list[Any]], Any]
) -> tuple[torch.futures.Future[Any], Delivery]:
    future: torch.futures.Future[Any] = torch.futures.Future()
    delivery = Delivery()
    remaining = [len(works)]
    lock = threading.Lock()

    def settle() -> None:
        for work in works:
            if (exc := work.exception()) is not None:
                delivery.settle(partial(future.set_exception, torch_error(exc)))
                return
        try:
            value = finish([work.wait() for work in works])
        except BaseException as exc:
            delivery.settle(partial(future.set_exception, torch_error(exc)))
            return
        delivery.settle(partial(future.set_result, value))

    def one_done(_: ringlet.Work) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            settle()

    if not works:
        settle()
    for work in works:
        work.add_done_callback(one_done)
    return future, delivery


def as_future(
    works: Sequence[ringlet.Work], finish: Callable[[list[Any]], Any]
) -> torch.futures.Future[Any]:
    """A torch Future resolved with ``finish(results)`` once every work finished, or with the first error.

    ``finish`` runs on the thread that finished the last work (ringlet's progress thread), or
    right here when ``works`` is empty or already done; the future is resolved, and its
    callbacks run, on a resolver thread (see :mod:`ringlet.torch.resolvers`), or on a thread
    waiting for it in ``RingletWork.wait()`` that got there first (:class:`Delivery`).
    """
    return _pending(works, finish)[0]


def completed(
    works: Sequence[ringlet.Work], finish: Callable[[list[Any]], Any], desc: str
) -> RingletWork:
    """The torch Work of ``works`` (see :func:`as_future`)."""
    future, delivery = _pending(works, finish)
    return RingletWork(future, desc, delivery)


class RecvWork(RingletWork):
    """The Work of a receive: ``_source_rank()`` is the rank the message came from once it
    completed, -1 before (as Gloo's); ``dist.recv`` without ``src`` returns it."""

    def __init__(
        self,
        future: torch.futures.Future[Any],
        desc: str,
        delivery: Delivery,
        source: list[int],
    ) -> None:
        super().__init__(future, desc, delivery)
        self._source = source  # set before the future completes, by the receive's finish step

    def _source_rank(self) -> int:
        return self._source[0]


def received(work: ringlet.Work, t: torch.Tensor, src: int | None, desc: str) -> RecvWork:
    """The torch Work of ringlet receive ``work`` into ``t`` from ``src`` (None: any source,
    whose ringlet result is ``(array, source)``)."""
    source = [-1]

    def finish(res: list[Any]) -> list[torch.Tensor]:
        source[0] = res[0][1] if src is None else src
        return [t]

    future, delivery = _pending([work], finish)
    return RecvWork(future, desc, delivery, source)


_OPS: dict[Any, str] = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "mean",
    dist.ReduceOp.PRODUCT: "prod",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.BAND: "band",
    dist.ReduceOp.BOR: "bor",
    dist.ReduceOp.BXOR: "bxor",
}


def reduce_op(op: Any, call: str) -> tuple[str, float | torch.Tensor | None]:
    """torch's ReduceOp (or its RedOpType) as ringlet's op name, plus PREMUL_SUM's factor (else None).

    PREMUL_SUM(f) is run as ``sum`` of the inputs scaled by ``f``. Raises ValueError for an op
    ringlet has no equivalent of.
    """
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = op.factor
        if factor is None:
            raise ValueError(
                f"{call}: ReduceOp.PREMUL_SUM needs a factor "
                "(build it with torch.distributed._make_nccl_premul_sum(factor))"
            )
        return "sum", factor
    for member, name in _OPS.items():
        if kind == member:
            return name, None
    raise ValueError(
        f"{call}: reduce op {op!r} is not supported by backend 'ringlet'; use SUM, "
        "AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR or PREMUL_SUM"
    )


def premultiply(
    tensor: torch.Tensor, factor: float | torch.Tensor, call: str, *, in_place: bool
) -> torch.Tensor:
    """``tensor * factor`` for PREMUL_SUM (floating dtypes only), in place or as a new tensor."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(
            f"{call}: ReduceOp.PREMUL_SUM needs a floating-point tensor, not {tensor.dtype}"
        )
    if in_place:
        return tensor.detach().mul_(factor)
    return tensor.detach() * factor

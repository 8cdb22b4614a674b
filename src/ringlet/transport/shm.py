"""Collectives between the ranks of one host through a shared-memory segment.

:class:`ShmGroup` is what the communicator calls when every rank of a communicator is on this
host. Messages move through the segment's staging buffers (shm_staged): small ones in one step
(each rank stages its data, publishes its arrival, and reads what it needs), large ones in
pipelined, double-buffered chunks. Where Linux cross-memory attach works, some large messages
are instead copied straight from the peers' own buffers with one kernel copy (shm_cma); which,
from what size, is a named threshold per op in shm_tuning, chosen from measurements. The
protocol under both is described in shm_channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ringlet.errors import PeerError, RingletError
from ringlet.ops import Binary, ReduceOp, binary

from . import shm_cma, shm_staged
from .cma import CrossMemory
from .shm_channel import Channel, Finish, Guard, SignatureMismatch
from .shm_plan import Plan, check_root
from .shm_segment import LEFT, SLOT_WORDS
from .shm_setup import ShmUnavailable, join
from .shm_tuning import ShmTuning
from .shm_wait import Waiter

__all__ = ["ShmGroup", "ShmTuning", "ShmUnavailable", "SignatureMismatch"]

#: The ways a call goes, as the flight recorder names them: every rank's data staged and read in
#: one step; pipelined through double-buffered staging chunks; copied from the peers' buffers.
ONE_STEP, STAGED, SINGLE_COPY = "one_step", "staged", "single_copy"


class ShmGroup:
    """The ranks of one communicator on this host, joined through a shared-memory segment.

    Every method blocks until this rank's part is done; all take ``sig`` (the caller's 64-bit
    digest of the call) and ``deadline`` (a time.monotonic() value). Raised: SignatureMismatch
    (a MismatchError) on every rank when the ranks' calls differ, CollectiveTimeout naming the
    ranks that did not arrive, PeerError when a peer died or the group was aborted. After any
    of these the group is unusable; later calls raise RingletError.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        channel: Channel | None,
        cma: CrossMemory | None,
        tuning: ShmTuning,
    ) -> None:
        self.rank = rank
        self.size = size
        self.tuning = tuning
        self._ch = channel
        self._cma = cma
        assert tuning.cma_min_bytes is not None and tuning.flat_reduce_bytes is not None
        self._cma_min = tuning.cma_min_bytes
        self._flat_reduce_bytes = min(tuning.flat_reduce_bytes, tuning.stage_bytes)
        self._scratch = shm_cma.Scratch(tuning.scratch_bytes)
        self._binaries: dict[tuple[ReduceOp, np.dtype], Binary] = {}
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._broken: BaseException | None = None
        self._closed = False
        self.note: Callable[[str], None] = lambda way: None  # told each call's way (recorder)
        self._guard = Guard(self._channel, self._fail)

    # -- set-up -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        rank: int,
        size: int,
        *,
        job: str,
        exchange: Callable[[bytes], list[bytes]],
        timeout: float,
        poll: Callable[[], None] | None = None,
        tuning: ShmTuning | None = None,
    ) -> ShmGroup:
        """Create (rank 0) or attach the group's segment; every rank of the group must call it.

        ``exchange(b)`` all-gathers a small bytes value among the ranks; it is called three times.
        ``tuning`` (default: :meth:`ShmTuning.from_env`) counts on rank 0 only: the others adopt
        it, so every rank picks the same path for every call. Cross-memory attach is used only
        when every rank can read every peer. ``timeout`` is kept for callers.
        """
        if not 0 <= rank < size:
            raise ValueError(f"shm: rank {rank} is not in a group of {size}")
        tuning = tuning or ShmTuning.from_env()
        tuning.check()
        if size == 1:
            return cls(rank, size, None, None, tuning.fitted(1))
        seg, cma, watch, tuning = join(rank, size, job, exchange, tuning)
        waiter = Waiter(seg, rank, size, watch, poll)
        return cls(rank, size, Channel(seg, rank, size, waiter, cma), cma, tuning)

    @property
    def uses_cma(self) -> bool:
        """True when large messages are copied straight between the ranks' buffers."""
        return self._cma is not None

    def abort(self, rank_reason: str) -> None:
        """Mark the group aborted so every rank waiting in it raises PeerError promptly."""
        ch = self._ch
        if ch is None or self._closed:
            return
        if ch.seg.set_abort(rank_reason):
            ch.waiter.wake_all()
        if self._broken is None:
            self._broken = RingletError(f"the shm group was aborted: {rank_reason}")

    def close(self) -> None:
        """Say this rank left (peers still waiting on it raise PeerError at once instead of
        timing out), then unmap the segment; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ch is not None:
            self._ch.seg.slots[self.rank * SLOT_WORDS + LEFT] = 1
            self._ch.waiter.wake_all()
            self._ch.seg.close()

    # -- the collectives ----------------------------------------------------------------------
    def _channel(self) -> Channel:
        if self._closed:
            raise RingletError(f"rank {self.rank}: the shm group is closed")
        if self._broken is not None:
            raise RingletError(
                f"rank {self.rank}: the shm group failed earlier and cannot be used: {self._broken}"
            ) from self._broken
        assert self._ch is not None
        return self._ch

    def _plan(self, kind: str, counts: Sequence[int]) -> Plan:
        """The checked, digested form of ``counts`` (cached: callers repeat their splits)."""
        key = tuple(counts)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[key] = Plan(kind, key, self.size)
        return plan

    def _binary(self, op: ReduceOp, dtype: np.dtype) -> Binary:
        key = (op, dtype)
        f = self._binaries.get(key)
        if f is None:
            f = self._binaries[key] = binary(op, dtype)
        return f

    def _way(self, kind: str, nbytes: int, one_step: bool) -> tuple[str, CrossMemory | None]:
        """Which way a call of ``nbytes`` goes (told to :attr:`note`), and the cross-memory
        handle when it is a single copy."""
        if one_step:
            way, cma = ONE_STEP, None
        elif self._cma is not None and nbytes >= self._cma_min[kind]:
            way, cma = SINGLE_COPY, self._cma
        else:
            way, cma = STAGED, None
        self.note(way)
        return way, cma

    def run(
        self,
        op: str,
        bufs: dict[str, np.ndarray],
        rop: ReduceOp | None,
        sig: int,
        deadline: float,
        finish: Finish | None = None,
        **kw: Any,
    ) -> None:
        """Collective ``op`` on a call's named buffers ("in", "out": the engine's names) with the
        arguments its schedule would take (``count``, ``counts``, ``root``, …); ``finish`` is
        applied to this rank's result (an all_reduce's in cache, piece by piece)."""
        inp, out, counts, root = bufs.get("in"), bufs.get("out"), kw.get("counts"), kw.get("root")
        if op == "all_reduce":
            assert out is not None and rop is not None
            return self.all_reduce(out, rop, sig, deadline, finish)
        if op == "reduce":
            assert out is not None and rop is not None and root is not None
            self.reduce(out, out if self.rank == root else None, root, rop, sig, deadline)
        elif op == "broadcast":
            assert out is not None and root is not None
            self.broadcast(out, root, sig, deadline)
        elif op == "all_gather":
            assert inp is not None and out is not None and counts is not None
            self.all_gather(inp, out, counts, sig, deadline)
        elif op == "gather":
            assert inp is not None and counts is not None and root is not None
            self.gather(inp, out, counts, root, sig, deadline)
        elif op == "scatter":
            assert out is not None and counts is not None and root is not None
            self.scatter(inp, out, counts, root, sig, deadline)
        elif op == "reduce_scatter":
            assert inp is not None and out is not None and counts is not None and rop is not None
            self.reduce_scatter(inp, out, counts, rop, sig, deadline)
        elif op == "barrier":
            self.barrier(sig, deadline)
        else:
            raise ValueError(f"the shm group has no collective {op!r}")
        if finish is not None and out is not None:
            finish(out)

    def all_reduce(
        self,
        buf: np.ndarray,
        op: ReduceOp,
        sig: int,
        deadline: float,
        finish: Finish | None = None,
    ) -> None:
        """Reduce ``buf`` over all ranks in place (rank order, bit-identical everywhere).

        ``finish`` (e.g. the division of a mean) is applied once to each fully reduced piece
        while it is still in cache, by the rank that reduced it, before the others copy it.
        """
        if self.size == 1:
            if finish is not None:
                finish(buf)
            return
        with self._guard as ch:
            f = self._binary(op, buf.dtype)
            way, cma = self._way("all_reduce", buf.nbytes, buf.nbytes <= self._flat_reduce_bytes)
            if way is ONE_STEP:
                shm_staged.flat_reduce(ch, buf, buf, f, sig, deadline, "all_reduce", finish)
            elif cma is not None:
                shm_cma.all_reduce(ch, cma, buf, f, sig, deadline, self._scratch, finish)
            else:
                shm_staged.pipelined_reduce(ch, buf, buf, f, sig, deadline, "all_reduce", finish)

    def reduce(
        self,
        buf: np.ndarray,
        out: np.ndarray | None,
        root: int,
        op: ReduceOp,
        sig: int,
        deadline: float,
    ) -> None:
        """Reduce ``buf`` over all ranks into ``out`` on ``root`` (may be ``buf``); other
        ranks' ``buf`` stays unchanged."""
        check_root("reduce", root, self.size)
        if self.rank == root and out is None:
            raise ValueError(f"shm reduce: the root (rank {root}) needs an output array")
        result = out if self.rank == root else None
        if self.size == 1:
            if result is not None and result is not buf:
                np.copyto(result, buf)
            return
        with self._guard as ch:
            f = self._binary(op, buf.dtype)
            way, cma = self._way("reduce", buf.nbytes, buf.nbytes <= self._flat_reduce_bytes)
            if way is ONE_STEP:
                shm_staged.flat_reduce(ch, buf, result, f, sig, deadline, "reduce")
            elif cma is not None:
                shm_cma.reduce(ch, cma, buf, result, root, f, sig, deadline, self._scratch)
            else:
                shm_staged.pipelined_reduce(ch, buf, result, f, sig, deadline, "reduce")

    def broadcast(self, buf: np.ndarray, root: int, sig: int, deadline: float) -> None:
        """Copy ``root``'s ``buf`` into ``buf`` on every rank."""
        check_root("broadcast", root, self.size)
        if self.size == 1:
            return
        with self._guard as ch:
            _, cma = self._way("broadcast", buf.nbytes, False)  # small ones: one step, staged
            if cma is not None:
                shm_cma.broadcast(ch, cma, buf, root, sig, deadline)
            else:
                shm_staged.broadcast(ch, buf, root, sig, deadline)

    def all_gather(
        self, inp: np.ndarray, out: np.ndarray, counts: Sequence[int], sig: int, deadline: float
    ) -> None:
        """``out`` = every rank's ``inp`` (``counts[q]`` elements from rank q), in rank order."""
        self._gather(inp, out, counts, None, sig, deadline)

    def gather(
        self,
        inp: np.ndarray,
        out: np.ndarray | None,
        counts: Sequence[int],
        root: int,
        sig: int,
        deadline: float,
    ) -> None:
        """Like all_gather, but only ``root`` receives (into ``out``)."""
        check_root("gather", root, self.size)
        self._gather(inp, out if self.rank == root else None, counts, root, sig, deadline)

    def _gather(
        self,
        inp: np.ndarray,
        out: np.ndarray | None,
        counts: Sequence[int],
        root: int | None,
        sig: int,
        deadline: float,
    ) -> None:
        kind = "all_gather" if root is None else "gather"
        plan = self._plan(kind, counts)
        plan.check_own(kind, self.rank, inp.size)
        if out is not None:
            plan.check_total(kind, "out", out.size)
        if (root is None or root == self.rank) and out is None:
            raise ValueError(f"shm {kind}: rank {self.rank} needs an output array")
        if self.size == 1:
            if out is not None:
                np.copyto(out, inp)
            return
        with self._guard as ch:
            flat = plan.largest * inp.itemsize <= ch.stage_bytes
            way, cma = self._way(kind, plan.total * inp.itemsize, flat)
            if way is ONE_STEP:
                shm_staged.flat_gather(
                    ch, inp, out, plan.counts, plan.displs, root, sig, plan.layout, deadline
                )
            elif cma is not None:
                shm_cma.gather(ch, cma, inp, out, counts, root, sig, plan.layout, deadline)
            else:
                shm_staged.gather(ch, inp, out, counts, root, sig, plan.layout, deadline)

    def scatter(
        self,
        inp: np.ndarray | None,
        out: np.ndarray,
        counts: Sequence[int],
        root: int,
        sig: int,
        deadline: float,
    ) -> None:
        """Rank q receives elements ``counts[:q].sum() …`` of ``root``'s ``inp`` into ``out``."""
        check_root("scatter", root, self.size)
        plan = self._plan("scatter", counts)
        plan.check_own("scatter", self.rank, out.size)
        if self.rank == root and (inp is None or inp.size != plan.total):
            raise ValueError(f"shm scatter: the root's input must hold {plan.total} elements")
        if self.size == 1:
            assert inp is not None
            np.copyto(out, inp)
            return
        with self._guard as ch:
            nbytes = plan.total * out.itemsize
            way, cma = self._way("scatter", nbytes, nbytes <= ch.stage_bytes)
            if way is ONE_STEP:
                shm_staged.flat_scatter(
                    ch, inp, out, plan.displs, plan.total, root, sig, plan.layout, deadline
                )
            elif cma is not None:
                shm_cma.scatter(ch, cma, inp, out, plan.counts, root, sig, plan.layout, deadline)
            else:
                shm_staged.scatter(ch, inp, out, plan.counts, root, sig, plan.layout, deadline)

    def reduce_scatter(
        self,
        inp: np.ndarray,
        out: np.ndarray,
        counts: Sequence[int],
        op: ReduceOp,
        sig: int,
        deadline: float,
    ) -> None:
        """``out`` = this rank's part (``counts[rank]`` elements) of the reduction of ``inp``."""
        plan = self._plan("reduce_scatter", counts)
        plan.check_own("reduce_scatter", self.rank, out.size)
        plan.check_total("reduce_scatter", "inp", inp.size)
        if self.size == 1:
            np.copyto(out, inp)
            return
        with self._guard as ch:
            f = self._binary(op, inp.dtype)
            flat = inp.nbytes <= min(ch.stage_bytes, self._flat_reduce_bytes)
            way, cma = self._way("reduce_scatter", inp.nbytes, flat)
            if way is ONE_STEP:
                shm_staged.flat_reduce_scatter(
                    ch, inp, out, plan.displs, f, sig, plan.layout, deadline
                )
            elif cma is not None:
                shm_cma.reduce_scatter(
                    ch, cma, inp, out, plan.counts, f, sig, plan.layout, deadline, self._scratch
                )
            else:
                shm_staged.reduce_scatter(ch, inp, out, plan.counts, f, sig, plan.layout, deadline)

    def barrier(self, sig: int, deadline: float) -> None:
        """Return once every rank has entered the barrier."""
        if self.size == 1:
            return
        self.note(ONE_STEP)
        with self._guard as ch:
            ch.arrive("barrier", sig, 0, deadline)

    # -- helpers ------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        ch = self._ch
        # A death this rank saw first: tell the ranks still waiting, before it perhaps exits too.
        dead = exc.rank if isinstance(exc, PeerError) else None
        if dead is not None and ch is not None and ch.seg.set_abort(str(exc), dead_rank=dead):
            ch.waiter.wake_all()

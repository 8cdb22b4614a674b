"""torch.distributed backend "ringlet": a Python ProcessGroup whose every call is a ringlet call.

In-place calls (all_reduce, broadcast, reduce, send, recv) hand ringlet zero-copy NumPy views of
the tensors. Calls whose result is a new array in ringlet (gathers, scatter, reduce_scatter,
all_to_all) copy it into torch's output tensors once, on ringlet's progress thread, before the
Work completes. Where ringlet has no direct equivalent:

- all_to_all_single with split sizes, and all_to_all of tensor lists: pairwise send/recv on the
  point-to-point connections, in a shifted order (step s: send to rank+s, receive from rank-s)
  that cannot deadlock. Pass split sizes on every rank or on none.
- reduce_scatter of a list whose tensors differ in size: all_reduce of the concatenation, then
  each rank keeps its slice.
- PREMUL_SUM(f): ``sum`` of the inputs scaled by ``f`` (floating dtypes).
- recv from any source: ringlet's own ``recv(x, None, tag)``; the Work's ``_source_rank()`` is
  the sender, as Gloo's.

Beside it: `surface` (names, lifecycle, timeouts, coalescing, split_group: what a group answers
besides its collectives), `monitored` (monitored_barrier), `coalescing` (one Work for several
calls) and `outputs` (torch's output lists of the gathers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist

import ringlet

from . import groups
from .coalescing import Coalescing, chain
from .monitored import monitored_barrier
from .outputs import check_parts, scattered_into, split_into
from .surface import GroupSurface
from .tensors import (
    copy_into,
    flat,
    one,
    pairwise_exchange,
    same_dtype,
    seconds,
    split_rows,
    tensor_of,
)
from .works import RingletWork, completed, premultiply, received, reduce_op

__all__ = ["RingletProcessGroup", "create_process_group", "monitored_barrier"]


#: torch's ProcessGroup, untyped here: its stubs list the Python convenience overloads, while a
#: Python subclass overrides the C++ virtual methods (tensor lists + options) that torch calls.
_ProcessGroup: Any = dist.ProcessGroup


class RingletProcessGroup(GroupSurface, _ProcessGroup):  # type: ignore[misc]
    """A torch ProcessGroup over a ringlet :class:`~ringlet.Communicator` (see the module docstring)."""

    def __init__(self, comm: ringlet.Communicator, store: Any = None) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self.store = store  # torch's store of this group: monitored_barrier meets there
        self._group_name = ""
        self._group_desc = ""
        self._timeout: float | None = None  # set_timeout(): every call's default deadline
        self._coalescing = Coalescing()  # works issued between _start and _end_coalescing
        self._barriers = 0  # monitored_barrier calls so far (alike on every rank)
        self._sequence = 0
        self._splits = 0  # groups split from this one (split_group)

    def _done(
        self, works: Sequence[ringlet.Work], finish: Callable[[list[Any]], Any], call: str
    ) -> RingletWork:
        work = completed(works, finish, f"{call} on rank {self.comm.rank}")
        return self._coalescing.issued(work)

    def _seconds(self, opts: Any) -> float | None:
        """The call's own timeout (torch's options), else the group's (set_timeout), else ringlet's."""
        own = seconds(opts)
        return own if own is not None else self._timeout

    # -- reductions and broadcast (in place, zero-copy) ---------------------------------------
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingletWork:
        opts = opts or dist.AllreduceOptions()
        t = one(tensors, "allreduce")
        op, factor = reduce_op(opts.reduceOp, "allreduce")
        if factor is not None:
            premultiply(t, factor, "allreduce", in_place=True)
        work = self.comm.all_reduce(t, op, async_op=True, timeout=self._seconds(opts))
        return self._done([work], lambda _: [t], "allreduce")

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> RingletWork:
        """One all_reduce over the concatenation when the dtypes agree, else one per tensor."""
        opts = opts or dist.AllreduceCoalescedOptions()
        op, factor = reduce_op(opts.reduceOp, "allreduce_coalesced")
        if len({t.dtype for t in tensors}) > 1:
            works = [self.allreduce([t], opts) for t in tensors]
            return chain(works, tensors, "allreduce_coalesced")
        joined = torch.cat([flat(t) for t in tensors]) if tensors else torch.empty(0)
        if factor is not None:
            premultiply(joined, factor, "allreduce_coalesced", in_place=True)
        work = self.comm.all_reduce(joined, op, async_op=True, timeout=self._seconds(opts))

        def finish(_: list[Any]) -> list[torch.Tensor]:
            for t, part in zip(
                tensors, torch.split(joined, [t.numel() for t in tensors]), strict=True
            ):
                copy_into(t, part)
            return tensors

        return self._done([work], finish, "allreduce_coalesced")

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> RingletWork:
        opts = opts or dist.BroadcastOptions()
        t = one(tensors, "broadcast")
        work = self.comm.broadcast(t, opts.rootRank, async_op=True, timeout=self._seconds(opts))
        return self._done([work], lambda _: [t], "broadcast")

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingletWork:
        opts = opts or dist.ReduceOptions()
        t = one(tensors, "reduce")
        op, factor = reduce_op(opts.reduceOp, "reduce")
        if factor is None:
            work = self.comm.reduce(
                t, opts.rootRank, op, async_op=True, timeout=self._seconds(opts)
            )
            return self._done([work], lambda _: [t], "reduce")
        scaled = premultiply(t, factor, "reduce", in_place=False)  # non-roots keep their input
        work = self.comm.reduce(
            scaled, opts.rootRank, op, async_op=True, timeout=self._seconds(opts)
        )

        def finish(_: list[Any]) -> list[torch.Tensor]:
            if self.comm.rank == opts.rootRank:
                copy_into(t, scaled)
            return [t]

        return self._done([work], finish, "reduce")

    # -- gathers and scatter (ringlet returns a new array: one copy into torch's outputs) -----
    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        outs, inp = one(outputs, "allgather"), one(inputs, "allgather")
        check_parts("allgather", self.comm, outs, inp)
        work = self.comm.all_gather(flat(inp), async_op=True, timeout=self._seconds(opts))
        return self._done(
            [work], lambda res: split_into("allgather", self.comm, res[0], outs), "allgather"
        )

    def all_gather_single(
        self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None
    ) -> RingletWork:
        if output.numel() != inp.numel() * self.comm.size:
            raise ValueError(
                f"all_gather_into_tensor: the output has {output.numel()} elements but "
                f"{self.comm.size} ranks × {inp.numel()} input elements were expected"
            )
        same_dtype("all_gather_into_tensor", inp.dtype, [output])
        work = self.comm.all_gather(flat(inp), async_op=True, timeout=self._seconds(opts))

        def finish(res: list[Any]) -> list[torch.Tensor]:
            copy_into(output, res[0])
            return [output]

        return self._done([work], finish, "all_gather_into_tensor")

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        works = [self.all_gather_single(o, i, opts) for o, i in zip(outputs, inputs, strict=True)]
        return chain(works, outputs, "all_gather_into_tensor (coalesced)")

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        works = [self.allgather([o], [i], opts) for o, i in zip(outputs, inputs, strict=True)]
        return chain(works, outputs, "allgather_coalesced")

    def gather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        opts = opts or dist.GatherOptions()
        inp, root = one(inputs, "gather"), opts.rootRank
        outs = one(outputs, "gather") if self.comm.rank == root else []
        work = self.comm.gather(flat(inp), root, async_op=True, timeout=self._seconds(opts))

        def finish(res: list[Any]) -> list[torch.Tensor]:
            if self.comm.rank != root:
                return []
            check_parts("gather", self.comm, outs, inp)  # after the data moved: only root can know
            return split_into("gather", self.comm, res[0], outs)

        return self._done([work], finish, "gather")

    def scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> RingletWork:
        opts = opts or dist.ScatterOptions()
        out, root = one(outputs, "scatter"), opts.rootRank
        # ringlet checks root's list (one tensor per rank, one dtype) and tells every rank
        parts = [flat(p) for p in one(inputs, "scatter")] if self.comm.rank == root else None
        work = self.comm.scatter(parts, root, async_op=True, timeout=self._seconds(opts))

        return self._done(
            [work], lambda res: scattered_into(self.comm, tensor_of(res[0], out), out), "scatter"
        )

    # -- reduce_scatter ------------------------------------------------------------------------
    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> RingletWork:
        opts = opts or dist.ReduceScatterOptions()
        out, parts = one(outputs, "reduce_scatter"), one(inputs, "reduce_scatter")
        if len(parts) != self.comm.size:
            raise ValueError(
                f"reduce_scatter: got {len(parts)} input tensors for {self.comm.size} ranks"
            )
        same_dtype("reduce_scatter", out.dtype, parts)
        sizes = [p.numel() for p in parts]
        if sizes[self.comm.rank] != out.numel():
            raise ValueError(
                f"reduce_scatter: the output has {out.numel()} elements but this "
                f"rank's input part has {sizes[self.comm.rank]}"
            )
        op, factor = reduce_op(opts.reduceOp, "reduce_scatter")
        joined = torch.cat([flat(p) for p in parts])  # a copy: safe to scale or reduce in place
        if factor is not None:
            premultiply(joined, factor, "reduce_scatter", in_place=True)
        if len(set(sizes)) == 1:
            work = self.comm.reduce_scatter(joined, op, async_op=True, timeout=self._seconds(opts))
            mine: Callable[[list[Any]], torch.Tensor] = lambda res: res[0]  # noqa: E731
        else:  # uneven parts: every rank reduces everything, then keeps its slice
            work = self.comm.all_reduce(joined, op, async_op=True, timeout=self._seconds(opts))
            start = sum(sizes[: self.comm.rank])
            mine = lambda _: joined[start : start + out.numel()]  # noqa: E731

        def finish(res: list[Any]) -> list[torch.Tensor]:
            copy_into(out, mine(res))
            return [out]

        return self._done([work], finish, "reduce_scatter")

    def reduce_scatter_single(
        self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None
    ) -> RingletWork:
        opts = opts or dist.ReduceScatterOptions()
        if inp.numel() != output.numel() * self.comm.size:
            raise ValueError(
                f"reduce_scatter_tensor: the input has {inp.numel()} elements but "
                f"{self.comm.size} ranks × {output.numel()} output elements were expected"
            )
        same_dtype("reduce_scatter_tensor", inp.dtype, [output])
        op, factor = reduce_op(opts.reduceOp, "reduce_scatter_tensor")
        src = (
            flat(inp)
            if factor is None
            else premultiply(flat(inp), factor, "reduce_scatter_tensor", in_place=False)
        )
        work = self.comm.reduce_scatter(src, op, async_op=True, timeout=self._seconds(opts))

        def finish(res: list[Any]) -> list[torch.Tensor]:
            copy_into(output, res[0])
            return [output]

        return self._done([work], finish, "reduce_scatter_tensor")

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        works = [
            self.reduce_scatter_single(o, i, opts) for o, i in zip(outputs, inputs, strict=True)
        ]
        return chain(works, outputs, "reduce_scatter_tensor (coalesced)")

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # -- all_to_all ----------------------------------------------------------------------------
    def all_to_all_single(
        self,
        output: torch.Tensor,
        inp: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        opts: Any = None,
    ) -> RingletWork:
        size = self.comm.size
        same_dtype("all_to_all_single", inp.dtype, [output])
        if not output_splits and not input_splits:
            if inp.shape[0] % size or output.numel() != inp.numel():
                raise ValueError(
                    f"all_to_all_single: without split sizes the input's first "
                    f"dimension ({inp.shape[0]}) must divide by {size} and the output "
                    f"must have the input's size ({output.numel()} != {inp.numel()})"
                )
            work = self.comm.all_to_all(
                inp.detach().reshape(size, -1), async_op=True, timeout=self._seconds(opts)
            )

            def finish(res: list[Any]) -> list[torch.Tensor]:
                copy_into(output, res[0])
                return [output]

            return self._done([work], finish, "all_to_all_single")
        sends = split_rows("all_to_all_single", inp, input_splits, size, "input")
        recvs = split_rows("all_to_all_single", output, output_splits, size, "output")
        works, finish_recvs = pairwise_exchange(self.comm, sends, recvs)

        def finish_single(_: list[Any]) -> list[torch.Tensor]:
            finish_recvs()
            return [output]

        return self._done(works, finish_single, "all_to_all_single")

    alltoall_base = all_to_all_single

    def alltoall(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> RingletWork:
        if len(outputs) != self.comm.size or len(inputs) != self.comm.size:
            raise ValueError(
                f"all_to_all: need {self.comm.size} input and output tensors, got "
                f"{len(inputs)} and {len(outputs)}"
            )
        works, finish_recvs = pairwise_exchange(self.comm, inputs, outputs)

        def finish(_: list[Any]) -> list[torch.Tensor]:
            finish_recvs()
            return outputs

        return self._done(works, finish, "all_to_all")

    # -- barrier and point to point ------------------------------------------------------------
    def barrier(self, opts: Any = None) -> RingletWork:
        work = cast(ringlet.Work, self.comm.barrier(async_op=True, timeout=self._seconds(opts)))
        return self._done([work], lambda _: [], "barrier")

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> RingletWork:
        t = one(tensors, "send")
        work = self.comm.send(t, dst, tag, async_op=True, timeout=self._timeout)
        return self._done([work], lambda _: [t], "send")

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> RingletWork:
        t = one(tensors, "recv")
        work = self.comm.recv(t, src, tag, async_op=True, timeout=self._timeout)
        return self._coalescing.issued(received(work, t, src, f"recv on rank {self.comm.rank}"))

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> RingletWork:
        """The next message with ``tag`` from whichever rank sent one first (ringlet's recv with
        ``src=None``); ``_source_rank()`` of the Work, and ``dist.recv``, give that rank."""
        t = one(tensors, "recv")
        work = self.comm.recv(t, None, tag, async_op=True, timeout=self._timeout)
        desc = f"recv from any source on rank {self.comm.rank}"
        return self._coalescing.issued(received(work, t, None, desc))


def create_process_group(options: Any, backend_options: Any = None) -> RingletProcessGroup:
    """torch's constructor hook for backend "ringlet" (registered with extended_api=True)."""
    return RingletProcessGroup(groups.group_communicator(options), options.store)

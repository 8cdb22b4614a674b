"""ringlet's DistributedDataParallel: bucketed gradient averaging, overlapped with backward or not.

Gradients are grouped into buckets in reverse registration order (roughly the order backward
produces them). Small gradients are packed into flat buckets: a post-accumulate-grad hook copies
each into its bucket as soon as autograd has it. A gradient of at least ``direct_mb`` is a bucket
of its own and is averaged where it lies, in ``param.grad``: no copy in or out, which on a CPU
matters as much as the transfer (memory bandwidth is what both compete for). With ``overlap``,
a bucket's averaging starts asynchronously as soon as its last gradient arrives, otherwise every
bucket starts when backward ends (either way in index order on every rank, so every rank issues
the same calls in the same order). A callback queued on the autograd engine runs when backward
ends: it waits for every bucket and writes the averages back into ``param.grad``, so when
``loss.backward()`` returns the gradients are those of the global batch and any optimizer can step.

Beside it: `buckets` (what is averaged as one, and torch's GradBucket view), `ddp_compat` (torch
DDP's constructor arguments), `ddp_join` (``join()`` for uneven inputs) and `unused` (which
parameters a step reaches, for ``find_unused_parameters``).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

import ringlet
from ringlet.transport.shm_wait import usable_cores

from .buckets import EMPTY, MB, Bucket, GradBucket, make_buckets
from .ddp_compat import torch_arguments
from .ddp_join import DDPJoinHook, grad_scale_active, join_process_group
from .groups import communicator_for
from .hooks import CommHook, allreduce_hook
from .trace import BucketTiming, StepTrace
from .unused import reachable_params

__all__ = ["BucketTiming", "DistributedDataParallel", "GradBucket", "StepTrace"]


def _should_overlap(comm: ringlet.Communicator) -> bool:
    """Overlap averaging with backward unless it could only take cores from compute."""
    busy = comm.local_size * torch.get_num_threads()
    return comm.transport != "shm" or busy < usable_cores()


class DistributedDataParallel(nn.Module, Joinable):
    """Data parallelism over a ringlet communicator: gradients averaged in buckets, in place.

    Takes torch DDP's arguments, in torch's order, where they mean something on a CPU; the
    ringlet-only ones are keyword-only.

    Args:
        module: the model; every rank must build the same one (rank 0's parameters win).
        device_ids: for CUDA modules in torch; None (or "cpu") here.
        output_device: likewise.
        dim: accepted for torch's signature (it only matters with ``device_ids``).
        broadcast_buffers: copy rank 0's buffers (e.g. BatchNorm statistics) to all before each
            forward (None: True).
        init_sync: broadcast rank 0's parameters and buffers at construction.
        process_group: a torch group of backend "ringlet" (default: the default group); it is
            also the state torch's built-in comm hooks get when ``register_comm_hook`` is given
            None, and the group ``join()`` counts ranks on.
        bucket_cap_mb: gradients are averaged in buckets of about this many MiB (None: 25).
        find_unused_parameters: allow parameters that get no gradient in a step (they count as
            zero; parameters no rank used keep their ``grad``). Without it such a parameter is a
            RuntimeError after the step's averaging.
        check_reduction: deprecated in torch, ignored.
        gradient_as_bucket_view: make ``param.grad`` a view into its bucket, saving a copy each way.
        static_graph: the same parameters are used in every step: the first step finds the unused
            ones (as ``find_unused_parameters``) and later steps reuse that set without a search
            or an extra all_reduce.
        device_mesh: a 1-D DeviceMesh whose group is used as ``process_group``.
        comm_hook: ringlet's ``hook(comm, bucket) -> Future[Tensor]`` that averages a bucket (see
            :mod:`ringlet.torch.hooks`); default :func:`allreduce_hook`. For torch's hook
            signature use :meth:`register_comm_hook`.
        comm: a ringlet communicator instead of a torch group.
        first_bucket_cap_mb: a smaller first bucket, so communication starts early in backward.
        direct_mb: a gradient of at least this many MiB is averaged in place in ``param.grad``,
            as a bucket of its own, instead of being copied into a bucket and back.
        overlap: start each bucket's averaging during backward, as soon as it is complete (True),
            or all of them when backward ends (False). Over shared memory averaging is work for
            the CPU and memory bus, not waiting, so when compute already keeps every core busy,
            overlapping only slows backward down (2 ranks on 2 cores: ~20 ms per step slower,
            benchmarks/ddp_step.py). The default (None) overlaps unless the communicator is
            shared-memory and its ranks on this host times torch's threads fill the cores.

    torch's ``delay_all_reduce_named_params``, ``param_to_hook_all_reduce``, ``mixed_precision``,
    ``skip_all_reduce_unused_params`` and ``bucket_cap_mb_list`` raise ValueError: use
    ``comm_hook=bf16_compress_hook`` (or ``register_comm_hook``) for reduced-precision gradients.
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Any = None,
        output_device: Any = None,
        dim: int = 0,
        broadcast_buffers: bool | None = True,
        init_sync: bool = True,
        process_group: Any = None,
        bucket_cap_mb: float | None = 25.0,
        find_unused_parameters: bool = False,
        check_reduction: bool = False,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        delay_all_reduce_named_params: Any = None,
        param_to_hook_all_reduce: Any = None,
        mixed_precision: Any = None,
        device_mesh: Any = None,
        skip_all_reduce_unused_params: bool = False,
        bucket_cap_mb_list: Any = None,
        batched_grad_copy: bool = False,
        forward_sync_buffers: bool | None = None,
        *,
        comm_hook: CommHook | None = None,
        comm: ringlet.Communicator | None = None,
        first_bucket_cap_mb: float = 1.0,
        direct_mb: float = 1.0,
        overlap: bool | None = None,
    ) -> None:
        super().__init__()
        Joinable.__init__(self)
        process_group, bucket_cap_mb = torch_arguments(
            device_ids=device_ids,
            output_device=output_device,
            delay_all_reduce_named_params=delay_all_reduce_named_params,
            param_to_hook_all_reduce=param_to_hook_all_reduce,
            mixed_precision=mixed_precision,
            bucket_cap_mb_list=bucket_cap_mb_list,
            skip_all_reduce_unused_params=skip_all_reduce_unused_params,
            device_mesh=device_mesh,
            process_group=process_group,
            comm=comm,
            bucket_cap_mb=bucket_cap_mb,
            first_bucket_cap_mb=first_bucket_cap_mb,
            direct_mb=direct_mb,
        )
        self.module = module
        self.process_group = process_group
        self.comm = comm if comm is not None else communicator_for(process_group)
        self.comm_hook: CommHook = comm_hook or allreduce_hook
        self._torch_hook: tuple[Any, Callable[..., Any]] | None = None
        self.find_unused_parameters = find_unused_parameters or static_graph
        self.static_graph = static_graph
        self._static_used: Any = None  # static_graph: which parameters the ranks used, once known
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.broadcast_buffers = True if broadcast_buffers is None else broadcast_buffers
        self.overlap = _should_overlap(self.comm) if overlap is None else overlap
        self.require_sync = True
        self.last_trace: StepTrace | None = None
        self._grad_scale = 1.0  # join(divide_by_initial_world_size=False): size / ranks active
        self._divide_by_initial_world_size = True
        self._join_work: Any = None
        unique = {id(p): p for p in module.parameters() if p.requires_grad}
        self._params = list(unique.values())
        self._names = {id(p): name for name, p in module.named_parameters()}
        if init_sync:
            self._sync_module_states()
        self._buckets = make_buckets(
            self._params,
            int(bucket_cap_mb * MB),
            int(min(first_bucket_cap_mb, bucket_cap_mb) * MB),
            int(direct_mb * MB),
        )
        self._where = {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.params)}
        self._step: StepTrace | None = None
        self._next_bucket = 0
        self._unused: set[int] = set()
        self._reset_step()
        # The hooks hold this wrapper weakly, so dropping it stops them (the module lives on).
        ready = weakref.WeakMethod(self._grad_ready)

        def hook(param: torch.Tensor) -> None:
            if (method := ready()) is not None:
                method(param)

        self._hooks = [
            p.register_post_accumulate_grad_hook(hook)  # type: ignore[no-untyped-call]
            for p in self._params
        ]
        if gradient_as_bucket_view:
            for b in self._buckets:
                if b.direct:  # the gradient is its own bucket already
                    continue
                for i, p in enumerate(b.params):
                    if p.grad is not None:
                        b.slot(i).copy_(p.grad)
                    p.grad = b.slot(i)

    # -- torch's comm hooks and join -----------------------------------------------------------
    def register_comm_hook(self, state: Any, hook: Callable[..., Any]) -> None:
        """torch's ``hook(state, bucket) -> Future[Tensor]``, e.g. torch's ``allreduce_hook``,
        ``fp16_compress_hook``, ``bf16_compress_hook`` or ``powerSGD_hook`` with its state.

        ``bucket`` answers what torch's GradBucket does (``buffer()``, ``index()``,
        ``is_last()``, ``gradients()``, ``parameters()``, ``set_buffer()``); the future's value
        is the averaged bucket. Register once, before the first backward.
        """
        if self._torch_hook is not None:
            raise RuntimeError("register_comm_hook: a comm hook is already registered")
        if self.last_trace is not None or self._step is not None:
            raise RuntimeError("register_comm_hook must be called before the first backward")
        if not callable(hook):
            raise TypeError(f"register_comm_hook: hook must be callable, not {type(hook).__name__}")
        self._torch_hook = (state, hook)

    def join(
        self,
        divide_by_initial_world_size: bool = True,
        enable: bool = True,
        throw_on_early_termination: bool = False,
    ) -> Join:
        """torch's context manager for uneven inputs: ranks that ran out of batches shadow the
        others' steps (their gradients count as zeros) until every rank is done.

        With ``divide_by_initial_world_size=False`` a step's gradients are averaged over the
        ranks still training instead of over all of them.
        """
        return Join(
            [self],
            enable,
            throw_on_early_termination,
            divide_by_initial_world_size=divide_by_initial_world_size,
        )

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return DDPJoinHook(self, bool(kwargs.get("divide_by_initial_world_size", True)))

    @property
    def join_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def join_process_group(self) -> Any:
        return join_process_group(self)

    def _set_static_graph(self) -> None:
        self.static_graph = True
        self.find_unused_parameters = True

    # -- setup ---------------------------------------------------------------------------------
    def _broadcast_coalesced(self, tensors: list[torch.Tensor], root: int = 0) -> None:
        """Copy ``root``'s ``tensors`` to every rank: one broadcast per dtype, of their concatenation."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.comm.broadcast(flat, root)
            with torch.no_grad():
                for t, part in zip(
                    group, torch.split(flat, [t.numel() for t in group]), strict=True
                ):
                    t.copy_(part.view_as(t))

    def _sync_module_states(self) -> None:
        if self.comm.size > 1:
            self._broadcast_coalesced([*self.module.parameters(), *self.module.buffers()])

    # -- forward and the hooks -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._step is not None:
            if any(b.future is not None for b in self._buckets):
                raise RuntimeError(
                    f"DistributedDataParallel on rank {self.comm.rank}: the previous backward "
                    "started averaging gradients but never finished (did backward fail?); "
                    "every rank must finish each backward before the next forward"
                )
            self._reset_step()
        syncing = torch.is_grad_enabled() and self.require_sync
        if syncing and self._join_config.enable:
            # inside join(): counts this rank as not yet joined (an all_reduce the joined shadow)
            self._join_work = Join.notify_join_context(self)
        buffers = list(self.module.buffers())
        if syncing and self.broadcast_buffers and buffers and self.comm.size > 1:
            self._broadcast_coalesced(buffers)
        out = self.module(*args, **kwargs)
        self._unused = set()
        if syncing and self._static_used is not None:  # static_graph, after its first step
            self._unused = {id(p) for k, p in enumerate(self._params) if not self._static_used[k]}
        elif syncing and self.find_unused_parameters:
            reachable = reachable_params(out)
            self._unused = {id(p) for p in self._params if id(p) not in reachable}
        return out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the block averages the sum."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    def _grad_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: pack ``param.grad``; start every bucket that is now complete."""
        if not self.require_sync:
            return
        if self._step is None:
            self._begin_step()
        self._mark_ready(param, param.grad)

    def _begin_step(self) -> None:
        self._step = StepTrace(time.perf_counter())
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_step)
        for p in self._params:
            if id(p) in self._unused:
                self._mark_ready(p, None)

    def _mark_ready(self, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        bucket, i = self._where[id(param)]
        if bucket.ready[i]:
            raise RuntimeError(
                f"DistributedDataParallel on rank {self.comm.rank}: parameter "
                f"{self._names.get(id(param), '?')} got a gradient twice in one backward; "
                "this is not supported (several backward passes per forward need no_sync())"
            )
        bucket.ready[i] = True
        if bucket.direct:
            bucket.take(grad)
        elif grad is None:
            bucket.slot(i).zero_()
        elif grad.data_ptr() != (slot := bucket.slot(i)).data_ptr():
            slot.copy_(grad)
        bucket.pending -= 1
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Start the averaging of every complete bucket, in index order (alike on every rank)."""
        while (
            self._next_bucket < len(self._buckets) and self._buckets[self._next_bucket].pending == 0
        ):
            self._launch(self._buckets[self._next_bucket])
            self._next_bucket += 1

    def _launch(self, bucket: Bucket) -> None:
        assert self._step is not None
        timing = BucketTiming(
            bucket.index,
            bucket.buffer.numel() * bucket.buffer.element_size(),
            time.perf_counter() - self._step.start,
        )
        self._step.buckets.append(timing)
        bucket.timing = timing
        bucket.future = self._average(bucket)
        start = self._step.start
        bucket.future.add_done_callback(
            lambda _: setattr(timing, "finished", time.perf_counter() - start)
        )

    def _average(self, bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
        """Start averaging ``bucket`` with torch's registered hook, else ringlet's ``comm_hook``."""
        if self._torch_hook is not None:
            state, hook = self._torch_hook
            last = bucket.index == len(self._buckets) - 1
            future: torch.futures.Future[torch.Tensor] = hook(state, GradBucket(bucket, last))
            return future
        return self.comm_hook(self.comm, bucket.buffer)

    # -- end of backward -----------------------------------------------------------------------
    def _finish_step(self) -> None:
        """Queued on the autograd engine: wait for every bucket, then write the averages to ``.grad``."""
        step = self._step
        assert step is not None
        step.backward_end = time.perf_counter() - step.start
        missing = [p for b in self._buckets for i, p in enumerate(b.params) if not b.ready[i]]
        try:
            for p in missing:  # zeros keep every rank's calls aligned even when this is an error
                self._mark_ready(p, None)
            self._launch_ready()  # without overlap, every bucket starts here
            unused = self._unused | {id(p) for p in missing}
            used_flags = None
            if self.find_unused_parameters and self._static_used is None:
                local = [0 if id(p) in unused else 1 for p in self._params]
                used_flags = self.comm.all_reduce(np.array(local, np.uint8), "max", async_op=True)
            for bucket in self._buckets:
                assert bucket.future is not None
                averaged = bucket.future.wait()
                if averaged is not bucket.buffer:
                    bucket.buffer.copy_(averaged)
            step.synced = time.perf_counter() - step.start
            globally_used = used_flags.wait() if used_flags is not None else self._static_used
            if self.static_graph and self._static_used is None:
                self._static_used = globally_used
            if self._join_work is not None and grad_scale_active(self):
                for bucket in self._buckets:
                    bucket.buffer.mul_(self._grad_scale)
            for k, p in enumerate(self._params):
                if globally_used is None or globally_used[k]:
                    self._write_grad(p)
            self.last_trace = step
        finally:
            self._join_work = None
            self._reset_step()  # a failed step leaves no half state; the communicator reports it
        if missing and not self.find_unused_parameters:
            names = ", ".join(self._names.get(id(p), "?") for p in missing[:8])
            raise RuntimeError(
                f"DistributedDataParallel on rank {self.comm.rank}: parameters got no gradient in "
                f"this backward ({names}); pass find_unused_parameters=True if that is intended"
            )

    def _write_grad(self, p: nn.Parameter) -> None:
        bucket, i = self._where[id(p)]
        slot = bucket.slot(i)
        if self.gradient_as_bucket_view:
            p.grad = slot
        elif p.grad is None:
            p.grad = slot.clone()
        elif p.grad.data_ptr() != slot.data_ptr():
            p.grad.copy_(slot)

    def _reset_step(self) -> None:
        self._step = None
        self._next_bucket = 0
        for b in self._buckets:
            b.pending = len(b.params)
            b.ready = [False] * len(b.params)
            b.future = None
            b.timing = None
            if b.direct:  # let go of last step's gradient
                b.buffer = EMPTY

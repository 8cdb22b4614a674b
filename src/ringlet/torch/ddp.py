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
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

import ringlet
from ringlet.transport.shm_tuning import usable_cores

from .groups import communicator_for
from .hooks import CommHook, allreduce_hook
from .trace import BucketTiming, StepTrace

__all__ = ["BucketTiming", "DistributedDataParallel", "GradBucket", "StepTrace"]

MB = 1024 * 1024
_EMPTY = torch.empty(0)


@dataclass
class _Bucket:
    """A flat buffer holding the gradients of ``params`` at ``offsets``; averaged as one.

    A ``direct`` bucket has one parameter and no buffer of its own: each step ``buffer`` becomes a
    flat view of that parameter's gradient (or, when the gradient cannot be viewed flat, a spare
    buffer it is copied into).
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    direct: bool = False
    pending: int = 0
    future: torch.futures.Future[torch.Tensor] | None = None
    timing: BucketTiming | None = None
    ready: list[bool] = field(default_factory=list)
    spare: torch.Tensor | None = None

    def slot(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)

    def take(self, grad: torch.Tensor | None) -> None:
        """Direct bucket: average ``grad`` where it lies (zeros when the parameter got none)."""
        p = self.params[0]
        if grad is not None and grad.is_contiguous() and grad.dtype == p.dtype:
            self.buffer = grad.view(-1)
            return
        if self.spare is None:
            self.spare = torch.empty(p.numel(), dtype=p.dtype)
        self.buffer = self.spare
        if grad is None:
            self.buffer.zero_()
        else:
            self.slot(0).copy_(grad)


def _make_buckets(
    params: list[nn.Parameter], cap_bytes: int, first_cap_bytes: int, direct_bytes: int
) -> list[_Bucket]:
    """Buckets of at most ``cap_bytes`` (the first at most ``first_cap_bytes``), one dtype each;
    a parameter of at least ``direct_bytes`` is a direct bucket of its own."""
    groups: list[tuple[list[nn.Parameter], bool]] = []
    open_group: dict[torch.dtype, tuple[list[nn.Parameter], int]] = {}
    for p in reversed(params):  # backward produces the last layers' gradients first
        nbytes = p.numel() * p.element_size()
        if nbytes >= direct_bytes:
            groups.append(([p], True))
            open_group.pop(p.dtype, None)  # smaller ones after it start a new bucket
            continue
        members, used = open_group.get(p.dtype, ([], 0))
        cap = first_cap_bytes if not groups or members is groups[0][0] else cap_bytes
        if members and used + nbytes > cap:
            members, used = [], 0
        if not members:
            groups.append((members, False))
        members.append(p)
        open_group[p.dtype] = (members, used + nbytes)
    buckets = []
    for index, (members, direct) in enumerate(groups):
        offsets = np.cumsum([0] + [p.numel() for p in members]).tolist()
        buffer = _EMPTY if direct else torch.zeros(int(offsets[-1]), dtype=members[0].dtype)
        buckets.append(_Bucket(index, members, [int(o) for o in offsets[:-1]], buffer, direct))
    return buckets


def _reachable_params(outputs: Any) -> set[int]:
    """ids of the parameters autograd can reach from ``outputs`` (AccumulateGrad nodes' variables)."""
    roots: list[Any] = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen: set[Any] = set()
    found: set[int] = set()
    while roots:
        node = roots.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        roots.extend(fn for fn, _ in node.next_functions)
    return found


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


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
        device_ids, output_device: for CUDA modules in torch; None (or "cpu") here.
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
        _refuse_cuda("device_ids", device_ids)
        _refuse_cuda("output_device", output_device)
        for name, value in (
            ("delay_all_reduce_named_params", delay_all_reduce_named_params),
            ("param_to_hook_all_reduce", param_to_hook_all_reduce),
            ("mixed_precision", mixed_precision),
            ("bucket_cap_mb_list", bucket_cap_mb_list),
            ("skip_all_reduce_unused_params", skip_all_reduce_unused_params or None),
        ):
            if value is not None:
                raise ValueError(
                    f"ringlet's DistributedDataParallel does not support {name}=; for "
                    "reduced-precision gradients pass comm_hook=bf16_compress_hook or "
                    "register torch's fp16/bf16 compress hooks with register_comm_hook"
                )
        if device_mesh is not None:
            if process_group is not None or device_mesh.ndim != 1:
                raise ValueError(
                    "device_mesh= must be a 1-D DeviceMesh, and not given with process_group="
                )
            process_group = device_mesh.get_group()
        if process_group is not None and comm is not None:
            raise ValueError("pass process_group= (a torch group) or comm= (ringlet), not both")
        bucket_cap_mb = 25.0 if bucket_cap_mb is None else bucket_cap_mb
        if bucket_cap_mb <= 0 or first_bucket_cap_mb <= 0 or direct_mb <= 0:
            raise ValueError(
                f"bucket_cap_mb, first_bucket_cap_mb and direct_mb must be > 0, got "
                f"{bucket_cap_mb}, {first_bucket_cap_mb} and {direct_mb}"
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
        self._buckets = _make_buckets(
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
        return _DDPJoinHook(self, bool(kwargs.get("divide_by_initial_world_size", True)))

    @property
    def join_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def join_process_group(self) -> Any:
        if self.process_group is not None:
            return self.process_group
        world = dist.group.WORLD if dist.is_initialized() else None
        if world is None or communicator_for(None) is not self.comm:
            raise ValueError(
                "join() needs the torch group this model averages over: build "
                "DistributedDataParallel with process_group= (not comm=)"
            )
        return world

    def _set_static_graph(self) -> None:
        self.static_graph = True
        self.find_unused_parameters = True

    # -- setup ---------------------------------------------------------------------------------
    def _broadcast_coalesced(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's ``tensors`` to every rank: one broadcast per dtype, of their concatenation."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.comm.broadcast(flat, 0)
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
            reachable = _reachable_params(out)
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

    def _launch(self, bucket: _Bucket) -> None:
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

    def _average(self, bucket: _Bucket) -> torch.futures.Future[torch.Tensor]:
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
            if self._join_work is not None and self._grad_scale_active():
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

    def _grad_scale_active(self) -> bool:
        """join(divide_by_initial_world_size=False): rescale a step's averages to the ranks active."""
        if self._divide_by_initial_world_size:
            return False
        self._join_work.wait()
        active = float(self._join_work.get_future().value()[0].item())
        self._grad_scale = self.comm.size / active if active > 0 else 1.0
        return True

    def _shadow_step(self) -> None:
        """A joined rank's share of one step of the others: the same calls, with zero gradients."""
        buffers = list(self.module.buffers())
        if self.broadcast_buffers and buffers and self.comm.size > 1:
            self._broadcast_coalesced(buffers)
        for bucket in self._buckets:
            if bucket.direct:
                bucket.take(None)
            else:
                bucket.buffer.zero_()
            self._average(bucket).wait()
        if self.find_unused_parameters and self._static_used is None:
            self.comm.all_reduce(np.zeros(len(self._params), np.uint8), "max")
        self._reset_step()

    def _sync_final_model(self, is_last_joiner: bool) -> None:
        """After join(): every rank takes the parameters and buffers of a rank that joined last."""
        mine = np.array([self.comm.rank if is_last_joiner else -1], np.int64)
        source = int(self.comm.all_reduce(mine, "max")[0])
        tensors = [*self.module.parameters(), *self.module.buffers()]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.comm.broadcast(flat, source)
            with torch.no_grad():
                for t, part in zip(
                    group, torch.split(flat, [t.numel() for t in group]), strict=True
                ):
                    t.copy_(part.view_as(t))

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
                b.buffer = _EMPTY


def _refuse_cuda(name: str, value: Any) -> None:
    """device_ids / output_device: torch's, for CUDA modules; a CPU module takes None."""
    if value is None or value == [] or str(value) == "cpu" or value == [torch.device("cpu")]:
        return
    raise ValueError(
        f"ringlet's DistributedDataParallel runs CPU modules: {name}={value!r} is for CUDA "
        f"modules in torch; pass {name}=None"
    )


class GradBucket:
    """What torch's comm hooks read of a bucket (torch's ``dist.GradBucket``, over a ringlet bucket)."""

    def __init__(self, bucket: _Bucket, last: bool) -> None:
        self._bucket = bucket
        self._last = last

    def index(self) -> int:
        return self._bucket.index

    def buffer(self) -> torch.Tensor:
        """The flat gradients of the bucket; a hook may average it in place."""
        return self._bucket.buffer

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient: views into ``buffer()``."""
        return [self._bucket.slot(i) for i in range(len(self._bucket.params))]

    def parameters(self) -> list[torch.Tensor]:
        return list(self._bucket.params)

    def is_last(self) -> bool:
        """True for the bucket averaged last in a step (PowerSGD counts steps by it)."""
        return self._last

    def set_buffer(self, tensor: torch.Tensor) -> None:
        self._bucket.buffer.copy_(tensor.reshape(-1))


class _DDPJoinHook(JoinHook):
    """join(): a joined rank shadows every step of the others, then all take the last joiner's model."""

    def __init__(self, ddp: DistributedDataParallel, divide_by_initial_world_size: bool) -> None:
        self.ddp = ddp
        ddp._divide_by_initial_world_size = divide_by_initial_world_size

    def main_hook(self) -> None:
        self.ddp._shadow_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.ddp._sync_final_model(is_last_joiner)

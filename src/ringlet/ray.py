"""ringlet as a backend of ``ray.util.collective``: ``import ringlet.ray`` registers ``"ringlet"``.

Then ``create_collective_group(actors, n, ranks, backend="ringlet")`` (or
``init_collective_group(n, rank, backend="ringlet")`` inside each actor) and ``col.allreduce(t)``,
``col.allgather``, ``col.broadcast``, ``col.reduce``, ``col.reducescatter``, ``col.barrier``,
``col.send`` / ``col.recv`` run on ringlet between the actors, for NumPy arrays and CPU torch
tensors. Ray builds the backend inside every actor, so every actor process must import this module
too (in its module or ``__init__``, or through ``ray.init(runtime_env={"worker_process_setup_hook":
"ringlet.ray.register"})``).

The rendezvous goes through Ray itself: rank 0 picks a free port on its node and a fresh random
secret and puts both in Ray's internal key-value store (GCS) under the group's name; the other
ranks read them there and rank 0 deletes them once every rank has joined. Whoever can read the
cluster's GCS can already run code in its actors, so the secret is as private as the cluster.
:func:`init` does the same outside any collective group, e.g. inside Ray Train workers.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np

try:
    import ray
    import ray.experimental.internal_kv as _kv
    from ray.util.collective import register_collective_backend
    from ray.util.collective.collective_group.base_collective_group import BaseGroup
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ringlet.ray needs Ray: pip install 'ringlet[ray]'") from exc

from .arrays import to_numpy
from .comm import Communicator
from .errors import CollectiveTimeout
from .world import init as _ringlet_init

BACKEND = "RINGLET"
#: Ray's key-value namespace holding each forming group's master address and secret.
KV_NAMESPACE = "ringlet"
_DEFAULT_TIMEOUT = 300.0
_POLL = 0.02
_OPS = {"SUM": "sum", "PRODUCT": "prod", "MIN": "min", "MAX": "max"}

_groups: dict[str, RingletGroup] = {}  # this process's groups by name, for communicator()
_groups_lock = threading.Lock()


def _timeout(timeout: float | None) -> float:
    """``timeout``, else RINGLET_TIMEOUT, else 300 s: how long joining may wait for the others."""
    if timeout is not None:
        return float(timeout)
    text = os.environ.get("RINGLET_TIMEOUT", "").strip()
    try:
        return float(text) if text else _DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"RINGLET_TIMEOUT={text!r} is not a number of seconds") from None


def _master_of_this_node() -> str:
    """``host:port`` on this Ray node with a port free right now, for rank 0's store."""
    host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _kv_key(name: str) -> str:
    """The group's key, scoped like Ray's named actors: two jobs may both use "default"."""
    return f"{ray.get_runtime_context().namespace}/{name}"


def init(
    name: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    timeout: float | None = None,
    deterministic: bool | None = None,
) -> Communicator:
    """Join ``world_size`` Ray processes as a ringlet world: rendezvous and secret through Ray.

    Every process of the world calls it with the same ``name`` and its own ``rank``. Inside a Ray
    Train worker, ``rank``, ``world_size`` and ``name`` default to the worker's world rank, world
    size and the run's experiment name. Rank 0 serves the store on its node; the others wait for
    its address up to ``timeout`` (default RINGLET_TIMEOUT, else 300 s).

    Raises ValueError when rank or world size is missing or out of range; CollectiveTimeout when
    rank 0 never publishes its address; what ``ringlet.init`` raises when the others never come.
    """
    if rank is None or world_size is None or name is None:
        context = _train_context()
        if context is None:
            raise ValueError(
                "ringlet.ray.init(): pass name, rank and world_size (outside Ray Train they cannot"
                " be known)"
            )
        rank = context.get_world_rank() if rank is None else rank
        world_size = context.get_world_size() if world_size is None else world_size
        name = f"train/{context.get_experiment_name()}" if name is None else name
    if not 0 <= rank < world_size:
        raise ValueError(f"ringlet.ray.init(): rank {rank} is not in 0..{world_size - 1}")
    wait = _timeout(timeout)
    key = _kv_key(name)
    if world_size == 1:
        return _ringlet_init(0, 1, "127.0.0.1:0", timeout=wait, deterministic=deterministic)
    if rank == 0:
        master, secret = _master_of_this_node(), secrets.token_hex(32)
        _kv._internal_kv_put(key, f"{master} {secret}", overwrite=True, namespace=KV_NAMESPACE)
        try:
            return _ringlet_init(
                0, world_size, master, secret=secret, timeout=wait, deterministic=deterministic
            )
        finally:
            # every rank registered (or the job failed): nobody needs the secret from Ray any more
            _kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    deadline = time.monotonic() + wait
    while (value := _kv._internal_kv_get(key, namespace=KV_NAMESPACE)) is None:
        if time.monotonic() > deadline:
            raise CollectiveTimeout(
                f"ringlet.ray.init({name!r}): rank {rank} of {world_size} waited {wait:g} s for"
                " rank 0 to publish its address in Ray; is rank 0 of this group running?",
                missing=(0,),
            )
        time.sleep(_POLL)
    master, secret = value.decode().split(" ", 1)
    return _ringlet_init(
        rank, world_size, master, secret=secret, timeout=wait, deterministic=deterministic
    )


def _train_context() -> Any:
    """Ray Train's context when this process is a Ray Train worker, else None."""
    try:
        from ray import train
    except ImportError:
        return None
    try:
        context = train.get_context()
        context.get_world_rank()
    except Exception:  # not inside a training worker
        return None
    return context


def _one(tensors: Sequence[Any], call: str) -> Any:
    """The single tensor of Ray's one-element list (ringlet has one array per process)."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 1:
        raise ValueError(
            f"ringlet backend {call}: takes one tensor per process (no multi-GPU lists); got"
            f" {type(tensors).__name__} of {len(tensors) if isinstance(tensors, list) else '?'}"
        )
    return tensors[0]


def _op(options: Any) -> str:
    """Ray's ReduceOp (SUM, PRODUCT, MIN, MAX) as ringlet's op name."""
    op = getattr(options, "reduceOp", None)
    name = getattr(op, "name", "SUM") if op is not None else "SUM"
    return _OPS[name]


def _root(options: Any) -> int:
    return int(getattr(options, "root_rank", 0))


def _op_timeout(options: Any) -> float | None:
    """The call's timeout in seconds when Ray's options set one, else the communicator's."""
    value: Any = getattr(options, "timeout_ms", None)
    seconds = float(value.total_seconds()) if isinstance(value, timedelta) else 0.0
    return seconds if seconds > 0 else None


def _copy_into(out: Any, data: np.ndarray, call: str) -> None:
    """Copy ``data`` into the caller's array or tensor ``out`` (same dtype, same element count)."""
    target = to_numpy(out, call=call, writable=True)
    if target.dtype != data.dtype or target.size != data.size:
        raise ValueError(
            f"ringlet backend {call}: an output holds {target.dtype} x {target.size}, but the"
            f" result is {data.dtype} x {data.size}"
        )
    np.copyto(target, data.reshape(target.shape))


class RingletGroup(BaseGroup):  # type: ignore[misc]
    """One ``ray.util.collective`` group run by a ringlet communicator; Ray builds one per actor."""

    def __init__(self, world_size: int, rank: int, group_name: str) -> None:
        super().__init__(world_size, rank, group_name)
        self.comm = init(f"collective/{group_name}", rank, world_size)
        with _groups_lock:
            _groups[group_name] = self

    @classmethod
    def backend(cls) -> str:
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return True

    def destroy_group(self) -> None:
        """Leave the ringlet world (rank 0 waits a little for the others to leave too)."""
        with _groups_lock:
            if _groups.get(self.group_name) is self:
                del _groups[self.group_name]
        self.comm.close()

    def allreduce(self, tensor: Sequence[Any], allreduce_options: Any = None) -> None:
        t = _one(tensor, "allreduce")
        self.comm.all_reduce(t, op=_op(allreduce_options), timeout=_op_timeout(allreduce_options))

    def barrier(self, barrier_options: Any = None) -> None:
        self.comm.barrier(timeout=_op_timeout(barrier_options))

    def reduce(self, tensor: Sequence[Any], reduce_options: Any = None) -> None:
        t = _one(tensor, "reduce")
        self.comm.reduce(
            t,
            root=_root(reduce_options),
            op=_op(reduce_options),
            timeout=_op_timeout(reduce_options),
        )

    def broadcast(self, tensor: Sequence[Any], broadcast_options: Any = None) -> None:
        t = _one(tensor, "broadcast")
        self.comm.broadcast(
            t, root=_root(broadcast_options), timeout=_op_timeout(broadcast_options)
        )

    def allgather(
        self,
        tensor_list: Sequence[Sequence[Any]],
        tensor: Sequence[Any],
        allgather_options: Any = None,
    ) -> None:
        """Fill ``tensor_list[0][r]`` with rank r's tensor (sizes may differ between ranks)."""
        outs, t = _one(tensor_list, "allgather"), _one(tensor, "allgather")
        if len(outs) != self.world_size:
            raise ValueError(
                f"ringlet backend allgather: {len(outs)} output tensors for {self.world_size} ranks"
            )
        mine = to_numpy(t, call="allgather").reshape(-1)
        gathered = self.comm.all_gather(mine, timeout=_op_timeout(allgather_options))
        sizes = [to_numpy(o, call="allgather").size for o in outs]
        if sum(sizes) != gathered.size:
            raise ValueError(
                f"ringlet backend allgather: the outputs hold {sum(sizes)} elements in all, the"
                f" ranks sent {gathered.size}"
            )
        start = 0
        for out, size in zip(outs, sizes, strict=True):
            _copy_into(out, gathered[start : start + size], "allgather")
            start += size

    def reducescatter(
        self,
        tensor: Sequence[Any],
        tensor_list: Sequence[Sequence[Any]],
        reducescatter_options: Any = None,
    ) -> None:
        """``tensor[0]`` = op over ranks of their ``tensor_list[0][this rank]``; inputs unchanged."""
        out, parts = _one(tensor, "reducescatter"), _one(tensor_list, "reducescatter")
        if len(parts) != self.world_size:
            raise ValueError(
                f"ringlet backend reducescatter: {len(parts)} input tensors for"
                f" {self.world_size} ranks"
            )
        arrays = [to_numpy(p, call="reducescatter").reshape(-1) for p in parts]
        if len({a.size for a in arrays}) != 1:
            raise ValueError(
                "ringlet backend reducescatter: the input tensors differ in size"
                f" ({[a.size for a in arrays]})"
            )
        mine = self.comm.reduce_scatter(
            np.concatenate(arrays),
            op=_op(reducescatter_options),
            timeout=_op_timeout(reducescatter_options),
        )
        _copy_into(out, mine, "reducescatter")

    def send(self, tensor: Sequence[Any], send_options: Any) -> None:
        t = _one(tensor, "send")
        self.comm.send(t, int(send_options.dst_rank), timeout=_op_timeout(send_options))

    def recv(self, tensor: Sequence[Any], recv_options: Any) -> None:
        t = _one(tensor, "recv")
        self.comm.recv(t, int(recv_options.src_rank), timeout=_op_timeout(recv_options))


def communicator(group_name: str = "default") -> Communicator:
    """The ringlet Communicator behind this process's group ``group_name`` of backend "ringlet".

    For what ``ray.util.collective`` lacks (all_to_all, gather, scatter, objects, async calls).
    Raises ValueError when this process has no such group yet.
    """
    with _groups_lock:
        group = _groups.get(group_name)
    if group is None:
        raise ValueError(
            f"ringlet.ray.communicator({group_name!r}): this process has no ringlet group of that"
            " name (run a collective on it, or init_collective_group, first)"
        )
    return group.comm


def register() -> None:
    """Register the backend "ringlet" with ray.util.collective in this process (idempotent).

    Import-time does this already; usable as Ray's ``worker_process_setup_hook``.
    """
    from ray.util.collective import backend_registry

    if not backend_registry._global_registry.is_registered(BACKEND):
        register_collective_backend(BACKEND, RingletGroup)


register()

__all__ = ["BACKEND", "RingletGroup", "communicator", "init", "register"]

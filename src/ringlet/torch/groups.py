"""The ringlet communicator behind each torch process group of backend "ringlet".

The default group starts its own ringlet world (``ringlet.init``): rank 0 picks a free port for
ringlet's store and publishes ``host:port`` and, unless RINGLET_SECRET is set, a fresh random
secret through torch's store (the job's own store, which every rank already trusts). This works the
same for env://, tcp:// and file:// init methods and under torchrun, and never competes with
torch's TCPStore for MASTER_PORT. Groups made later with ``new_group`` become communicators of the
same world over their global ranks; a ringlet group under a default group of another backend gets
a world of its own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from typing import Any

import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

import ringlet
from ringlet.comm import WORLD_ID

__all__ = [
    "communicator_for",
    "default_world",
    "forget",
    "group_communicator",
    "new_world",
    "sub_communicator",
]

_KEY_MASTER = "ringlet/master"
_KEY_SECRET = "ringlet/secret"
_default_world: ringlet.Communicator | None = None


def default_world() -> ringlet.Communicator | None:
    """The ringlet world of torch's default group, when that group runs on backend "ringlet"."""
    if _default_world is None or _default_world._closed:
        return None
    return _default_world


def forget(comm: ringlet.Communicator) -> None:
    """Called when a default group's communicator closes, so the next one starts afresh."""
    global _default_world
    if comm is _default_world:
        _default_world = None


def _underlying(store: Any) -> Any:
    """The store under torch's PrefixStores (a TCPStore knows the master host)."""
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    return store


def _master_host(store: Any) -> str:
    """Where rank 0 serves ringlet's store: RINGLET_HOST, torch's TCPStore host, MASTER_ADDR, else loopback."""
    if host := os.environ.get("RINGLET_HOST"):
        return host
    base = _underlying(store)
    if isinstance(base, TCPStore) and base.host:
        return str(base.host)
    return os.environ.get("MASTER_ADDR") or "127.0.0.1"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _timeout(seconds: float) -> float | None:
    """torch's group timeout, unless RINGLET_TIMEOUT says otherwise (then ringlet reads it)."""
    return None if os.environ.get("RINGLET_TIMEOUT") else seconds


def new_world(store: Any, rank: int, size: int, seconds: float) -> ringlet.Communicator:
    """Start a ringlet world for these ``size`` ranks, meeting through torch's ``store``."""
    if size == 1:
        return ringlet.init(rank=0, world_size=1, timeout=_timeout(seconds))
    env_secret = os.environ.get("RINGLET_SECRET")
    if rank == 0:
        host = _master_host(store)
        address = f"[{host}]:{_free_port(host)}" if ":" in host else f"{host}:{_free_port(host)}"
        store.set(_KEY_MASTER, address)
        if not env_secret:
            store.set(_KEY_SECRET, secrets.token_hex(32))
    address = store.get(_KEY_MASTER).decode()
    secret = env_secret or store.get(_KEY_SECRET).decode()
    return ringlet.init(
        rank=rank, world_size=size, master=address, secret=secret, timeout=_timeout(seconds)
    )


def sub_communicator(
    parent: ringlet.Communicator, name: str, global_ranks: list[int]
) -> ringlet.Communicator:
    """A communicator of ``parent``'s world over ``global_ranks``, named ``name``: every member
    derives the same id from the name, so only the members take part (as torch builds groups)."""
    raw = f"torch-group/{parent.world.job}/{name}".encode()
    comm_id = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2
    if comm_id == WORLD_ID:
        comm_id += 1
    return ringlet.Communicator(parent.world, comm_id, global_ranks)


def group_communicator(options: Any) -> ringlet.Communicator:
    """The communicator of the group torch is creating (closing a world communicator ends its world).

    ``options`` is torch's ``_DistributedBackendOptions``: store, group_rank, group_size, timeout,
    group_id, global_ranks_in_group.
    """
    global _default_world
    seconds = options.timeout.total_seconds()
    ranks = list(options.global_ranks_in_group)
    world = default_world()
    if not dist.is_initialized():  # torch is creating its default group
        comm = new_world(options.store, options.group_rank, options.group_size, seconds)
        _default_world = comm
        return comm
    if world is not None and dist.get_backend() == "ringlet" and ranks:
        return sub_communicator(world, str(options.group_id), ranks)
    return new_world(options.store, options.group_rank, options.group_size, seconds)


def communicator_for(group: Any = None) -> ringlet.Communicator:
    """The ringlet communicator behind torch process group ``group`` (None: the default group).

    Raises ValueError when the group does not run on backend "ringlet".
    """
    from .backend import RingletProcessGroup

    pg = group
    if pg is None:
        if not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialized; call "
                "dist.init_process_group('ringlet') or pass a ringlet communicator"
            )
        pg = dist.distributed_c10d._get_default_group()
    if not isinstance(pg, RingletProcessGroup):
        raise ValueError(
            f"process group {pg!r} does not run on backend 'ringlet' "
            f"(it runs on {dist.get_backend(pg)!r}); pass a ringlet communicator"
        )
    return pg.comm

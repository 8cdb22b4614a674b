"""How a communicator reaches its peers: TCP to every rank, shared memory to the ranks of its host.

``connect`` builds a communicator's routes (transport/routes.py: each peer reached through the
transport that gets there) and, when every rank shares this host, the host's shm group, which
still runs the one-host default algorithms (transport/shm.py) until they are schedules too.
RINGLET_TRANSPORT=tcp keeps everything on TCP; =shm makes shared memory required.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .transport.routes import Routes
from .transport.shm_wait import core_each
from .transport.tcp import TcpTransport

if TYPE_CHECKING:
    from .world import World

log = logging.getLogger("ringlet")


def host_indices(hosts: Sequence[str]) -> tuple[int, ...]:
    """Each rank's host as a small number, hosts numbered by first appearance."""
    seen: dict[str, int] = {}
    return tuple(seen.setdefault(h, len(seen)) for h in hosts)


def _store_exchange(world: World, prefix: str, rank: int, ranks: list[int], timeout: float) -> Any:
    """A set-up exchange through the store among ``ranks``: each publishes a value, reads all."""
    rounds = iter(range(1 << 30))

    def exchange(value: bytes) -> list[bytes]:
        key = f"{prefix}{next(rounds)}/"
        world.store.set(f"{key}{rank}", value)
        return [world.store.get(f"{key}{r}", timeout=timeout) for r in ranks]

    return exchange


def core_per_rank(world: World) -> bool:
    """Whether this host has a core for each of the job's ranks on it: then a waiting rank may
    spin a little before it sleeps (the rank it waits for has a core of its own)."""
    return core_each(world.hosts.count(world.hosts[world.rank]))


def connect(
    world: World,
    comm_id: int,
    members: Sequence[int],
    hosts: Sequence[int],
    rank: int,
    poll: Callable[[], None],
    timeout: float,
) -> tuple[Routes, Any]:
    """The routes of a communicator (rank ``rank`` of ``members``), and its shm group or None."""
    transport = os.environ.get("RINGLET_TRANSPORT", "auto")
    if transport not in ("auto", "tcp", "shm"):
        raise ValueError(f"RINGLET_TRANSPORT={transport!r}: use tcp, shm or auto")
    size, me, prefix = len(members), hosts[rank], f"c{comm_id:x}/"
    addresses = [world.addresses[g] for g in members]
    tcp = TcpTransport(
        comm_id, rank, addresses, world.listener, world.secret, poll, core_per_rank(world)
    )
    routes, group = Routes(tcp, None), None
    local = [r for r, h in enumerate(hosts) if h == me]
    if transport == "tcp":
        return routes, None
    from .transport.shm import ShmGroup, ShmUnavailable
    from .transport.shm_mailboxes import ShmUnavailable as P2PUnavailable
    from .transport.shm_p2p import ShmTransport

    if len(local) > 1:
        try:
            shm = ShmTransport.open(
                rank,
                size,
                local,
                job=f"{world.job}-{comm_id:x}-{me}",
                exchange=_store_exchange(world, f"{prefix}p2p/{me}/", rank, local, timeout),
                poll=poll,
            )
            routes = Routes(tcp, shm)
        except P2PUnavailable as exc:
            _unavailable(exc, transport == "shm", rank)
    if size > 1 and len(local) == size:
        try:
            group = ShmGroup.open(
                rank,
                size,
                job=f"{world.job}-{comm_id:x}",
                exchange=_store_exchange(world, f"{prefix}shm/", rank, local, timeout),
                timeout=timeout,
                poll=poll,
            )
        except ShmUnavailable as exc:
            _unavailable(exc, transport == "shm", rank)
    return routes, group


def _unavailable(exc: Exception, required: bool, rank: int) -> None:
    """Shared memory the host forbids: an error if it was required, else TCP with a warning."""
    if required:
        raise exc
    log.warning("ringlet: shared memory unavailable (%s); rank %d uses TCP", exc, rank)

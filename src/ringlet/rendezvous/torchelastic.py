"""torch's store on MASTER_PORT as the place where rank 0 tells the others where ringlet's store is.

Under torchrun, MASTER_ADDR:MASTER_PORT is torch's: the agent's own TCPStore for the whole run
(TORCHELASTIC_USE_AGENT_STORE=True), or, where the agents do not share theirs
(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which node changes need in torch 2.13: a node joining a
running job waits forever otherwise), the one rank 0's ``init_process_group`` serves. In that case
ringlet's rank 0 serves it first, multi-tenant, so torch's rank 0 later shares the same server.
Rank 0 picks a free port on its own address and publishes ``host:port`` there under a key that
holds the run id, the round (the restart count, or where torch's store is new each round its
address: agents count restarts each on its own) and the world size, so a restarted attempt, or
a new round after a node joined, never reads the address of a previous round's (dead) store, and
``MASTER_PORT + 1`` (which another job may own) is never assumed. Only the address goes there:
that store is unauthenticated, so the secret never does (see :mod:`ringlet.rendezvous.secret`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringlet.rendezvous.env import JobEnv


def _reachable_address(master_host: str, environ: Mapping[str, str]) -> str:
    """RINGLET_HOST, else this host's address on the route towards the agent's store."""
    if host := environ.get("RINGLET_HOST", "").strip():
        return host
    with contextlib.suppress(OSError):
        family = socket.getaddrinfo(master_host, None, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect((family[4][0], 9))  # sends nothing: only picks the interface
            address: str = probe.getsockname()[0]
            return address
    return "127.0.0.1"


def free_port(host: str) -> int:
    family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    with socket.socket(family[0], socket.SOCK_STREAM) as probe:
        probe.bind((family[4][0], 0))
        port: int = probe.getsockname()[1]
        return port


#: torch stores served here for rank 0's process (a server lives as long as its TCPStore).
_served: list[object] = []


def key(environ: Mapping[str, str]) -> str:
    """The key of this round's ringlet store address: run id, round (torch_round()), world size."""
    from ringlet.rendezvous.launchers import torch_round

    run = environ.get("TORCHELASTIC_RUN_ID", "").strip() or "none"
    world = environ.get("WORLD_SIZE", "").strip() or "?"
    return f"ringlet/{run}/{torch_round(environ)[1:] or 'attempt0'}/world{world}/store"


def via_agent_store(env: JobEnv, environ: Mapping[str, str]) -> JobEnv:
    """``env`` with the master moved to the store address rank 0 published in the agent's store.

    Without torch importable, ``env`` unchanged (our store then takes MASTER_PORT + 1).
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return env
    serve = env.rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    agent = dist.TCPStore(  # type: ignore[attr-defined]
        env.master_host,
        env.master_port,
        is_master=serve,
        timeout=timedelta(seconds=env.timeout),
        wait_for_workers=False,
        multi_tenant=True,  # as torch's own rank 0 makes it: one server for both
    )
    if serve:
        _served.append(agent)
    name = key(environ)
    if env.rank == 0:
        host = _reachable_address(env.master_host, environ)
        port = free_port(host)
        agent.set(name, f"{host}\n{port}")
    else:
        try:
            host, port_text = agent.get(name).decode().split("\n")
        except RuntimeError as exc:  # torch's store timeout
            raise TimeoutError(
                f"ringlet.init(): rank 0 did not publish its store address in torchrun's agent"
                f" store at {env.master_host}:{env.master_port} within {env.timeout:g} s"
                f" (key {name!r}); did rank 0 start, and call ringlet.init()? ({exc})"
            ) from exc
        port = int(port_text)
    return dataclasses.replace(env, master_host=host, master_port=port, store_port_offset=0)

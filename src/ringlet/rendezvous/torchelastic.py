"""torchrun's agent store as the place where rank 0 tells the others where ringlet's store is.

torchrun (TORCHELASTIC_USE_AGENT_STORE=True) already serves a TCPStore on MASTER_ADDR:MASTER_PORT
for the whole run, restarts included. Rank 0 picks a free port on its own address and publishes
``host:port`` there under a key that holds the run id and the restart count, so a restarted
attempt never reads the address of the previous attempt's (dead) store, and ``MASTER_PORT + 1``
(which another job may own) is never assumed. Only the address goes there: that store is
unauthenticated, so the secret never does (see :mod:`ringlet.rendezvous.secret`).
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


def key(environ: Mapping[str, str]) -> str:
    """The agent-store key of this attempt's ringlet store address."""
    run = environ.get("TORCHELASTIC_RUN_ID", "").strip() or "none"
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "").strip() or "0"
    return f"ringlet/{run}/attempt{restart}/store"


def via_agent_store(env: JobEnv, environ: Mapping[str, str]) -> JobEnv:
    """``env`` with the master moved to the store address rank 0 published in the agent's store.

    Without torch importable, ``env`` unchanged (our store then takes MASTER_PORT + 1).
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return env
    agent = dist.TCPStore(  # type: ignore[attr-defined]
        env.master_host,
        env.master_port,
        is_master=False,
        timeout=timedelta(seconds=env.timeout),
        wait_for_workers=False,
    )
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
    del agent
    return dataclasses.replace(env, master_host=host, master_port=port, store_port_offset=0)

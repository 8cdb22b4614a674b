"""What each rank of `ringlet run` is started with: its argv and its environment.

A rank needs the RINGLET_* variables that `ringlet.init()` reads and the ones torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, …), alike on every node where they must be: torch's master
address, the port of ringlet's own store beside it, the job's shared secret and a job id every
node derives the same way. Deciding those is apart from starting and supervising processes
(`ringlet.launch`), and every check here runs before any rank starts.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

from ringlet.auth import job_secret, secret_from_str
from ringlet.rendezvous.env import LAUNCHER_STORE_VARIABLE
from ringlet.rendezvous.launchers import parse_master
from ringlet.rendezvous.server import StoreServer


def rank_environments(
    nproc: int,
    *,
    nnodes: int,
    node_rank: int,
    master: str | None,
    env: dict[str, str] | None,
    secret: str | None,
    timeout: float | None,
    transport: str | None,
    store_port: int | None,
    job_id: str | None,
) -> list[dict[str, str]]:
    """The environment of each of this node's ranks, in local-rank order (see `launch`).

    Raises ValueError for a bad master, store port or secret.
    """
    host, port = _master_address(master, nnodes)
    ours = _store_port(host, port, store_port, master is None)
    base = {**os.environ, **(env or {})}
    shared_secret = _resolve_secret(secret or base.get("RINGLET_SECRET"), nnodes)
    store = f"[{host}]:{ours}" if ":" in host else f"{host}:{ours}"
    shared = {
        **base,
        "PYTHONUNBUFFERED": "1",  # ranks' output appears as it is printed, not at exit
        "RINGLET_WORLD_SIZE": str(nnodes * nproc),
        "RINGLET_LOCAL_SIZE": str(nproc),
        "RINGLET_NODE_RANK": str(node_rank),
        "RINGLET_MASTER": store,
        "RINGLET_SECRET": shared_secret,
        "RINGLET_JOB_ID": job_id
        or base.get("RINGLET_JOB_ID")
        or _job_id(shared_secret, host, ours),
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_WORLD_SIZE": str(nnodes * nproc),
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
    }
    if nproc > 1 and not base.get("OMP_NUM_THREADS"):
        shared["OMP_NUM_THREADS"] = "1"  # as torchrun: N ranks x all cores each would thrash
    if timeout is not None:
        shared["RINGLET_TIMEOUT"] = str(timeout)
    if transport is not None:
        shared["RINGLET_TRANSPORT"] = transport
    first = node_rank * nproc
    return [
        {**shared, "RINGLET_RANK": str(first + local), "RINGLET_LOCAL_RANK": str(local),
         "RANK": str(first + local), "LOCAL_RANK": str(local), "ROLE_RANK": str(first + local)}
        for local in range(nproc)
    ]  # fmt: skip


def launcher_store(rank_envs: list[dict[str, str]], node_rank: int) -> StoreServer | None:
    """Node 0's launcher serves the job's rendezvous store itself, so rank 0's process is not the
    one every rank depends on: rank 0 can be lost, and restarted, like any other. Every rank is
    told so (RINGLET_LAUNCHER_STORE=1). Returns the server (None on other nodes); with one rank,
    or when the address cannot be bound here, rank 0 serves the store as under other launchers
    (and reports the address it cannot bind)."""
    first = rank_envs[0]
    server = None
    if int(first["RINGLET_WORLD_SIZE"]) > 1 and node_rank == 0:
        host, port = parse_master(first["RINGLET_MASTER"], "RINGLET_MASTER")
        secret = secret_from_str(first["RINGLET_SECRET"])
        try:
            server = StoreServer(host, port, secret, job=first["RINGLET_JOB_ID"])
        except OSError:
            server = None
        else:
            server.start()
    served = server is not None or (node_rank > 0 and int(first["RINGLET_WORLD_SIZE"]) > 1)
    for env in rank_envs:
        env[LAUNCHER_STORE_VARIABLE] = "1" if served else "0"
    return server


def command_argv(cmd: list[str]) -> list[str]:
    """The argv to start: a `.py` script runs with this interpreter, anything else as given."""
    if not cmd:
        raise ValueError("ringlet run: no command given; usage: ringlet run -n N script.py args…")
    if cmd[0].endswith(".py"):
        if not os.path.isfile(cmd[0]):
            raise ValueError(f"ringlet run: script {cmd[0]!r} not found")
        return [sys.executable, *cmd]
    return list(cmd)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _store_port(host: str, port: int, given: int | None, picked: bool) -> int:
    """ringlet's store port: ``given``, else a free one when the master was picked, else port + 1."""
    if given is not None:
        if not 0 < given < 65536 or given == port:
            raise ValueError(f"ringlet run: --store-port {given} is not a port other than {port}")
        return given
    if picked:
        while (ours := _free_port()) == port:
            pass
        return ours
    if port + 1 > 65535:
        raise ValueError(
            f"ringlet run: --master-port {port} leaves no next port; pass --store-port"
        )
    return port + 1


def _master_address(master: str | None, nnodes: int) -> tuple[str, int]:
    """(host, port) of torch's master; on one node a free local port is picked when not given."""
    if master is None:
        if nnodes > 1:
            raise ValueError(
                "ringlet run: --nnodes > 1 needs --master-addr HOST --master-port PORT (or"
                " --master HOST:PORT), the same on every node: an address of node 0 that the other"
                " nodes can reach"
            )
        return "127.0.0.1", _free_port()
    host, sep, port_text = master.rpartition(":")
    host = host.strip("[]")  # [::1]:29500
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"ringlet run: --master must look like host:port, got {master!r}")
    return host, int(port_text)


def _resolve_secret(given: str | None, nnodes: int) -> str:
    """The job's shared secret: the one given, else (one node only) a fresh one."""
    if given:
        secret_from_str(given)  # refuses a blank secret, which would authenticate anyone
        return given
    if nnodes > 1:
        raise ValueError(
            "ringlet run: with --nnodes > 1 every node must use the same secret; pass --secret S "
            "or set RINGLET_SECRET on every node, e.g. to the output of "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return job_secret().decode("ascii")


def _job_id(shared_secret: str, host: str, port: int) -> str:
    """A job id every node derives alike from the secret and the master, revealing neither.

    The master is part of it so that jobs sharing a secret (RINGLET_SECRET exported once) differ.
    """
    material = f"ringlet-job-id\0{host}\0{port}\0{shared_secret}".encode()
    return hashlib.sha256(material).hexdigest()[:16]

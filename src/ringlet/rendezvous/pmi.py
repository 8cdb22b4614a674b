"""Across hosts under MPICH's Hydra: rank 0's store address through Hydra's own key-value space.

Hydra (``mpiexec`` of the ``mpich`` wheel) gives each rank PMI_RANK, PMI_SIZE, MPI_LOCALNRANKS,
PMI_HOSTNAME (this host, as mpiexec named it) and PMI_FD, a socket to the ``hydra_pmi_proxy``
that started it, but no master address. Over that socket every rank speaks PMI-1's wire protocol
(one ``cmd=... key=value`` line each way): rank 0 puts the address it serves its store on into the
job's key-value space, every rank enters one barrier, and every rank gets the address back. The
job id is the key-value space's name, alike on every host and different for every mpiexec run.

MPI in the same process is unharmed: MPI_Init before or after speaks PMI on the same socket in
turn (each command waits for its answer), and keys here begin with ``ringlet-``. Only the address
goes into the key-value space (mpiexec's proxies relay it unauthenticated), never the secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringlet.rendezvous.env import JobEnv

#: The master host _from_mpi puts in a JobEnv that via_pmi() fills in; never a real address.
PENDING_HOST = "(from Hydra's PMI)"
_KEY = "ringlet-store"
_ERROR = "error "


class PMIError(RuntimeError):
    """Hydra's PMI said no, closed the socket, or did not answer within the timeout."""


def can_ask(environ: Mapping[str, str]) -> bool:
    """True when this process has a PMI-1 socket from Hydra (PMI_FD) and its rank on it."""
    return bool(environ.get("PMI_FD", "").strip().isdigit() and environ.get("PMI_RANK", "").strip())


class PMIClient:
    """PMI-1 over the inherited socket PMI_FD (a duplicate of it: closing ours leaves MPI's)."""

    def __init__(self, fd: int, timeout: float) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._pending = b""

    def close(self) -> None:
        self._sock.close()

    def ask(self, line: str, answer: str) -> dict[str, str]:
        """Send ``line``, read one reply line, check it is ``cmd=<answer>`` with rc 0 (if any)."""
        self._sock.sendall(line.encode() + b"\n")
        while b"\n" not in self._pending:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise PMIError(f"no answer to {line.split()[0]!r} within {self._timeout:g} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise PMIError(f"the Hydra proxy closed the PMI socket after {line.split()[0]!r}")
            self._pending += chunk
        reply, _, self._pending = self._pending.partition(b"\n")
        fields = dict(
            item.split("=", 1) for item in reply.decode(errors="replace").split() if "=" in item
        )
        if fields.get("cmd") != answer or fields.get("rc", "0") != "0":
            raise PMIError(f"Hydra answered {reply.decode(errors='replace')!r} to {line!r}")
        return fields


def _own_address(environ: Mapping[str, str]) -> str:
    """An address of this host the other hosts reach: RINGLET_HOST, else PMI_HOSTNAME's address.

    Raises PMIError when PMI_HOSTNAME names only a loopback address (Debian maps the hostname to
    127.0.1.1) or none, since the other hosts could not connect there.
    """
    if host := environ.get("RINGLET_HOST", "").strip():
        return host
    name = environ.get("PMI_HOSTNAME", "").strip() or socket.gethostname()
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
            if not ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_loopback:
                return str(sockaddr[0])
    raise PMIError(
        f"rank 0's host {name!r} (PMI_HOSTNAME) has no address other hosts can reach (it resolves"
        " to loopback or to nothing); name the hosts by address in mpiexec -hosts, or export"
        " RINGLET_HOST=<an address of rank 0's host> (Hydra passes it on)"
    )


def _rank0_value(environ: Mapping[str, str], free_port: Callable[[str], int]) -> str:
    """``host port`` of rank 0's store to be, or ``error <why>`` for every rank to raise."""
    try:
        host = _own_address(environ)
    except PMIError as exc:
        return f"{_ERROR}{exc}"
    try:
        return f"{host} {free_port(host)}"
    except OSError as exc:
        return f"{_ERROR}rank 0 cannot listen on {host} (RINGLET_HOST or PMI_HOSTNAME): {exc}"


def via_pmi(env: JobEnv, environ: Mapping[str, str]) -> JobEnv:
    """``env`` with the master rank 0 published through Hydra's key-value space, the job id its name.

    Every rank must call it (one barrier); raises TimeoutError naming the wait when a rank never
    does within ``env.timeout``, ValueError with rank 0's reason when rank 0 has no usable address.
    """
    from ringlet.rendezvous.torchelastic import free_port

    client = PMIClient(int(environ["PMI_FD"]), env.timeout)
    try:
        client.ask("cmd=init pmi_version=1 pmi_subversion=1", "response_to_init")
        kvs = client.ask("cmd=get_my_kvsname", "my_kvsname")["kvsname"]
        if env.rank == 0:
            value = _rank0_value(environ, free_port)
            client.ask(
                f"cmd=put kvsname={kvs} key={_KEY} value={value.replace(' ', '+')}", "put_result"
            )
        try:
            client.ask("cmd=barrier_in", "barrier_out")
        except PMIError as exc:
            raise TimeoutError(
                f"ringlet.init() under mpiexec: rank {env.rank} waited for all {env.world_size}"
                f" ranks to call ringlet.init() ({exc}); did every rank start, and call it?"
            ) from None
        value = client.ask(f"cmd=get kvsname={kvs} key={_KEY}", "get_result")["value"]
    except PMIError as exc:
        raise TimeoutError(f"ringlet.init() under mpiexec: Hydra's PMI: {exc}") from None
    finally:
        client.close()
    value = value.replace("+", " ")
    if value.startswith(_ERROR):
        raise ValueError(f"ringlet.init() under mpiexec: {value[len(_ERROR) :]}")
    host, port = value.split()
    return dataclasses.replace(
        env,
        master_host=host,
        master_port=int(port),
        store_port_offset=0,
        job_id=env.job_id or f"mpi:{kvs}",
    )

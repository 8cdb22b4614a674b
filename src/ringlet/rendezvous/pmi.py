"""Under MPICH's Hydra: rank 0's store address (and -pmi-port's rank and size) through Hydra's PMI.

Hydra (``mpiexec`` of the ``mpich`` wheel) gives each rank PMI_RANK, PMI_SIZE, MPI_LOCALNRANKS,
PMI_HOSTNAME (this host, as mpiexec named it) and PMI_FD, a socket to the ``hydra_pmi_proxy``
that started it, but no master address. Over that socket every rank speaks PMI-1's wire protocol
(one ``cmd=... key=value`` line each way): rank 0 puts the address it serves its store on into the
job's key-value space, every rank enters one barrier, and every rank gets the address back. The
job id is the key-value space's name, alike on every host and different for every mpiexec run.

MPI in the same process is unharmed: MPI_Init before or after speaks PMI on the same PMI_FD in
turn (each command waits for its answer; our duplicate is left blocking, a flag the two share),
and keys here begin with ``ringlet-``. Only the address
goes into the key-value space (mpiexec's proxies relay it unauthenticated), never the secret.

``mpiexec -pmi-port`` gives no PMI_FD, PMI_RANK or PMI_SIZE but PMI_PORT (``host:port`` of the
proxy) and PMI_ID: a client connects there and opens with ``cmd=initack pmiid=<PMI_ID>``, answered
by ``cmd=initack`` and three ``cmd=set`` lines (size, rank, debug), as MPICH's own client does
(src/pmi/src/pmi_v1.c, PMII_Set_from_port). A process opens one such connection and keeps it
to its exit, ending it then with ``cmd=finalize`` (the proxy takes a PMI connection closed
without it for a rank that died): Hydra 5's proxy keeps a finalized connection's descriptor in
its table, so a later connection that gets the same descriptor number would be taken for that
rank's. MPI_Init after it opens MPI's own connection, which the proxy then takes as the rank's;
MPI_Init before it cannot be followed (ours would take MPI's place), which is said at once.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringlet.rendezvous.env import JobEnv

#: The master host _from_mpi puts in a JobEnv that via_pmi() fills in; never a real address.
PENDING_HOST = "(from Hydra's PMI)"
_KEY = "ringlet-store"
_ERROR = "error "
_FINALIZE_WAIT = 5.0  # seconds for the proxy's finalize_ack at exit
_port_client: PMIClient | None = None  # -pmi-port's one connection of this process (port_client)


class PMIError(RuntimeError):
    """Hydra's PMI said no, closed the socket, or did not answer within the timeout."""


def can_ask(environ: Mapping[str, str]) -> bool:
    """True when this process can speak PMI-1 to Hydra: PMI_FD and its rank, or -pmi-port's."""
    fd = environ.get("PMI_FD", "").strip().isdigit() and environ.get("PMI_RANK", "").strip()
    return bool(fd) or port_mode(environ)


def port_mode(environ: Mapping[str, str]) -> bool:
    """True under ``mpiexec -pmi-port``: PMI_PORT and PMI_ID set, no PMI_FD."""
    port, pmi_id = environ.get("PMI_PORT", "").strip(), environ.get("PMI_ID", "").strip()
    return bool(port and pmi_id.isdigit() and not environ.get("PMI_FD", "").strip())


class PMIClient:
    """PMI-1 to Hydra's proxy: over a duplicate of the inherited socket PMI_FD (closing ours leaves
    MPI's), or (``open``, under -pmi-port) over a connection of our own to PMI_PORT."""

    def __init__(self, sock: socket.socket, timeout: float, own: bool = False) -> None:
        self._sock = sock
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._pending = b""
        self._own = os.getpid() if own else 0  # a PMI_PORT connection's opener: it finalizes
        self.placement: dict[str, str] = {}  # -pmi-port's initack: size, rank, debug

    def rearm(self, timeout: float) -> None:
        """Give the next commands ``timeout`` seconds from now (a kept connection's next use)."""
        self._deadline, self._timeout = time.monotonic() + timeout, timeout

    @classmethod
    def open(cls, environ: Mapping[str, str], timeout: float) -> PMIClient:
        """A client connected to PMI_PORT and past initack (``placement`` set).

        Raises PMIError naming PMI_PORT when the proxy cannot be reached or says no.
        """
        text = environ["PMI_PORT"].strip()
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise PMIError(f"PMI_PORT={text!r} is not host:port")
        try:
            sock = _connect(host, int(port), timeout)
        except OSError as exc:
            raise PMIError(f"cannot reach Hydra's proxy at PMI_PORT={text!r}: {exc}") from None
        client = cls(sock, timeout, own=True)
        client.ask(f"cmd=initack pmiid={environ['PMI_ID'].strip()}", "initack")
        for _ in range(3):  # size, rank, debug, one line each
            client.placement.update(client.reply("set", "initack"))
        client.placement.pop("cmd", None)
        return client

    def close(self) -> None:
        """Close our socket; a connection of our own first says cmd=finalize (else the proxy
        takes it for a dead rank)."""
        if self._own == os.getpid():  # not in a forked child, which shares the connection
            self.rearm(_FINALIZE_WAIT)  # the ack, before ours closes (else the proxy's send fails)
            with contextlib.suppress(PMIError, OSError):
                self.ask("cmd=finalize", "finalize_ack")
        # a timeout made the socket non-blocking, a flag PMI_FD's duplicate shares with MPI's:
        # MPI's PMI_Init (or its later barriers) would then read nothing and fail
        with contextlib.suppress(OSError):
            self._sock.setblocking(True)
        self._sock.close()

    def ask(self, line: str, answer: str) -> dict[str, str]:
        """Send ``line``, read one reply line, check it is ``cmd=<answer>`` with rc 0 (if any)."""
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as exc:
            raise PMIError(f"cannot send {line.split()[0]!r} to the Hydra proxy: {exc}") from None
        return self.reply(answer, line)

    def reply(self, answer: str, line: str) -> dict[str, str]:
        """Read one reply line to ``line``; PMIError unless it is ``cmd=<answer>`` with rc 0."""
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


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to Hydra's proxy; where its host name does not resolve here, by loopback
    (the proxy that started this process runs on this host)."""
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)


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


def port_client(environ: Mapping[str, str], timeout: float) -> PMIClient:
    """This process's one connection to PMI_PORT: opened (initack) at first use, finalized at exit.

    Raises PMIError naming PMI_PORT when the proxy cannot be reached or says no.
    """
    global _port_client
    if _port_client is None:
        _port_client = PMIClient.open(environ, timeout)
        atexit.register(_port_client.close)
    _port_client.rearm(timeout)
    return _port_client


def _mpi_initialized() -> bool:
    """True when mpi4py in this process has initialized MPI and not yet finalized it."""
    mpi = sys.modules.get("mpi4py.MPI")
    with contextlib.suppress(Exception):  # a half-imported or stand-in module: not initialized
        return bool(mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized())
    return False


def with_port_placement(environ: Mapping[str, str], timeout: float) -> dict[str, str]:
    """``environ`` with the PMI_RANK and PMI_SIZE that ``mpiexec -pmi-port`` gives only over PMI_PORT.

    Raises ConnectionError naming PMI_PORT when Hydra's proxy cannot be reached or says no;
    RuntimeError when MPI (mpi4py) came first, since a connection of ours would take MPI's place.
    """
    if _port_client is None and _mpi_initialized():
        raise RuntimeError(
            "ringlet.init() under mpiexec -pmi-port: MPI_Init came first, and Hydra's proxy keeps"
            " one PMI connection a rank: ringlet's would take the place of MPI's. Call"
            " ringlet.init() before MPI_Init (mpi4py: before `from mpi4py import MPI`), or start"
            " without -pmi-port"
        )
    try:
        placement = port_client(environ, timeout).placement
    except PMIError as exc:
        raise ConnectionError(f"ringlet.init() under mpiexec -pmi-port: {exc}") from None
    rank, size = placement.get("rank", ""), placement.get("size", "")
    if not (rank.isdigit() and size.isdigit()):
        raise ConnectionError(
            f"ringlet.init() under mpiexec -pmi-port: Hydra's initack at PMI_PORT gave no rank and"
            f" size ({placement})"
        )
    return {**environ, "PMI_RANK": rank, "PMI_SIZE": size}


def via_pmi(env: JobEnv, environ: Mapping[str, str]) -> JobEnv:
    """``env`` with the master rank 0 published through Hydra's key-value space, the job id its name.

    Every rank must call it (one barrier); raises TimeoutError naming the wait when a rank never
    does within ``env.timeout``, ValueError with rank 0's reason when rank 0 has no usable address.
    """
    try:
        if port_mode(environ):
            kvs, value = _exchange(port_client(environ, env.timeout), env, environ)
        else:
            client = PMIClient(socket.socket(fileno=os.dup(int(environ["PMI_FD"]))), env.timeout)
            try:
                kvs, value = _exchange(client, env, environ)
            finally:
                client.close()
    except PMIError as exc:
        raise TimeoutError(f"ringlet.init() under mpiexec: Hydra's PMI: {exc}") from None
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


def _exchange(client: PMIClient, env: JobEnv, environ: Mapping[str, str]) -> tuple[str, str]:
    """(key space name, rank 0's value): rank 0 puts it, every rank passes the barrier, gets it."""
    from ringlet.rendezvous.torchelastic import free_port

    client.ask("cmd=init pmi_version=1 pmi_subversion=1", "response_to_init")
    kvs = client.ask("cmd=get_my_kvsname", "my_kvsname")["kvsname"]
    if env.rank == 0:
        value = _rank0_value(environ, free_port).replace(" ", "+")
        client.ask(f"cmd=put kvsname={kvs} key={_KEY} value={value}", "put_result")
    try:
        client.ask("cmd=barrier_in", "barrier_out")
    except PMIError as exc:
        raise TimeoutError(
            f"ringlet.init() under mpiexec: rank {env.rank} waited for all {env.world_size}"
            f" ranks to call ringlet.init() ({exc}); did every rank start, and call it?"
        ) from None
    return kvs, client.ask(f"cmd=get kvsname={kvs} key={_KEY}", "get_result")["value"]

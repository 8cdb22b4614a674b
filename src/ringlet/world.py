"""``ringlet.init()``: find the job, meet the other ranks through the store, build the world communicator."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .auth import JobMismatchError
from .comm import WORLD_ID, Communicator
from .errors import AuthenticationError, RingletError
from .rendezvous import JobEnv, Store, StoreServer, resolve
from .rendezvous.arrival import abort, announce_ready, check_world_size, wait_for_peers, wait_ready
from .rendezvous.env import LAUNCHER_STORE_VARIABLE
from .rendezvous.launchers import parse_master
from .rendezvous.secret import LocalSecret, SecretError, is_local_address, refusal
from .rendezvous.store import OwnedPrefixStore
from .schedules import select
from .transport.tcp_connect import Listener

log = logging.getLogger("ringlet")
#: How long rank 0, which hosts the store, waits at close for the other ranks to close too.
CLOSE_WAIT = 10.0
#: The same wait after one of its communicators failed: a rank that died never closes.
FAILED_CLOSE_WAIT = 2.0


def _host_id() -> str:
    """Ranks with the same id share memory; a node group of ``ringlet run`` counts as its own host."""
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    group = os.environ.get("RINGLET_HOST_ID") or os.environ.get("RINGLET_NODE_RANK", "")
    return f"{socket.gethostname()}|{boot}|{group}"


def _local_address(master_host: str) -> str:
    """The address peers can reach this process at: RINGLET_HOST, else the route towards the master."""
    if host := os.environ.get("RINGLET_HOST"):
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_host, 9))  # no packet is sent; this only picks the outgoing interface
        addr: str = probe.getsockname()[0]
        return addr
    return "127.0.0.1"


@dataclass
class World:
    """What every communicator of this process shares: store, listener, secret, peer addresses."""

    rank: int
    size: int
    store: Any
    listener: Listener
    secret: bytes
    addresses: list[tuple[str, int]]
    hosts: list[str]
    job: str
    timeout: float
    server: Any = None
    deterministic: bool = False  # every reduction folds in rank order (RINGLET_DETERMINISTIC)
    forced: dict[str, str] = field(default_factory=dict)  # op -> algorithm (RINGLET_ALGO)
    store_in_launcher: bool = False  # served by `ringlet run`, not by rank 0: rank 0 may be lost
    comms: list[Communicator] = field(default_factory=list)
    closer: Any = None  # closes the whole world; called when the world communicator closes
    finalized: bool = False


_init_lock = threading.Lock()  # one init() at a time; guards _open_worlds
#: The open worlds of this process by (master host, store port, job id). A process may hold several
#: worlds (the torch backend starts one per default group, on a port of its own), but never two of
#: one job: a second init() of the same job would find its own store's port taken.
_open_worlds: dict[tuple[str, int, str], World] = {}


def _peer_key(secret: bytes, job_id: str) -> bytes:
    """The key of rank-to-rank handshakes: the secret bound to the job, so jobs never pair up."""
    return (
        hmac.new(secret, f"ringlet-peer-key\0{job_id}".encode(), hashlib.sha256)
        .hexdigest()
        .encode()
    )


def _local_secret(env: JobEnv) -> LocalSecret | None:
    """Where a secret is made and shared when none was given; None when one was (or one rank).

    Raises SecretError when the job spans hosts (or this process cannot tell that it does not).
    """
    if env.secret is not None or env.world_size == 1:
        return None
    one_host = env.local_size in (None, env.world_size) and is_local_address(env.master_host)
    if not one_host:
        raise refusal(env.source, env.world_size, env.local_size, env.master_host)
    return LocalSecret(f"{env.job_id}\0{env.master_host}:{env.store_port}")


def _serve_store(env: JobEnv, key: bytes, local: LocalSecret | None) -> StoreServer:
    """Rank 0: bind the store first, then publish a generated secret, then start serving."""
    bind = env.master_host if env.world_size > 1 else "127.0.0.1"
    server = StoreServer(bind, env.store_port, key, job=env.job_id)
    if local is not None:
        local.publish(key)
    server.start()
    return server


def _store_in_launcher(env: JobEnv) -> bool:
    """True when ``ringlet run`` serves the job's store itself (RINGLET_LAUNCHER_STORE=1) and this
    process meets the others there (not at a master of its own given to ``init``)."""
    master = os.environ.get("RINGLET_MASTER", "").strip()
    if os.environ.get(LAUNCHER_STORE_VARIABLE, "") != "1" or not master or env.world_size == 1:
        return False
    return parse_master(master, "RINGLET_MASTER") == (env.master_host, env.store_port)


def _join_store(
    env: JobEnv, host: str, port: int, key: bytes | None, local: LocalSecret | None
) -> tuple[Store, bytes]:
    """Connect to the store; with a generated secret, read it (again, if rank 0 replaced a stale one)."""
    if local is None:
        assert key is not None
        return Store(host, port, key, timeout=env.timeout, job=env.job_id), key
    deadline = time.monotonic() + env.timeout
    key = local.read(deadline) if key is None else key
    while True:
        try:
            return Store(host, port, key, timeout=env.timeout, job=env.job_id), key
        except JobMismatchError:
            raise
        except AuthenticationError as exc:
            # the file may be a crashed earlier job's; rank 0 replaces it when it starts
            try:
                key = local.read(deadline, previous=key)
            except SecretError as late:
                raise late from exc


#: Worlds this process joined through a store its launcher serves (which outlives them).
_launcher_worlds = 0


def _scoped(store: Store) -> Store | OwnedPrefixStore:
    """The store a world of this process uses: the launcher's store itself for its first world,
    a prefix of it for each later one (a second init() after finalize in one `ringlet run` job:
    every rank counts its worlds alike), so no world meets an earlier one's registrations."""
    global _launcher_worlds
    _launcher_worlds += 1
    return store if _launcher_worlds == 1 else OwnedPrefixStore(f"g{_launcher_worlds}", store)


def _claim_rank(store: Store | OwnedPrefixStore, env: JobEnv, value: bytes) -> None:
    """Register this rank once: a second process claiming the same rank is refused, not mixed in."""
    held = store.compare_set(f"w/peer/{env.rank}", b"", value)
    if held != value:
        raise RingletError(
            f"ringlet.init(): rank {env.rank} is already registered in the store at"
            f" {store.host}:{store.port} by another process ({held.decode(errors='replace')}); two"
            " jobs share this master port and secret (give each its own port, or a job id such as"
            " RINGLET_JOB_ID), or two processes of this job were given the same rank"
        )


def _deterministic_from_env() -> bool:
    """RINGLET_DETERMINISTIC as a bool; ValueError for a value that is neither on nor off."""
    flag = os.environ.get("RINGLET_DETERMINISTIC", "0").strip().lower()
    if flag not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"RINGLET_DETERMINISTIC={flag!r}: use 1 or 0")
    return flag in ("1", "true", "yes")


def _job_name(key: bytes, port: int) -> str:
    """The job's name in shm segment names: RINGLET_JOB_ID, else one derived from the secret."""
    return (
        os.environ.get("RINGLET_JOB_ID")
        or hashlib.sha256(key + str(port).encode()).hexdigest()[:12]
    )


def init(
    rank: int | None = None,
    world_size: int | None = None,
    master: str | None = None,
    *,
    timeout: float | None = None,
    secret: bytes | str | None = None,
    deterministic: bool | None = None,
) -> Communicator:
    """Join the job and return the world communicator.

    Reads, in order: the arguments; RINGLET_* (set by ``ringlet run``); torchrun's variables; SLURM;
    Open MPI / PMI. Rank 0 hosts the rendezvous store at ``master`` (under ``ringlet run`` the
    launcher does, RINGLET_LAUNCHER_STORE=1). ``deterministic`` (default:
    RINGLET_DETERMINISTIC=1) makes every reduction fold each element in rank order, so results are
    bit-identical whatever the transport, algorithm, size or arrival order; every rank must set it
    alike (a rank that differs meets a MismatchError).

    The secret: ``secret``, else RINGLET_SECRET, else the file RINGLET_SECRET_FILE; without any,
    a job on one host makes its own (rank 0 writes it to a private 0700 directory, the others read
    it) and a job across hosts is refused (see docs/errors.md, "Security model").

    One world per job and process: calling init() again for the same job (same master and job id)
    while its world is open raises RingletError ("already called"), like torch.distributed's
    "already initialized", before anything is bound or sent; after ``comm.close()`` (or the
    ``with`` block) it may be called again. Worlds of other masters (e.g. the torch backend's) may
    be open alongside.

    Where rank 0 serves the store, it returns only once every other rank has had its last
    answer from it, so a call right after init() that holds the GIL (mpi4py's MPI_Init) stalls
    no rank still in init().

    Raises ValueError naming what is missing when no source is complete or RINGLET_ALGO names
    no algorithm (before anything connects, so on every rank alike); SecretError when no
    secret can be had; JobMismatchError when the store belongs to another job;
    CollectiveTimeout/PeerError when the other ranks never come.
    """
    with _init_lock:
        if deterministic is None:
            deterministic = _deterministic_from_env()
        forced = select.forced(os.environ.get("RINGLET_ALGO", ""))  # a typo fails here
        env = resolve(rank, world_size, master, secret, timeout)
        key = (env.master_host, env.store_port, env.job_id)
        for stale in [k for k, w in _open_worlds.items() if w.finalized]:
            del _open_worlds[stale]
        if env.store_port and (open_world := _open_worlds.get(key)) is not None:
            raise RingletError(
                f"ringlet.init() was already called in this process for this job (master"
                f" {env.master_host}:{env.store_port}, rank {open_world.rank} of"
                f" {open_world.size}) and its world is still open; use the communicator it"
                " returned, or close it (comm.close()) before calling init() again"
            )
        comm = _join(env, deterministic, forced)
        if env.store_port:
            _open_worlds[key] = comm.world
        return comm


def _join(env: JobEnv, deterministic: bool, forced: dict[str, str]) -> Communicator:
    """Meet the other ranks through the store and build the world communicator."""
    local = _local_secret(env)
    key = env.secret
    if key is None and env.world_size == 1:
        key = os.urandom(32).hex().encode()  # nobody else joins; any private key will do
    server = None
    host = env.master_host if env.world_size > 1 else "127.0.0.1"
    port = env.store_port
    in_launcher = _store_in_launcher(env) and local is None
    if env.rank == 0 and not in_launcher:
        key = local.create() if local is not None else key
        assert key is not None
        server = _serve_store(env, key, local)
        port = server.port
    try:
        joined, key = _join_store(env, host, port, key, local)
    except BaseException:
        if server is not None:
            server.close()
        raise
    store: Store | OwnedPrefixStore = _scoped(joined) if in_launcher else joined
    peer_key = _peer_key(key, env.job_id)
    listener = Listener(_local_address(env.master_host), peer_key)
    try:
        check_world_size(store, env)  # a node started with another size fails here, in seconds
        _claim_rank(
            store,
            env,
            f"{listener.address[0]}:{listener.address[1]}|{_host_id()}".encode(),
        )
        addresses, hosts = [], []
        for text in wait_for_peers(store, env):  # names the ranks that never come
            addr, host_id = text.split("|", 1)
            h, p = addr.rsplit(":", 1)
            addresses.append((h, int(p)))
            hosts.append(host_id)
    except BaseException:
        listener.close()
        store.close()
        if server is not None:
            server.close()
        raise
    if local is not None and server is not None:
        local.remove(key)  # every rank has registered, so every rank has read it: no longer needed
    job = _job_name(key, port)
    world = World(
        env.rank,
        env.world_size,
        store,
        listener,
        peer_key,
        addresses,
        hosts,
        job,
        env.timeout,
        server,
        deterministic=deterministic,
        forced=forced,
        store_in_launcher=in_launcher,
    )
    try:
        comm = _world_communicator(world, env)
    except BaseException:
        world.listener.close()
        store.close()
        if server is not None:
            server.close()
        raise
    world.closer = lambda: finalize(world)
    atexit.register(finalize, world)
    return comm


def _world_communicator(world: World, env: JobEnv) -> Communicator:
    """The world communicator, then init()'s last step where rank 0 serves the store: the others
    say they need no more of it, and rank 0 returns once it has answered them all (so a call that
    holds the GIL right after init(), such as mpi4py's MPI_Init, cannot stall a rank in init())."""
    try:
        comm = Communicator(world, WORLD_ID, range(env.world_size))
    except Exception as exc:
        if world.size > 1:  # rank 0 would wait for this rank's announcement until the timeout
            abort(world.store, f"ringlet.init(): rank {world.rank} could not join: {exc}")
        raise
    if world.size == 1 or world.store_in_launcher:
        return comm  # the launcher serves the store: no rank's call can stall it
    try:
        if world.server is not None:
            wait_ready(world.server, world.store, env)
        else:
            announce_ready(world.store, env)
    except BaseException:
        comm.close()  # its closer is not set yet: this releases the communicator only
        raise
    return comm


def finalize(world: World) -> None:
    """Close every communicator of this process; rank 0 keeps the store up until the others closed."""
    if world.finalized:
        return
    world.finalized = True  # first: closing the world communicator calls finalize again
    for comm in list(world.comms):
        with contextlib.suppress(Exception):
            comm.close()
    failed = any(comm.failed for comm in world.comms)
    wait = FAILED_CLOSE_WAIT if failed else CLOSE_WAIT
    with contextlib.suppress(Exception), world.store.bounded(wait):  # a stalled rank 0 too
        count = world.store.add("w/closed", 1)
        end = time.monotonic() + wait
        while world.server is not None and count < world.size and time.monotonic() < end:
            time.sleep(0.02)
            count = world.store.add("w/closed", 0)
    world.listener.close()
    world.store.close()
    if world.server is not None:
        world.server.close()

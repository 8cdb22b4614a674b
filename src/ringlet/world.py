"""``ringlet.init()``: find the job, meet the other ranks through the store, build the world communicator."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import socket
import time

from .comm import WORLD_ID, Communicator
from .core import World
from .rendezvous import Store, StoreServer, resolve
from .transport.tcp import Listener

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


def _fallback_secret(source: str, env: dict[str, str]) -> bytes:
    """Without RINGLET_SECRET (torchrun, SLURM, mpirun), key the job by its id and say it is weak."""
    job = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or env.get("MASTER_PORT", "")
    log.warning(
        "ringlet: no RINGLET_SECRET set (started by %s); connections are authenticated with a "
        "key derived from the job id only. Export RINGLET_SECRET with the same random value "
        "on every rank to keep other users' processes out.",
        source,
    )
    return hashlib.sha256(f"ringlet-derived/{job}".encode()).hexdigest().encode()


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
    Open MPI / PMI. Rank 0 hosts the rendezvous store at ``master``. ``deterministic`` (default:
    RINGLET_DETERMINISTIC=1) makes every reduction fold each element in rank order, so results are
    bit-identical whatever the transport, algorithm, size or arrival order; every rank must set it
    alike (a rank that differs meets a MismatchError). Raises ValueError naming what is missing
    when no source is complete; CollectiveTimeout/PeerError when the other ranks never come.
    """
    if deterministic is None:
        flag = os.environ.get("RINGLET_DETERMINISTIC", "0").strip().lower()
        if flag not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"RINGLET_DETERMINISTIC={flag!r}: use 1 or 0")
        deterministic = flag in ("1", "true", "yes")
    env = resolve(rank, world_size, master, secret, timeout)
    if env.secret is None and env.world_size == 1:
        key = os.urandom(32).hex().encode()  # nobody else joins; any private key will do
    else:
        key = env.secret or _fallback_secret(env.source, dict(os.environ))
    server = None
    port = env.store_port
    if env.rank == 0:
        bind = env.master_host if env.world_size > 1 else "127.0.0.1"
        server = StoreServer(bind, port, key)
        server.start()
        port = server.port
    store = Store(
        env.master_host if env.world_size > 1 else "127.0.0.1", port, key, timeout=env.timeout
    )
    listener = Listener(_local_address(env.master_host), key)
    store.set(
        f"w/peer/{env.rank}", f"{listener.address[0]}:{listener.address[1]}|{_host_id()}".encode()
    )
    addresses, hosts = [], []
    for r in range(env.world_size):
        text = store.get(f"w/peer/{r}", timeout=env.timeout).decode()
        addr, host = text.split("|", 1)
        h, p = addr.rsplit(":", 1)
        addresses.append((h, int(p)))
        hosts.append(host)
    job = (
        os.environ.get("RINGLET_JOB_ID")
        or hashlib.sha256(key + str(port).encode()).hexdigest()[:12]
    )
    world = World(
        env.rank,
        env.world_size,
        store,
        listener,
        key,
        addresses,
        hosts,
        job,
        env.timeout,
        server,
        deterministic=deterministic,
    )
    comm = Communicator(world, WORLD_ID, range(env.world_size))
    world.closer = lambda: finalize(world)
    atexit.register(finalize, world)
    return comm


def finalize(world: World) -> None:
    """Close every communicator of this process; rank 0 keeps the store up until the others closed."""
    if world.finalized:
        return
    world.finalized = True  # first: closing the world communicator calls finalize again
    for comm in list(world.comms):
        with contextlib.suppress(Exception):
            comm.close()
    with contextlib.suppress(Exception):
        count = world.store.add("w/closed", 1)
        failed = any(comm._broken is not None for comm in world.comms)
        end = time.monotonic() + (FAILED_CLOSE_WAIT if failed else CLOSE_WAIT)
        while world.server is not None and count < world.size and time.monotonic() < end:
            time.sleep(0.02)
            count = world.store.add("w/closed", 0)
    world.listener.close()
    world.store.close()
    if world.server is not None:
        world.server.close()

"""The ranks' meeting at start-up, where a misconfigured job fails in seconds, saying why and where.

Before a rank registers, it checks its world size against the first registered rank's (a node
started with another ``-n``, ``--nnodes`` or WORLD_SIZE would otherwise wait for ranks that never
come, or take another node's rank numbers). While it waits for the others, it watches for a
rank that found the job misconfigured (``w/abort``), and when the time is up it names the ranks
that never arrived and the hosts of those that did.

At the end of init() every other rank tells the store it is done with it (``w/ready/<rank>``),
and the rank that hosts the store returns only once those answers are sent: a call right after
init() that holds the GIL there (mpi4py's MPI_Init, a long C extension call) would otherwise stop
the store's threads while the others still wait on them.
"""

from __future__ import annotations

import socket
import time

from ringlet.errors import CollectiveTimeout, RingletError
from ringlet.rendezvous.env import JobEnv
from ringlet.rendezvous.server import StoreServer
from ringlet.rendezvous.store import KeyValueStore

ABORT_KEY = "w/abort"
SHAPE_KEY = "w/shape"
READY_PREFIX = "w/ready/"  # + rank: that rank needs nothing more from the store in init()
_POLL = 0.25  # how often a waiting rank looks for an abort
_LINGER = 0.5  # a rank that aborts the start keeps the store up so long, for the others to see why


class ConfigurationError(RingletError):
    """The ranks of a job were started with different views of it (world size, ranks per node)."""


def _where(env: JobEnv) -> str:
    return f"rank {env.rank} on {socket.gethostname()} (from {env.source})"


def check_world_size(store: KeyValueStore, env: JobEnv) -> None:
    """Agree on the world size with the first rank that registered; else abort the start."""
    mine = f"{env.world_size}|{_where(env)}".encode()
    held = store.compare_set(SHAPE_KEY, b"", mine)
    size, first = held.decode(errors="replace").split("|", 1)
    if int(size) == env.world_size:
        return
    local = f", {env.local_size} on this node" if env.local_size is not None else ""
    message = (
        f"ringlet.init(): the nodes disagree on the world size: {_where(env)} was started as"
        f" one of {env.world_size} ranks{local}, but {first} as one of {size}. Start every node"
        " with the same numbers (ringlet run's -n/--nproc-per-node and --nnodes, torchrun's"
        " --nproc-per-node and --nnodes, WORLD_SIZE, srun -n)"
    )
    abort(store, message)
    raise ConfigurationError(message)


def abort(store: KeyValueStore, message: str) -> None:
    """Tell every waiting rank why the start failed, and give them a moment to read it."""
    try:
        store.set(ABORT_KEY, message.encode())
        time.sleep(_LINGER)
    except (OSError, RingletError):
        pass  # the store is gone already; the others see that instead


def wait_for_peers(store: KeyValueStore, env: JobEnv) -> list[str]:
    """Every rank's registration, in rank order, once all arrived.

    Raises ConfigurationError when a rank aborted the start, CollectiveTimeout naming the ranks
    that have not arrived (and the hosts of those that did) after ``env.timeout`` seconds.
    """
    keys = [f"w/peer/{r}" for r in range(env.world_size)]
    deadline = time.monotonic() + env.timeout
    missing = list(keys)
    while missing:
        try:
            store.wait(missing, timeout=min(_POLL, max(0.0, deadline - time.monotonic())))
            break
        except TimeoutError:
            pass
        if (why := store.try_get(ABORT_KEY)) is not None:
            raise ConfigurationError(f"{why.decode(errors='replace')} (seen by {_where(env)})")
        missing = [key for key in missing if store.try_get(key) is None]
        if missing and time.monotonic() >= deadline:
            error = _never_arrived(store, env, [int(key.rsplit("/", 1)[1]) for key in missing])
            abort(store, str(error))  # the first to give up tells the others (rank 0 hosts it)
            raise error
    return [store.get(key, timeout=env.timeout).decode() for key in keys]


def _never_arrived(store: KeyValueStore, env: JobEnv, missing: list[int]) -> CollectiveTimeout:
    hosts = sorted(
        {
            value.decode(errors="replace").split("|", 2)[1].split("|")[0]
            for r in range(env.world_size)
            if r not in missing and (value := store.try_get(f"w/peer/{r}")) is not None
        }
    )
    shown = ", ".join(map(str, missing[:16])) + (", ..." if len(missing) > 16 else "")
    return CollectiveTimeout(
        f"ringlet.init(): {len(missing)} of {env.world_size} ranks never arrived at the store"
        f" within {env.timeout:g} s: rank(s) {shown}; {env.world_size - len(missing)} did, from"
        f" host(s) {', '.join(hosts) or '-'} (seen by {_where(env)}). Check that every rank was"
        " started, with the same master address and port, world size and job id",
        tuple(missing),
    )


def announce_ready(store: KeyValueStore, env: JobEnv) -> None:
    """A rank that does not host the store: its last request of init() (see :func:`wait_ready`)."""
    store.set(f"{READY_PREFIX}{env.rank}", b"1")


def wait_ready(server: StoreServer, store: KeyValueStore, env: JobEnv) -> None:
    """The rank that hosts the store: return once every other rank announced it is ready and the
    store sent every answer it decided, so no rank still waits on this process's store threads.

    Raises ConfigurationError when a rank aborted the start, CollectiveTimeout naming the ranks
    that never got ready within ``env.timeout`` seconds.
    """
    keys = [f"{READY_PREFIX}{r}" for r in range(env.world_size) if r != env.rank]
    deadline = time.monotonic() + env.timeout
    while not server.settle(keys, _POLL):
        if (why := store.try_get(ABORT_KEY)) is not None:
            raise ConfigurationError(f"{why.decode(errors='replace')} (seen by {_where(env)})")
        missing = [int(key.rsplit("/", 1)[1]) for key in keys if store.try_get(key) is None]
        if missing and time.monotonic() >= deadline:
            raise CollectiveTimeout(
                f"ringlet.init(): rank(s) {', '.join(map(str, missing))} of {env.world_size}"
                f" registered but did not finish joining within {env.timeout:g} s (seen by"
                f" {_where(env)})",
                tuple(missing),
            )

"""Replacements: a restarted process takes a lost rank's place in the running job.

After a shrink the job runs on fewer ranks; this module brings it back to size. ``rejoin()`` runs in
the replacement process: it asks, through the rendezvous store, to be admitted in place of a lost
rank and waits. ``grow(comm)`` runs on the members (``Elastic`` calls it between steps): the
communicator's rank 0 admits the waiting requests and every member builds the larger
communicator, with the same id on every rank. ``init_or_rejoin()`` picks ``init()`` or
``rejoin()`` from the launcher's restart count. It lives apart from ``survive`` because admitting
ranks is its own protocol (tickets in the store, an answer per ticket), separate from the
agreement that shrinks.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import numpy as np

from .comm import WORLD_ID, Communicator
from .errors import RingletError
from .rendezvous.env import RESTART_VARIABLE

__all__ = ["RESTART_VARIABLE", "grow", "init_or_rejoin", "pending", "rejoin"]

#: Communicators made by rejoin() whose state is still due, with the global rank that sends it.
_joined: weakref.WeakKeyDictionary[Communicator, int] = weakref.WeakKeyDictionary()


def rejoin(
    rank: int | None = None,
    world_size: int | None = None,
    master: str | None = None,
    *,
    secret: bytes | str | None = None,
    timeout: float | None = None,
) -> Communicator:
    """In a replacement process: join the running job in place of a lost rank.

    Takes what ``ringlet.init()`` takes (the lost rank's number, the job's master and secret, e.g.
    from the same RINGLET_* variables). Asks to be admitted, and waits until the members call
    :func:`grow` (``Elastic`` does at every step); returns the grown communicator. Raises
    RingletError when the job refuses it: a rank that is still alive, or rank 0 unless the store
    lives in the launcher (``ringlet run``) rather than in rank 0's process.
    """
    import atexit
    import os

    from .rendezvous import resolve
    from .transport.tcp_connect import Listener
    from .world import (
        World,
        _deterministic_from_env,
        _host_id,
        _job_name,
        _join_store,
        _local_address,
        _peer_key,
        _store_in_launcher,
        finalize,
    )

    env = resolve(rank, world_size, master, secret, timeout)
    if env.secret is None:
        raise RingletError(
            "rejoin(): a replacement needs the job's secret (RINGLET_SECRET or "
            "RINGLET_SECRET_FILE, as the other ranks were given)"
        )
    if env.rank == 0 and not _store_in_launcher(env):
        raise RingletError(
            "rejoin(): rank 0 hosts the store and cannot be replaced (under `ringlet run` the"
            " launcher hosts it, and rank 0 can)"
        )
    store, key = _join_store(env, env.master_host, env.store_port, env.secret, None)
    peer_key = _peer_key(key, env.job_id)
    listener = Listener(_local_address(env.master_host), peer_key)
    ticket = store.add("join/count", 1)
    request = {"rank": env.rank, "addr": list(listener.address), "host": _host_id()}
    store.set(f"join/{ticket}", json.dumps(request).encode())
    try:
        answer = json.loads(store.get(f"join/{ticket}/admitted", timeout=env.timeout))
    except BaseException:
        listener.close()
        store.close()
        raise
    if "error" in answer:
        listener.close()
        store.close()
        raise RingletError(f"rejoin(): the job refused rank {env.rank}: {answer['error']}")
    from .schedules import select

    world = World(
        env.rank,
        env.world_size,
        store,
        listener,
        peer_key,
        [tuple(a) for a in answer["addresses"]],
        answer["hosts"],
        _job_name(key, env.store_port),
        env.timeout,
        deterministic=_deterministic_from_env(),
        forced=select.forced(os.environ.get("RINGLET_ALGO", "")),
        store_in_launcher=_store_in_launcher(env),
    )
    world.closer = lambda: finalize(world)
    atexit.register(finalize, world)
    comm = Communicator(world, answer["comm"], answer["members"])
    _joined[comm] = answer["root"]
    return comm


def init_or_rejoin(**kwargs: Any) -> Communicator:
    """``ringlet.init(**kwargs)`` in a rank's first process; :func:`rejoin` in a restarted one
    (RINGLET_RESTART_COUNT, or torchrun's TORCHELASTIC_RESTART_COUNT, above 0)."""
    import os

    from .world import init

    count = os.environ.get(RESTART_VARIABLE) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if count.strip() not in ("", "0"):
        keep = ("rank", "world_size", "master", "secret", "timeout")
        return rejoin(**{k: v for k, v in kwargs.items() if k in keep})
    return init(**kwargs)


def pending(comm: Communicator) -> int:
    """How many replacements :func:`grow` would take up now: those that asked to rejoin and
    wrote their request (a ticket drawn but not yet filled in waits for a later grow)."""
    store = comm.world.store
    seen, count = int(store.add("join/seen", 0)), int(store.add("join/count", 0))
    ready = 0
    while seen + ready < count and store.try_get(f"join/{seen + ready + 1}") is not None:
        ready += 1
    return ready


def grow(comm: Communicator) -> Communicator:
    """Admit the replacements waiting to rejoin (see :func:`rejoin`); every member calls it.

    Returns a new communicator of the members and the replacements (ordered by global rank), or
    ``comm`` itself when none is waiting. Rank 0 of ``comm`` decides. Global rank 0 can be
    replaced only when the store lives in the launcher (``World.store_in_launcher``).
    """
    world, store = comm.world, comm.world.store
    joiners: list[dict[str, Any]] = []
    lowest = 0 if world.store_in_launcher else 1  # rank 0 may host the store: never replaced
    if comm.rank == 0:
        seen = int(store.add("join/seen", 0))
        for ticket in range(seen + 1, int(store.add("join/count", 0)) + 1):
            raw = store.try_get(f"join/{ticket}")
            if raw is None:
                break  # registering still: next time
            store.add("join/seen", 1)
            request = {**json.loads(raw), "ticket": ticket}
            g = request["rank"]
            known = lowest <= g < world.size
            if g in comm.members or g in {j["rank"] for j in joiners} or not known:
                why = f"rank {g} is alive" if known else f"no rank {g} to replace"
                store.set(f"join/{ticket}/admitted", json.dumps({"error": why}).encode())
            else:
                joiners.append(request)
    flag = np.array([len(joiners)], np.int64)
    comm.broadcast(flag, root=0)
    if not flag[0]:
        return comm
    joiners = comm.broadcast_object(joiners, root=0)
    for j in joiners:
        world.addresses[j["rank"]] = tuple(j["addr"])
        world.hosts[j["rank"]] = j["host"]
    members = sorted(comm.members + [j["rank"] for j in joiners])
    raw_id = f"{comm.id}/grow/{joiners[0]['ticket']}".encode()
    new_id = int.from_bytes(hashlib.blake2b(raw_id, digest_size=8).digest(), "little") >> 2
    if comm.rank == 0:
        answer = {
            "comm": new_id,
            "members": members,
            "addresses": [list(a) for a in world.addresses],
            "hosts": world.hosts,
            "root": comm.members[0],  # a member: it hands the replacements the state
        }
        for j in joiners:
            store.set(f"join/{j['ticket']}/admitted", json.dumps(answer).encode())
    new = Communicator(world, new_id, members)
    if comm.id != WORLD_ID:
        comm.close()
    return new

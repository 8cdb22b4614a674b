"""Where ``ringlet.init()`` learns this process's rank, the world size, the master and the secret.

Sources, first complete one wins: explicit arguments; ``ringlet run``'s RINGLET_* variables;
torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (also what Kubeflow's PyTorchJob sets); SLURM's
srun variables; Open MPI / MPICH (PMI) variables; a Kubernetes JobSet's. Explicit arguments may
be partial: what they leave out is completed from the first environment source that, together
with them, is complete.

Where a launcher names no master, it is derived alike on every rank: SLURM's first host of the
step and a port from the job and step ids; under mpiexec with every rank on this host, 127.0.0.1
and a port from the job id (Open MPI's PMIx namespace, or the Hydra proxy that started the ranks);
under MPICH's Hydra across hosts, rank 0 publishes its address through Hydra's PMI
(:mod:`ringlet.rendezvous.pmi`), where ``mpiexec -pmi-port`` also gives the rank and size; under
Open MPI's mpirun across hosts, mpirun's host, named in the PMIx namespace, where rank 0 must run.
Under torchrun, rank 0 publishes its store's address in torch's store on MASTER_PORT (the
agent's, or one rank 0 serves for torch too), keyed by the restart count and the world size, so a
restarted attempt, or a round after a node joined, never meets a previous round's store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ringlet.auth import secret_from_str
from ringlet.rendezvous.launchers import (  # noqa: F401 (some only re-exported)
    _HOW_TO_SET,
    _SOURCES,
    MPIRUN_HOST_WAIT,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    _Found,
    check_mpirun_host,
    derived_port,
    job_id,
    parse_master,
    reach_mpirun_host,
)
from ringlet.rendezvous.pmi import port_mode, via_pmi, with_port_placement
from ringlet.rendezvous.secret import read_secret_file

DEFAULT_TIMEOUT = 300.0
#: Set by ``ringlet run --max-restarts`` in a restarted rank's environment (1, 2, …); a rank that
#: sees it rejoins the running job (ringlet.survive.init_or_rejoin) instead of starting one.
RESTART_VARIABLE = "RINGLET_RESTART_COUNT"
#: Set to 1 by ``ringlet run`` on every rank: the store at RINGLET_MASTER is served by the launcher
#: (node 0's), not by rank 0, so rank 0 only joins it and can be lost (and replaced) like any rank.
LAUNCHER_STORE_VARIABLE = "RINGLET_LAUNCHER_STORE"


@dataclass(frozen=True)
class JobEnv:
    """Everything ``init()`` needs to find the other ranks."""

    rank: int
    world_size: int
    master_host: str
    master_port: int
    local_rank: int | None
    local_size: int | None
    secret: bytes | None
    timeout: float
    source: str  # "arguments" | "ringlet" | "torchrun" | "slurm" | "mpi" | "jobset"
    store_port_offset: int = 0  # 1 under torchrun when its agent's own store owns MASTER_PORT
    job_id: str = ""  # the launcher's id of this job (see job_id()); "" when it gives none
    secret_file: str | None = None  # where the secret came from, when RINGLET_SECRET_FILE gave it

    @property
    def store_port(self) -> int:
        """The port ringlet's rendezvous store listens on."""
        return self.master_port + self.store_port_offset if self.master_port else 0


def resolve(
    rank: int | None = None,
    world_size: int | None = None,
    master: str | None = None,
    secret: bytes | str | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    agent_store: bool | None = None,
) -> JobEnv:
    """Work out this process's place in the job from the arguments and the environment.

    Under torchrun (TORCHELASTIC_USE_AGENT_STORE set, with a run id when False) and
    ``agent_store`` (default: when reading os.environ), rank 0 publishes its store's address in
    torch's store on MASTER_PORT and the others read it (:mod:`ringlet.rendezvous.torchelastic`);
    without torch importable our store takes MASTER_PORT + 1. Across hosts under MPICH's Hydra,
    rank 0 publishes it through Hydra's PMI (:mod:`ringlet.rendezvous.pmi`); under ``mpiexec
    -pmi-port``, which exports no rank or size, both are asked of PMI_PORT first.

    Raises ValueError naming, for each source tried, the variables that were missing, when no
    source is complete, or when a value is malformed or out of range; TypeError for non-int
    ``rank``/``world_size``; ConnectionError naming PMI_PORT when Hydra's proxy does not answer.
    """
    if agent_store is None:
        agent_store = environ is None
    environ = os.environ if environ is None else environ
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"ringlet.init(): {name} must be an int, got {type(value).__name__}")
    given = _Found("arguments", rank=rank, world_size=world_size)
    if master is not None:
        given.host, given.port = parse_master(master, "master")
    if agent_store and None in (rank, world_size) and port_mode(environ):
        environ = with_port_placement(environ, _resolve_timeout(timeout, environ))
    found = _first_complete(given, environ)
    if found is None:
        raise ValueError(_nothing_complete_message(given, environ))
    assert found.rank is not None and found.world_size is not None
    assert found.host is not None and found.port is not None
    _check_ranges(found)
    env = JobEnv(
        rank=found.rank,
        world_size=found.world_size,
        master_host=found.host,
        master_port=found.port,
        local_rank=found.local_rank,
        local_size=found.local_size,
        secret=_resolve_secret(secret, environ),
        timeout=_resolve_timeout(timeout, environ),
        source=found.source,
        store_port_offset=found.port_offset,
        job_id=job_id(environ) or found.job,
        secret_file=_secret_file_used(secret, environ),
    )
    return _ask_launcher(env, environ, found) if agent_store else env


def _ask_launcher(env: JobEnv, environ: Mapping[str, str], found: _Found) -> JobEnv:
    """``env`` with the master the launcher's own store gives: Hydra's PMI across hosts, or torch
    elastic's store under torchrun. At mpirun's host (Open MPI), a rank waits here, briefly, for
    rank 0's store, so that a rank 0 placed elsewhere is said instead of waited out."""
    if found.via_pmi:
        env = via_pmi(env, environ)
    if found.mpirun_host and env.rank != 0 and env.secret is not None:
        wait = min(MPIRUN_HOST_WAIT, env.timeout / 2)
        reach_mpirun_host(env.master_host, env.store_port, env.secret, env.job_id, wait)
    if env.store_port_offset and env.world_size > 1:
        from ringlet.rendezvous.torchelastic import via_agent_store

        env = via_agent_store(env, environ)
    return env


def _complete(found: _Found) -> _Found | None:
    """``found`` if it names rank, size and master; a single process needs no master."""
    if found.world_size == 1:
        found.rank = 0 if found.rank is None else found.rank
        if found.host is None or found.port is None:
            found.host, found.port, found.port_offset = "127.0.0.1", 0, 0
    if None in (found.rank, found.world_size, found.host, found.port):
        return None
    return found


def _first_complete(given: _Found, environ: Mapping[str, str]) -> _Found | None:
    if _complete(given) is not None:
        return _with_local_placement(given, environ)
    for source in _SOURCES:
        found = source(environ)
        merged = _Found(
            found.source,
            rank=found.rank if given.rank is None else given.rank,
            world_size=found.world_size if given.world_size is None else given.world_size,
            host=found.host if given.host is None else given.host,
            port=found.port if given.port is None else given.port,
            port_offset=found.port_offset if given.port is None else 0,
            job=found.job,
            via_pmi=found.via_pmi and given.host is None and given.port is None,
            mpirun_host=found.mpirun_host if given.host is None else "",
        )
        # Local placement is only trusted when the arguments do not move this process elsewhere.
        if (merged.rank, merged.world_size) == (found.rank, found.world_size):
            merged.local_rank, merged.local_size = found.local_rank, found.local_size
        if _complete(merged) is not None:
            if merged.mpirun_host:  # rank 0 must serve the store there, at a name that resolves
                check_mpirun_host(environ, merged.mpirun_host, merged.rank)
            return merged
    return None


def _with_local_placement(given: _Found, environ: Mapping[str, str]) -> _Found:
    """Complete arguments: take local rank and size from a source that agrees on rank and size."""
    for source in _SOURCES:
        try:
            found = source(environ)
        except ValueError:  # a malformed variable of a source the arguments override
            continue
        if (found.rank, found.world_size) == (given.rank, given.world_size):
            given.local_rank, given.local_size = found.local_rank, found.local_size
            break
    return given


def _nothing_complete_message(given: _Found, environ: Mapping[str, str]) -> str:
    lines = ["ringlet.init(): cannot tell this process's rank and world size."]
    if (given.rank, given.world_size, given.host) != (None, None, None):
        master = None if given.host is None else f"{given.host}:{given.port}"
        lines.append(
            f"  arguments: rank={given.rank}, world_size={given.world_size}, master={master}"
        )
    for source in _SOURCES:
        found = source(environ)
        lines.append(
            f"  {found.source}: {', '.join(found.missing)} not set ({_HOW_TO_SET[found.source]})"
        )
    lines.append(
        "Set RINGLET_RANK/RINGLET_WORLD_SIZE/RINGLET_MASTER (ringlet run sets them), or torchrun's"
        " RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or run under srun or mpiexec (Open MPI's"
        " mpirun across hosts on rank 0's host, or with MASTER_ADDR), or pass rank=, world_size=,"
        " master='host:port'"
        " (world_size=1 needs no master)."
    )
    if "ray" in sys.modules:  # Ray gives its workers none of these: ringlet.ray meets through Ray
        lines.append(
            "Inside Ray (an actor, a Ray Train worker) call ringlet.ray.init() instead: rank, size,"
            " master and secret then come through Ray (Ray Train's context gives the first two)."
        )
    return "\n".join(lines)


def _check_ranges(found: _Found) -> None:
    rank, size = found.rank, found.world_size
    assert rank is not None and size is not None and found.port is not None
    where = f"(from {found.source})"
    if size < 1:
        raise ValueError(f"ringlet.init(): world_size={size} {where}; it must be at least 1")
    if not 0 <= rank < size:
        raise ValueError(f"ringlet.init(): rank={rank} {where} is not in 0..{size - 1}")
    if not 0 <= found.port + found.port_offset <= 65535 or (size > 1 and found.port == 0):
        raise ValueError(
            f"ringlet.init(): master port {found.port} {where} is not a usable port (1-65535)"
        )
    if found.local_size is not None and found.local_size < 1:
        raise ValueError(f"ringlet.init(): local size {found.local_size} {where} is below 1")
    if found.local_rank is not None and not (0 <= found.local_rank < (found.local_size or size)):
        raise ValueError(
            f"ringlet.init(): local rank {found.local_rank} {where} is out of range"
            f" (local size {found.local_size or size})"
        )


def _secret_file_used(secret: bytes | str | None, environ: Mapping[str, str]) -> str | None:
    if secret is not None or environ.get("RINGLET_SECRET") is not None:
        return None
    return environ.get("RINGLET_SECRET_FILE", "").strip() or None


def _resolve_secret(secret: bytes | str | None, environ: Mapping[str, str]) -> bytes | None:
    """The argument, else RINGLET_SECRET, else the contents of RINGLET_SECRET_FILE, else None."""
    if secret is None:
        text = environ.get("RINGLET_SECRET")
        if text is None:
            path = environ.get("RINGLET_SECRET_FILE", "").strip()
            return read_secret_file(path) if path else None
        return secret_from_str(text)
    if isinstance(secret, str):
        return secret_from_str(secret)
    if isinstance(secret, (bytes, bytearray)):
        if not secret:
            raise ValueError("ringlet.init(): secret is empty")
        return bytes(secret)
    raise TypeError(f"ringlet.init(): secret must be bytes or str, got {type(secret).__name__}")


def _resolve_timeout(timeout: float | None, environ: Mapping[str, str]) -> float:
    what = "timeout"
    if timeout is None:
        text = environ.get("RINGLET_TIMEOUT", "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        what = f"RINGLET_TIMEOUT={text!r}"
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"ringlet.init(): {what} is not a number of seconds") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"ringlet.init(): timeout must be a number, got {type(timeout).__name__}")
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"ringlet.init(): {what} must be a positive finite number of seconds")
    return float(timeout)

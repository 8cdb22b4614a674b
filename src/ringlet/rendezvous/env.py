"""Where ``ringlet.init()`` learns this process's rank, the world size, the master and the secret.

Sources, first complete one wins: explicit arguments; ``ringlet run``'s RINGLET_* variables;
torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (also what Kubeflow's PyTorchJob sets); SLURM's
srun variables; Open MPI / MPICH (PMI) variables; a Kubernetes JobSet's. Explicit arguments may
be partial: what they leave out is completed from the first environment source that, together
with them, is complete.

Where a launcher names no master, it is derived alike on every rank: SLURM's first host of the
step and a port from the job and step ids; under mpiexec with every rank on this host, 127.0.0.1
and a port from the job id (Open MPI's PMIx namespace, or the Hydra proxy that started the ranks).
Under torchrun, rank 0 publishes its store's address in the agent's own store, keyed by the
restart count, so a restarted attempt never meets the previous attempt's store.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ringlet.auth import secret_from_str
from ringlet.rendezvous.mpi import hydra_job
from ringlet.rendezvous.secret import read_secret_file
from ringlet.rendezvous.slurm import expand_nodelist, expand_tasks_per_node, first_host

DEFAULT_TIMEOUT = 300.0
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # job-derived store ports land in 20000-29999
_STEPS_PER_JOB = 16  # concurrent steps of one SLURM job get distinct derived ports


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


@dataclass
class _Found:
    """What one source says; None where it says nothing. ``missing`` lists unset variables."""

    source: str
    rank: int | None = None
    world_size: int | None = None
    host: str | None = None
    port: int | None = None
    local_rank: int | None = None
    local_size: int | None = None
    port_offset: int = 0
    missing: tuple[str, ...] = ()
    job: str = ""  # a job id the source derived itself (Hydra's proxy), used when none is set


def _int_var(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that is set, as an int; ValueError if it is not one."""
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} is not an integer") from None
    return None


def parse_master(text: str, what: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6addr]:port``) into host and port; ValueError names ``what``."""
    match = re.fullmatch(r"\s*(?:\[([^\]]+)\]|([^:\s]+)):(\d+)\s*", text)
    if match is None:
        raise ValueError(f"{what}={text!r} is not host:port (e.g. node01:29500 or [::1]:29500)")
    port = int(match.group(3))
    if port > 65535:
        raise ValueError(f"{what}={text!r}: port {port} is not in 0-65535")
    return match.group(1) or match.group(2), port


def _master_vars(environ: Mapping[str, str], found: _Found, fallback: bool) -> None:
    """Fill host/port from MASTER_ADDR/MASTER_PORT, or RINGLET_MASTER when ``fallback``."""
    if environ.get("MASTER_ADDR", "").strip():
        found.host = environ["MASTER_ADDR"].strip()
    found.port = _int_var(environ, "MASTER_PORT")
    if fallback and (found.host is None or found.port is None) and environ.get("RINGLET_MASTER"):
        found.host, found.port = parse_master(environ["RINGLET_MASTER"], "RINGLET_MASTER")


def _from_ringlet(environ: Mapping[str, str]) -> _Found:
    found = _Found(
        "ringlet",
        rank=_int_var(environ, "RINGLET_RANK"),
        world_size=_int_var(environ, "RINGLET_WORLD_SIZE"),
        local_rank=_int_var(environ, "RINGLET_LOCAL_RANK"),
        local_size=_int_var(environ, "RINGLET_LOCAL_SIZE"),
    )
    if environ.get("RINGLET_MASTER", "").strip():
        found.host, found.port = parse_master(environ["RINGLET_MASTER"], "RINGLET_MASTER")
    found.missing = _unset(environ, "RINGLET_RANK", "RINGLET_WORLD_SIZE", "RINGLET_MASTER")
    return found


def _from_torchrun(environ: Mapping[str, str]) -> _Found:
    found = _Found(
        "torchrun",
        rank=_int_var(environ, "RANK"),
        world_size=_int_var(environ, "WORLD_SIZE"),
        local_rank=_int_var(environ, "LOCAL_RANK"),
        local_size=_int_var(environ, "LOCAL_WORLD_SIZE"),
        # torchrun's agent already serves its own TCPStore on MASTER_PORT: ours takes the next
        port_offset=1 if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0,
    )
    _master_vars(environ, found, fallback=False)
    found.missing = _unset(environ, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return found


def derived_port(job: str) -> int:
    """A store port every rank derives alike from a job id: 20000-29999."""
    number = int(job) if job.isdigit() else zlib.crc32(job.encode())
    return SLURM_PORT_BASE + number % SLURM_PORT_SPAN


def _slurm_port(job: str, step: str) -> int:
    """The port of SLURM job ``job``, step ``step``: consecutive jobs and a job's steps differ."""
    if job.isdigit():
        step_number = int(step) % _STEPS_PER_JOB if step.isdigit() else 0
        return derived_port(str(int(job) * _STEPS_PER_JOB + step_number))
    return derived_port(f"{job}.{step}")


def _slurm_node_index(environ: Mapping[str, str], nodelist: str, nodes: int) -> int | None:
    """This node's place in the step: by SLURMD_NODENAME in the node list, else SLURM_NODEID."""
    if nodes == 1:
        return 0
    name = environ.get("SLURMD_NODENAME", "").strip()
    if name and nodelist:
        for index, host in enumerate(expand_nodelist(nodelist)):
            if host == name:
                return index
            if index >= nodes:
                break
    return _int_var(environ, "SLURM_NODEID")


def _from_slurm(environ: Mapping[str, str]) -> _Found:
    found = _Found(
        "slurm",
        rank=_int_var(environ, "SLURM_PROCID"),
        world_size=_int_var(environ, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"),
        local_rank=_int_var(environ, "SLURM_LOCALID"),
    )
    nodelist = next(
        (
            environ[name].strip()
            for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
            if environ.get(name, "").strip()
        ),
        "",
    )
    tasks_per_node = (
        environ.get("SLURM_STEP_TASKS_PER_NODE", "").strip()
        or environ.get("SLURM_TASKS_PER_NODE", "").strip()
    )
    if tasks_per_node:
        counts = expand_tasks_per_node(tasks_per_node)
        node = _slurm_node_index(environ, nodelist, len(counts))
        found.local_size = counts[node] if node is not None and 0 <= node < len(counts) else None
    if nodelist:
        found.host = first_host(nodelist)  # srun's block distribution puts task 0 there
    if environ.get("MASTER_ADDR", "").strip():  # a batch script may pin the master itself
        found.host = environ["MASTER_ADDR"].strip()
    found.port = _int_var(environ, "MASTER_PORT", "RINGLET_PORT")
    job = environ.get("SLURM_JOB_ID", "").strip()
    if found.port is None and job:
        found.port = _slurm_port(job, environ.get("SLURM_STEP_ID", "").strip())
    missing = list(_unset(environ, "SLURM_PROCID", "SLURM_NTASKS"))
    if found.host is None:
        missing.append("SLURM_STEP_NODELIST (or MASTER_ADDR)")
    if found.port is None:
        missing.append("SLURM_JOB_ID (or MASTER_PORT)")
    found.missing = tuple(missing)
    return found


def _from_mpi(environ: Mapping[str, str]) -> _Found:
    found = _Found(
        "mpi",
        rank=_int_var(environ, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"),
        world_size=_int_var(environ, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
        local_rank=_int_var(environ, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
        local_size=_int_var(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"),
    )
    _master_vars(environ, found, fallback=True)
    one_host = found.world_size is not None and found.local_size == found.world_size
    if found.host is None and one_host:
        found.host = "127.0.0.1"  # every rank is here: rank 0 too
    if found.port is None and found.host is not None:
        job = job_id(environ)
        if not job and one_host and environ.get("PMI_RANK", "").strip():
            job = found.job = hydra_job()  # alike on this host only: hence one_host
        if job:
            found.port = derived_port(job)
    missing = []
    if found.rank is None:
        missing.append("OMPI_COMM_WORLD_RANK or PMI_RANK")
    if found.world_size is None:
        missing.append("OMPI_COMM_WORLD_SIZE or PMI_SIZE")
    if found.host is None or found.port is None:
        spread = ""
        if found.local_size is not None and found.world_size is not None and not one_host:
            spread = f"; the ranks span hosts, {found.local_size} of {found.world_size} here"
        missing.append(f"MASTER_ADDR+MASTER_PORT or RINGLET_MASTER{spread}")
    found.missing = tuple(missing)
    return found


def _from_jobset(environ: Mapping[str, str]) -> _Found:
    """Kubernetes JobSet: rank from the Indexed Job's JOB_COMPLETION_INDEX; the master is pod 0-0.

    JobSet names pods ``<jobset>-<replicated job>-<job index>-<pod index>`` under the subdomain
    ``<jobset>``; the world size is the template's WORLD_SIZE. With several Jobs in the replicated
    job (JOB_INDEX > 0) a pod's rank is not in its variables: set RANK there.
    """
    found = _Found(
        "jobset",
        world_size=_int_var(environ, "WORLD_SIZE", "RINGLET_WORLD_SIZE"),
        local_rank=0,
        local_size=1,  # one rank per pod; a pod that starts several runs torchrun or ringlet run
    )
    name = environ.get("JOBSET_NAME", "").strip()
    replicated = environ.get("REPLICATED_JOB_NAME", "").strip()
    job_index = _int_var(environ, "JOB_INDEX") or 0
    index = _int_var(environ, "JOB_COMPLETION_INDEX")
    found.rank = _int_var(environ, "RANK")
    if found.rank is None and job_index == 0:
        found.rank = index
    found.host = environ.get("MASTER_ADDR", "").strip() or None
    if found.host is None and name and replicated:
        found.host = f"{name}-{replicated}-0-0.{name}"
    found.port = _int_var(environ, "MASTER_PORT")
    if found.port is None and name:
        found.port = derived_port(f"jobset:{name}")
    missing = list(_unset(environ, "JOBSET_NAME", "REPLICATED_JOB_NAME", "WORLD_SIZE"))
    if found.rank is None:
        missing.append("JOB_COMPLETION_INDEX" if job_index == 0 else "RANK (JOB_INDEX > 0)")
    found.missing = tuple(missing)
    return found


_SOURCES = (_from_ringlet, _from_torchrun, _from_slurm, _from_mpi, _from_jobset)
_HOW_TO_SET = {
    "ringlet": "ringlet run sets them",
    "torchrun": "torchrun sets them",
    "slurm": "srun sets them",
    "mpi": "mpiexec sets the ranks; across hosts export the master yourself",
    "jobset": "a Kubernetes JobSet sets them, with WORLD_SIZE in the pod template",
}


def _unset(environ: Mapping[str, str], *names: str) -> tuple[str, ...]:
    return tuple(name for name in names if not environ.get(name, "").strip())


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

    Under torchrun with its agent store (TORCHELASTIC_USE_AGENT_STORE=True) and ``agent_store``
    (default: when reading os.environ), rank 0 publishes its store's address there and the others
    read it (:mod:`ringlet.rendezvous.torchelastic`); otherwise our store takes MASTER_PORT + 1.

    Raises ValueError naming, for each source tried, the variables that were missing, when no
    source is complete, or when a value is malformed or out of range; TypeError for non-int
    ``rank``/``world_size``.
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
    if agent_store and env.store_port_offset and env.world_size > 1:
        from ringlet.rendezvous.torchelastic import via_agent_store

        env = via_agent_store(env, environ)
    return env


def job_id(environ: Mapping[str, str]) -> str:
    """The id the launcher gave this job, alike on every rank and different for another job.

    RINGLET_JOB_ID (``ringlet run``), else torchrun's TORCHELASTIC_RUN_ID, else SLURM's job and
    step (``SLURM_JOB_ID.SLURM_STEP_ID``), else Open MPI / PMIx's namespace; "" when none is set.
    It goes into every handshake, so ranks of two jobs never join each other's store or peers.
    Under torch elastic the restart count is part of it: a restarted attempt is another job.
    """
    if text := environ.get("RINGLET_JOB_ID", "").strip():
        return text
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    attempt = f"@attempt{restart}" if restart not in ("", "0") else ""
    run_id = environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if run_id and run_id != "none":  # torchrun's default --rdzv-id is the same for every job
        return f"torchrun:{run_id}{attempt}"
    if slurm := environ.get("SLURM_JOB_ID", "").strip():
        return f"slurm:{slurm}.{environ.get('SLURM_STEP_ID', '').strip()}{attempt}"
    for name in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"):
        if text := environ.get(name, "").strip():
            return f"mpi:{text}{attempt}"
    if text := environ.get("JOBSET_NAME", "").strip():
        return f"jobset:{text}{attempt}"
    return f"torchrun{attempt}" if attempt else ""


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
        )
        # Local placement is only trusted when the arguments do not move this process elsewhere.
        if (merged.rank, merged.world_size) == (found.rank, found.world_size):
            merged.local_rank, merged.local_size = found.local_rank, found.local_size
        if _complete(merged) is not None:
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
        " RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or run under srun or mpiexec (across hosts with"
        " MASTER_ADDR/MASTER_PORT), or pass rank=, world_size=, master='host:port' (world_size=1 needs no"
        " master)."
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

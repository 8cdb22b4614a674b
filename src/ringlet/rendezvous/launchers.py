"""The launchers' environments: what each one's variables say about this process's place in the job.

One reader per launcher — ``ringlet run`` (RINGLET_*), torchrun (RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT, also Kubeflow's PyTorchJob), SLURM's srun, Open MPI / MPICH (PMI), a Kubernetes
JobSet — each returning a ``_Found``: the rank, size, master and local placement it gives, and the
variables it lacks. Each also derives what its launcher leaves out (a master from SLURM's node list,
a port from the job id). These readers are apart from ``ringlet.rendezvous.env``, which owns
``JobEnv`` and ``resolve()``: it decides which source wins and checks the result, while this module
knows only how each launcher spells things.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ringlet.errors import CollectiveTimeout
from ringlet.rendezvous.mpi import hydra_job
from ringlet.rendezvous.pmi import PENDING_HOST, can_ask
from ringlet.rendezvous.slurm import expand_nodelist, expand_tasks_per_node, first_host
from ringlet.rendezvous.store import Store

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # job-derived store ports land in 20000-29999
#: At most this long (and half the timeout) a rank waits for rank 0's store at mpirun's host.
MPIRUN_HOST_WAIT = 30.0
_STEPS_PER_JOB = 16  # concurrent steps of one SLURM job get distinct derived ports


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
    via_pmi: bool = False  # the master is to be asked of Hydra's PMI (ringlet.rendezvous.pmi)
    mpirun_host: str = ""  # the master is Open MPI's mpirun's host, from PMIX_NAMESPACE


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
        # MASTER_PORT is torch's (its agent's store, or rank 0's for init_process_group): under
        # torch elastic ours is published there (rendezvous.torchelastic), else it takes the next
        port_offset=1 if _torch_elastic(environ) else 0,
    )
    _master_vars(environ, found, fallback=False)
    found.missing = _unset(environ, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return found


def _torch_elastic(environ: Mapping[str, str]) -> bool:
    """True when torch elastic's agent (torchrun) started this process: with its own store, or
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as node changes need) a run id and rank 0's store."""
    use_agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE", "")
    return use_agent_store == "True" or (
        use_agent_store == "False" and bool(environ.get("TORCHELASTIC_RUN_ID", "").strip())
    )


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
    if found.host is None and (host := mpirun_host(environ)) is not None:
        found.host = found.mpirun_host = host  # if used, env checks it (check_mpirun_host)
    if found.port is None and found.host is not None:
        job = job_id(environ)
        if not job and one_host and environ.get("PMI_RANK", "").strip():
            job = found.job = hydra_job()  # alike on this host only: hence one_host
        if job:
            found.port = derived_port(job)
    if found.host is None and found.port is None and not one_host and can_ask(environ):
        # across hosts under Hydra: rank 0 publishes its address in the job's PMI key space
        found.host, found.port, found.via_pmi = PENDING_HOST, 1, True
    found.missing = _mpi_missing(environ, found, one_host)
    return found


#: PRRTE names a job ``<tool>-<its host>-<its pid>@<job>``: prterun under Open MPI's mpirun, prte for a
#: DVM (src/mca/plm/base/plm_base_jobid.c); the host is gethostname() without its domain (unless
#: prte_keep_fqdn_hostnames) and may itself hold dashes, so the pid is the last dash's.
_PRRTE_NAMESPACE = re.compile(r"(?:prterun|prte)-(.+)-\d+@\d+")
#: The daemon serving a rank's PMIx: ``<namespace>@0.<daemon>;<uri>``; daemon 0 is mpirun itself.
_PMIX_SERVER = re.compile(r"[^;]*@0\.(\d+);")


def mpirun_host(environ: Mapping[str, str]) -> str | None:
    """The host Open MPI's mpirun (PRRTE) runs on, named in PMIX_NAMESPACE; None when not PRRTE's."""
    match = _PRRTE_NAMESPACE.fullmatch(environ.get("PMIX_NAMESPACE", "").strip())
    return match.group(1) if match else None


def on_mpirun_host(environ: Mapping[str, str], host: str) -> bool:
    """True when this process runs where mpirun does: its PMIx server is mpirun's own (daemon 0),
    else, without PMIX_SERVER_URI*, its hostname (domain dropped, as PRRTE does) is ``host``."""
    for name in ("PMIX_SERVER_URI41", "PMIX_SERVER_URI4", "PMIX_SERVER_URI3", "PMIX_SERVER_URI2"):
        if match := _PMIX_SERVER.match(environ.get(name, "")):
            return match.group(1) == "0"
    here = environ.get("PMIX_HOSTNAME", "").strip() or socket.gethostname()
    return host in (here, here.split(".")[0])


def _mpirun_master(host: str) -> str:
    """How every error about the master taken from PMIX_NAMESPACE begins."""
    return (
        f"ringlet.init(): under Open MPI's mpirun the master defaults to mpirun's host {host!r}"
        " (from PMIX_NAMESPACE; Open MPI exports no master address)"
    )


_SET_MASTER = "set MASTER_ADDR to rank 0's host (and pass it on: mpirun -x MASTER_ADDR)"


def check_mpirun_host(environ: Mapping[str, str], host: str, rank: int | None) -> None:
    """Raise ValueError unless mpirun's ``host`` can be the master: it resolves here to an address
    other hosts can reach, and rank 0, which serves the store there, runs on it."""
    here = socket.gethostname()
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError as exc:
        raise ValueError(
            f"{_mpirun_master(host)}, which does not resolve on {here} ({exc}): {_SET_MASTER}"
        ) from None
    if all(ipaddress.ip_address(str(address)).is_loopback for address in addresses):
        raise ValueError(
            f"{_mpirun_master(host)}, which resolves to a loopback address ({addresses[0]}) on"
            f" {here}, out of the other hosts' reach: {_SET_MASTER}"
        )
    if rank == 0 and not on_mpirun_host(environ, host):
        raise ValueError(
            f"{_mpirun_master(host)}, but rank 0, which serves the store there, runs on {here}:"
            f" {_SET_MASTER}, or start mpirun on rank 0's host (by default the first of --host)"
        )


def reach_mpirun_host(host: str, port: int, secret: bytes, job: str, wait: float) -> None:
    """Return once rank 0's store at mpirun's host answers (an authenticated connection, closed
    again: a bare probe would be logged as a failed handshake); after ``wait`` s CollectiveTimeout
    naming the cause, where a rank 0 placed elsewhere would leave this rank waiting out the timeout.
    """
    try:
        Store(host, port, secret, timeout=wait, job=job).close()
    except CollectiveTimeout as exc:
        last = str(exc.__cause__ or exc)
        raise CollectiveTimeout(
            f"{_mpirun_master(host)}, but no store answered at {host}:{port} within {wait:g} s"
            f" ({last}): rank 0 is not there or not reachable from {socket.gethostname()}:"
            f" {_SET_MASTER}",
            missing=(0,),
        ) from None


def _mpi_missing(environ: Mapping[str, str], found: _Found, one_host: bool) -> tuple[str, ...]:
    """What _from_mpi lacks, for the error: rank and size (or -pmi-port's PMI_ID), master."""
    missing = []
    if environ.get("PMI_PORT", "").strip() and None in (found.rank, found.world_size):
        # mpiexec -pmi-port exports no rank or size: ringlet.init() asks PMI_PORT for them
        pmi_id = environ.get("PMI_ID", "").strip()
        missing.append(
            "PMI_RANK+PMI_SIZE (under mpiexec -pmi-port ringlet.init() asks PMI_PORT)"
            if pmi_id
            else "PMI_ID (mpiexec -pmi-port sets it beside PMI_PORT)"
        )
    else:
        if found.rank is None:
            missing.append("OMPI_COMM_WORLD_RANK or PMI_RANK")
        if found.world_size is None:
            missing.append("OMPI_COMM_WORLD_SIZE or PMI_SIZE")
    if found.host is None or found.port is None:
        spread = ""
        if found.local_size is not None and found.world_size is not None and not one_host:
            spread = f"; the ranks span hosts, {found.local_size} of {found.world_size} here"
        missing.append(
            f"MASTER_ADDR+MASTER_PORT or RINGLET_MASTER{spread}, no Hydra PMI_FD or PMI_PORT,"
            " no mpirun host in PMIX_NAMESPACE (prterun-<host>-<pid>@<job>)"
        )
    return tuple(missing)


def _from_jobset(environ: Mapping[str, str]) -> _Found:
    """Kubernetes JobSet: rank from the Indexed Job's JOB_COMPLETION_INDEX; the master is pod 0-0.

    JobSet names pods ``<jobset>-<replicated job>-<job index>-<pod index>`` under the subdomain
    ``<jobset>``; the world size is the template's WORLD_SIZE. With several Jobs (JOB_INDEX > 0)
    the rank is ``job * pods_per_job + JOB_COMPLETION_INDEX``, from the labels JobSet puts on each
    pod, passed in by the pod template's downward API: JOB_GLOBAL_INDEX and GLOBAL_REPLICAS
    (``jobset.sigs.k8s.io/job-global-index``, ``global-replicas``: every Job of every replicated
    job), else JOB_INDEX and REPLICATED_JOB_REPLICAS (``job-index``, ``replicatedjob-replicas``);
    pods_per_job = WORLD_SIZE / that many Jobs. RANK, if set, wins.
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
    found.rank = _int_var(environ, "RANK")
    missing = list(_unset(environ, "JOBSET_NAME", "REPLICATED_JOB_NAME", "WORLD_SIZE"))
    if found.rank is None:
        found.rank, why = _jobset_rank(environ, job_index, found.world_size)
        if why:
            missing.append(why)
    several = _int_var(environ, "GLOBAL_REPLICAS") or 1
    one_replicated_job = several <= (_int_var(environ, "REPLICATED_JOB_REPLICAS") or 1)
    found.host = environ.get("MASTER_ADDR", "").strip() or None
    if found.host is None and name and replicated and one_replicated_job:
        found.host = f"{name}-{replicated}-0-0.{name}"
    if found.host is None and not one_replicated_job:
        missing.append("MASTER_ADDR (several replicated jobs: which one holds rank 0?)")
    found.port = _int_var(environ, "MASTER_PORT")
    if found.port is None and name:
        found.port = derived_port(f"jobset:{name}")
    found.missing = tuple(missing)
    return found


def _jobset_rank(
    environ: Mapping[str, str], job_index: int, world_size: int | None
) -> tuple[int | None, str]:
    """This pod's rank among every Job's pods, or None and the variable that would give it."""
    index = _int_var(environ, "JOB_COMPLETION_INDEX")
    if index is None:
        return None, "JOB_COMPLETION_INDEX"
    job, jobs = _int_var(environ, "JOB_GLOBAL_INDEX"), _int_var(environ, "GLOBAL_REPLICAS")
    if job is None or jobs is None:
        job, jobs = job_index, _int_var(environ, "REPLICATED_JOB_REPLICAS")
    if job == 0:
        return index, ""
    if jobs is None:
        return (
            None,
            "RANK (JOB_INDEX > 0) or REPLICATED_JOB_REPLICAS (or JOB_GLOBAL_INDEX+GLOBAL_REPLICAS)",
        )
    if world_size is None or jobs < 1 or world_size % jobs:
        return None, f"RANK (WORLD_SIZE={world_size} is not {jobs} Jobs of equal size)"
    return job * (world_size // jobs) + index, ""


_SOURCES = (_from_ringlet, _from_torchrun, _from_slurm, _from_mpi, _from_jobset)
_HOW_TO_SET = {
    "ringlet": "ringlet run sets them",
    "torchrun": "torchrun sets them",
    "slurm": "srun sets them",
    "mpi": "mpiexec sets them; across hosts Hydra's PMI or Open MPI's namespace gives the master",
    "jobset": "a Kubernetes JobSet sets them, with WORLD_SIZE in the pod template",
}


def _unset(environ: Mapping[str, str], *names: str) -> tuple[str, ...]:
    return tuple(name for name in names if not environ.get(name, "").strip())


def torch_round(environ: Mapping[str, str]) -> str:
    """What tells this round of a torch elastic job from the previous ones, alike on every node.

    Without a shared agent store, the round's MASTER_ADDR:MASTER_PORT (rank 0's agent picks a free
    port each round); with one, only the restart count, which is each agent's own: a node that
    joined later counts fewer (torch's issue 135712), but joining needs the former anyway.
    "" for the first attempt with a shared store, or when torch elastic did not start us.
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "False" and _torch_elastic(environ):
        return f"@{environ.get('MASTER_ADDR', '').strip()}:{environ.get('MASTER_PORT', '').strip()}"
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    return f"@attempt{restart}" if restart not in ("", "0") else ""


def job_id(environ: Mapping[str, str]) -> str:
    """The id the launcher gave this job, alike on every rank and different for another job.

    RINGLET_JOB_ID (``ringlet run``), else torchrun's TORCHELASTIC_RUN_ID, else SLURM's job and
    step (``SLURM_JOB_ID.SLURM_STEP_ID``), else Open MPI / PMIx's namespace; "" when none is set.
    It goes into every handshake, so ranks of two jobs never join each other's store or peers.
    Under torch elastic the round is part of it (torch_round()): a restarted attempt is another job.
    """
    if text := environ.get("RINGLET_JOB_ID", "").strip():
        return text
    attempt = torch_round(environ)
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

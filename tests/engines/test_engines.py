"""Jobs started by the engines people already run, with nothing exported by hand.

Each test starts real processes the way that engine starts them: the real ``mpiexec`` of the mpich
wheel, a real single-node SLURM (slurmctld + slurmd + munged, started here; skipped where it is not
installed or we are not root), the real ``torchrun``, and Kubernetes' variables exactly as the
PyTorchJob operator sets them. Every rank checks collectives against NumPy and prints one RESULT
line; a failure shows every rank's output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LAUNCHER_PREFIXES = ("RINGLET_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_",
                     "SLURM", "OMPI_", "PMI", "MPI_LOCAL", "HYDI_", "TORCHELASTIC", "PET_")  # fmt: skip

# One rank: init() from whatever the engine set, three collectives checked against NumPy.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import ringlet
    from ringlet.rendezvous import resolve

    comm = ringlet.init()
    r, n = comm.rank, comm.size
    table = np.random.default_rng(7).integers(-1000, 1000, size=(n, 257))  # alike on every rank
    x = table[r].copy()
    comm.all_reduce(x)
    assert (x == table.sum(axis=0)).all(), "all_reduce"
    got = comm.all_gather(np.full(3, r, dtype=np.int64))
    assert (got == np.repeat(np.arange(n), 3)).all(), "all_gather"
    b = np.arange(5.0) if r == n - 1 else np.zeros(5)
    comm.broadcast(b, root=n - 1)
    assert (b == np.arange(5.0)).all(), "broadcast"
    source = resolve(agent_store=False).source
    comm.close()
    print("RESULT " + json.dumps({"rank": r, "size": n, "source": source}), flush=True)
""")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's job variables (an engine sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(extra)
    return env


def results(
    proc: subprocess.CompletedProcess[str], n: int, source: str | None
) -> list[dict[str, object]]:
    """Every rank's RESULT, checked to be ranks 0..n-1 of n (from ``source``); else every output."""
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    # mpiexec forwards each rank's output in chunks: two ranks' lines may share one line
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(int(line["rank"]) for line in lines) == list(range(n)), report
    assert all(line["size"] == n for line in lines), report
    assert source is None or all(line["source"] == source for line in lines), report
    return lines


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- mpiexec (MPICH's Hydra, from the mpich wheel) ----------------------------------------------


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec here (pip install mpich)")
    return found


def test_mpiexec_with_nothing_exported(script: Path) -> None:
    proc = subprocess.run([mpiexec(), "-n", "4", sys.executable, str(script)], env=clean_env(),
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    results(proc, 4, "mpi")


@pytest.mark.parametrize("n", [2, 3])
def test_mpiexec_pmi_port_with_nothing_exported(tmp_path: Path, n: int) -> None:
    """``mpiexec -pmi-port`` exports no PMI_RANK, PMI_SIZE or PMI_FD, only PMI_PORT and PMI_ID:
    rank and size come from Hydra's proxy over PMI_PORT (PMI-1's initack)."""
    checks = Path(__file__).with_name("check_collectives.py")
    proc = subprocess.run([mpiexec(), "-pmi-port", "-n", str(n), sys.executable, str(checks)],
                          env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    assert all(line["pmi_port"] for line in results(proc, n, None)), proc.stdout


# ringlet and MPI (mpi4py) in one process under -pmi-port, MPI_Init after ringlet.init() or before
WITH_MPI = textwrap.dedent("""
    import os, sys
    import numpy as np
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    import ringlet

    if sys.argv[1] == "mpi-first":
        MPI.Init()
    comm = ringlet.init()
    if sys.argv[1] == "ringlet-first":
        MPI.Init()  # at once: it holds the GIL, and init() returned only once no rank needs ours
    x = np.arange(6.0) * (comm.rank + 1)
    comm.all_reduce(x)
    assert (x == np.arange(6.0) * sum(range(1, comm.size + 1))).all(), "all_reduce"
    world = MPI.COMM_WORLD
    assert (world.Get_rank(), world.Get_size()) == (comm.rank, comm.size)
    assert world.allreduce(comm.rank) == sum(range(comm.size)), "MPI's allreduce"
    comm.close()
    print("RESULT ok", flush=True)
""")


@pytest.mark.parametrize("order", ["ringlet-first", "mpi-first"])
def test_mpiexec_pmi_port_with_mpi4py(tmp_path: Path, order: str) -> None:
    """ringlet.init() then MPI_Init works under -pmi-port; MPI_Init first is refused at once, with
    what to do (ringlet's PMI connection would take the place of MPI's at Hydra's proxy)."""
    pytest.importorskip("mpi4py")
    script = tmp_path / "with_mpi.py"
    script.write_text(WITH_MPI)
    proc = subprocess.run([mpiexec(), "-pmi-port", "-n", "2", sys.executable, str(script), order],
                          env=clean_env(), capture_output=True, text=True, timeout=90)  # fmt: skip
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    if order == "ringlet-first":
        assert proc.returncode == 0 and proc.stdout.count("RESULT ok") == 2, report
    else:
        assert proc.returncode != 0, report
        assert "MPI_Init came first" in proc.stderr and "before MPI_Init" in proc.stderr, report


# -- srun on a real single-node SLURM ----------------------------------------------------------


SLURM_CONF = """\
ClusterName=ringlet
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _slurm_missing() -> str:
    if os.geteuid() != 0:
        return "a private SLURM needs root (slurmd runs jobs as their user)"
    for tool in ("munged", "slurmctld", "slurmd", "srun", "sinfo"):
        if shutil.which(tool, path=f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}") is None:
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    if not os.path.exists("/etc/munge/munge.key"):
        return "no /etc/munge/munge.key (the munge package makes one)"
    return ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node SLURM of our own (own munged socket, own ports, own state): srun's environment."""
    if reason := _slurm_missing():
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (base / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        host=host, munge_socket=base / "munge.socket", ctld_port=free_port(),
        slurmd_port=free_port(), dir=base, cpus=os.cpu_count() or 1,
    ))  # fmt: skip
    env = clean_env(SLURM_CONF=str(conf), PATH=f"/usr/sbin:/usr/bin:{os.environ['PATH']}")
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        daemons.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={base / 'munge.socket'}",
             f"--pid-file={base / 'munged.pid'}", f"--log-file={base / 'munged.log'}",
             f"--seed-file={base / 'munged.seed'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        deadline = time.monotonic() + 15
        while not (base / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))  # fmt: skip
        state = ""
        while time.monotonic() < deadline + 30:
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                   text=True, timeout=10)  # fmt: skip
            state = sinfo.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.2)
        else:
            logs = "\n".join(p.read_text()[-2000:] for p in base.glob("*.log"))
            pytest.fail(f"SLURM did not come up (node state {state!r}):\n{logs}")
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def test_srun_with_nothing_exported(slurm: dict[str, str], script: Path) -> None:
    proc = subprocess.run(["srun", "-n", "3", "--overcommit", sys.executable, str(script)],
                          env=slurm, capture_output=True, text=True, timeout=120)  # fmt: skip
    results(proc, 3, "slurm")


# -- torchrun (torch elastic: the agent's store, restarts) -------------------------------------


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("torch")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# -- ringlet beside torch's gloo, under torchrun and under ringlet run -------------------------

BESIDE_GLOO = textwrap.dedent("""
    import json
    import numpy as np
    import torch
    import torch.distributed as dist
    import ringlet

    comm = ringlet.init()
    dist.init_process_group("gloo")  # env://: MASTER_ADDR/MASTER_PORT are torch's
    assert (dist.get_rank(), dist.get_world_size()) == (comm.rank, comm.size)
    t = torch.full((4,), float(comm.rank + 1))
    dist.all_reduce(t)
    x = np.full(4, float(comm.rank + 1))
    comm.all_reduce(x)
    expected = comm.size * (comm.size + 1) / 2
    assert t.tolist() == x.tolist() == [expected] * 4, (t, x)
    dist.destroy_process_group()
    comm.close()
    print("RESULT " + json.dumps({"rank": comm.rank, "size": comm.size, "source": "both"}))
""")


def test_torchrun_restart_never_meets_the_previous_attempts_store(tmp_path: Path) -> None:
    """Attempt 0 loses rank 1 after init(); attempt 1 must find its own store, not attempt 0's
    (whose address is still in the agent's store), and then runs ringlet beside gloo."""
    path = tmp_path / "flaky.py"
    path.write_text(textwrap.dedent("""
        import os, sys
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            import ringlet
            comm = ringlet.init()
            if comm.rank == 1:
                os._exit(3)  # dies with its world open; rank 0 then fails too
            comm.barrier()
    """) + BESIDE_GLOO)  # fmt: skip
    proc = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                    "--monitor-interval", "0.1", str(path))  # fmt: skip
    results(proc, 2, "both")


def test_ringlet_and_gloo_side_by_side_under_ringlet_run(tmp_path: Path) -> None:
    """MASTER_ADDR/MASTER_PORT are torch's under `ringlet run` as under torchrun."""
    pytest.importorskip("torch")
    path = tmp_path / "beside.py"
    path.write_text(BESIDE_GLOO)
    proc = subprocess.run([sys.executable, "-m", "ringlet", "run", "--nproc-per-node", "2",
                           str(path)], env=clean_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    results(proc, 2, "both")


# -- Kubernetes: Kubeflow's PyTorchJob / TrainJob ----------------------------------------------


def test_kubeflow_pytorchjob_variables(script: Path) -> None:
    """Each pod of a PyTorchJob gets MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK from the operator
    (and here RINGLET_SECRET from a Kubernetes Secret: pods are separate hosts)."""
    port = free_port()
    pods = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=clean_env(MASTER_ADDR="localhost", MASTER_PORT=str(port), WORLD_SIZE="2",
                          RANK=str(rank), PYTHONUNBUFFERED="0",
                          RINGLET_SECRET="from-a-kubernetes-secret-0123456789"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    outputs = [pod.communicate(timeout=90) for pod in pods]
    merged = subprocess.CompletedProcess(
        "pods", max(p.returncode for p in pods), "".join(o for o, _ in outputs),
        "".join(e for _, e in outputs),
    )  # fmt: skip
    results(merged, 2, "torchrun")


@pytest.mark.parametrize(("jobs", "pods"), [(1, 2), (2, 2)], ids=["one-job", "two-jobs"])
def test_kubernetes_jobset_variables(script: Path, jobs: int, pods: int) -> None:
    """Pods of a JobSet's replicated job: JOBSET_NAME, REPLICATED_JOB_NAME, JOB_INDEX and the
    Indexed Job's JOB_COMPLETION_INDEX, WORLD_SIZE from the pod template; with several Jobs also
    REPLICATED_JOB_REPLICAS (the pod's ``jobset.sigs.k8s.io/replicatedjob-replicas`` label), and
    no RANK: pod i of Job j is rank j * pods + i. The master would be pod 0-0's DNS name (a unit
    test checks it); here, where no cluster DNS exists, MASTER_ADDR."""
    name = f"ringlet-{free_port()}"  # the port is derived from it, so one per test run
    processes = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=clean_env(JOBSET_NAME=name, REPLICATED_JOB_NAME="trainer",
                          REPLICATED_JOB_REPLICAS=str(jobs), JOB_INDEX=str(job),
                          JOB_COMPLETION_INDEX=str(index), WORLD_SIZE=str(jobs * pods),
                          MASTER_ADDR="127.0.0.1", RINGLET_SECRET="a-kubernetes-secret-0123456789"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for job in reversed(range(jobs)) for index in range(pods)  # Job 1's pods may come first
    ]  # fmt: skip
    outputs = [pod.communicate(timeout=90) for pod in processes]
    merged = subprocess.CompletedProcess(
        "pods", max(p.returncode for p in processes), "".join(o for o, _ in outputs),
        "".join(e for _, e in outputs),
    )  # fmt: skip
    results(merged, jobs * pods, "jobset")

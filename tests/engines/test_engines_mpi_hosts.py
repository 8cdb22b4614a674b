"""The real ``mpiexec`` (MPICH's Hydra, from the mpich wheel) across two simulated hosts.

Two network namespaces (tests/netns.py: own address, hostname, /dev/shm) stand for two machines.
Hydra starts its proxy on the far host through its ssh launcher; ``-launcher-exec`` points it at a
stand-in for ssh that enters that host's namespaces (nsenter) instead of logging in, so mpiexec,
its proxies and the ranks talk over the bridge exactly as across machines. Nothing but the secret
is exported (MASTER_ADDR/MASTER_PORT never are): rank 0's address comes from Hydra's PMI.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_mpi_after_init import SCRIPT as WITH_MPI

import netns

pytestmark = pytest.mark.multihost

CHECKS = Path(__file__).with_name("check_collectives.py")  # one rank: collectives vs NumPy


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.Hosts]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    if shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("no mpiexec next to this Python (pip install mpich)")
    with netns.Hosts(2) as made:
        yield made


def fake_ssh(hosts: netns.Hosts, path: Path) -> Path:
    """An executable Hydra calls as ``<it> -x <host> <command>``: runs the command on that host."""
    lines = []
    for h in hosts.hosts:
        enter = " ".join(hosts.command(h.index, ["sh", "-c"]))
        lines.append(f'    {h.address}) exec {enter} "$*" ;;\n')
    cases = "".join(lines)
    path.write_text(
        '#!/bin/sh\n[ "$1" = -x ] && shift\nhost="$1"; shift\n'
        f'case "$host" in\n{cases}    *) echo "no simulated host $host" >&2; exit 255 ;;\nesac\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def mpiexec_argv(
    hosts: netns.Hosts, tmp_path: Path, slots: tuple[int, int], *options: str
) -> list[str]:
    """``mpiexec [options] -hosts h0:a,h1:b -n a+b python check_collectives.py``, from host 0."""
    spec = ",".join(f"{hosts.address(h)}:{n}" for h, n in enumerate(slots))
    return [shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec", *options,
            "-launcher", "ssh", "-launcher-exec", str(fake_ssh(hosts, tmp_path / "ssh")),
            "-hosts", spec, "-n", str(sum(slots)), sys.executable, str(CHECKS)]  # fmt: skip


def mpiexec(
    hosts: netns.Hosts,
    tmp_path: Path,
    slots: tuple[int, int],
    extra: dict[str, str],
    *options: str,
) -> subprocess.CompletedProcess[str]:
    argv = mpiexec_argv(hosts, tmp_path, slots, *options)
    return hosts.run(0, argv, timeout=120, env=netns.clean_env(extra), cwd=str(tmp_path))


def results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    return sorted(lines, key=lambda line: int(str(line["rank"])))


@pytest.mark.parametrize("options", [(), ("-pmi-port",)], ids=["PMI_FD", "PMI_PORT"])
@pytest.mark.parametrize("slots", [(2, 2), (1, 2)], ids=["2+2", "1+2"])
def test_mpiexec_across_hosts_with_only_the_secret_exported(
    hosts: netns.Hosts, tmp_path: Path, slots: tuple[int, int], options: tuple[str, ...]
) -> None:
    """Under -pmi-port Hydra exports no rank or size either: both come over PMI_PORT."""
    proc = mpiexec(hosts, tmp_path, slots, {"RINGLET_SECRET": secrets.token_hex(16)}, *options)
    lines = results(proc)
    n = sum(slots)
    expected = [hosts.hosts[0].hostname] * slots[0] + [hosts.hosts[1].hostname] * slots[1]
    assert [line["rank"] for line in lines] == list(range(n)), proc.stdout
    assert [line["host"] for line in lines] == expected, proc.stdout
    assert all(line["size"] == n for line in lines), proc.stdout
    assert all(line["pmi_port"] == bool(options) for line in lines), proc.stdout


@pytest.mark.parametrize("order", ["ringlet-first", "mpi-first"])
def test_mpi4py_across_hosts_in_either_order(
    hosts: netns.Hosts, tmp_path: Path, order: str
) -> None:
    """MPI in the same process over PMI_FD, MPI_Init at once after init() or before it. Waiting
    with a timeout made ringlet's duplicate of PMI_FD non-blocking, a flag MPI's shares: MPI's
    PMI_Init failed after it, MPI_Finalize's PMI barrier before it; close now restores it."""
    pytest.importorskip("mpi4py")
    script = tmp_path / "with_mpi.py"
    script.write_text(WITH_MPI)
    argv = [*mpiexec_argv(hosts, tmp_path, (2, 2))[:-1], str(script), order]
    extra = {"RINGLET_SECRET": secrets.token_hex(16), "RINGLET_TIMEOUT": "30"}
    proc = hosts.run(0, argv, timeout=120, env=netns.clean_env(extra), cwd=str(tmp_path))
    assert [line["rank"] for line in results(proc)] == [0, 1, 2, 3], proc.stdout


def test_mpiexec_across_hosts_without_a_secret_says_so(hosts: netns.Hosts, tmp_path: Path) -> None:
    """Hydra's key space relays the address, never a secret: every rank refuses, naming why."""
    proc = mpiexec(hosts, tmp_path, (1, 1), {"RINGLET_TIMEOUT": "20"})
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.count("no secret for a job that spans hosts (started by mpi") == 2, (
        proc.stderr
    )


def test_rank_0_without_a_reachable_address_fails_every_rank(
    hosts: netns.Hosts, tmp_path: Path
) -> None:
    """RINGLET_HOST on rank 0's host overrides PMI_HOSTNAME; one nobody has makes init() fail on
    every rank with rank 0's reason, not a timeout (the store cannot be served there)."""
    extra = {"RINGLET_SECRET": secrets.token_hex(16), "RINGLET_HOST": "10.77.0.250",
             "RINGLET_TIMEOUT": "20"}  # fmt: skip
    proc = mpiexec(hosts, tmp_path, (1, 1), extra)
    assert proc.returncode != 0, proc.stdout
    assert "10.77.0.250" in proc.stderr, proc.stderr


@pytest.mark.parametrize("options", [(), ("-pmi-port",)], ids=["PMI_FD", "PMI_PORT"])
def test_a_rank_that_never_comes_is_named_in_seconds(
    hosts: netns.Hosts, tmp_path: Path, options: tuple[str, ...]
) -> None:
    """Rank 1 sleeps before init(): rank 0 gives up at the PMI barrier after RINGLET_TIMEOUT
    (3 s) and says why. (mpiexec itself then waits for the sleeper: Hydra's way, not ours.)"""
    extra = {"RINGLET_SECRET": secrets.token_hex(16), "RINGLET_TIMEOUT": "3", "LATE_RANK": "1"}
    argv = mpiexec_argv(hosts, tmp_path, (1, 1), *options)
    errors = tmp_path / "stderr"
    with errors.open("w") as err:
        proc = hosts.popen(0, argv, env=netns.clean_env(extra), cwd=str(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        started, said = time.monotonic(), ""
        while time.monotonic() - started < 40 and "rank 0 waited" not in said:
            time.sleep(0.2)
            said = errors.read_text()
        took = time.monotonic() - started
        proc.kill()
        proc.wait()
    assert "rank 0 waited for all 2 ranks to call ringlet.init()" in said, said
    assert took < 25, (took, said)  # 3 s of waiting after two Python starts on a loaded machine

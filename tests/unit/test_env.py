"""Where init() finds rank, size, master and secret: every source, the SLURM parsers, the errors."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from ringlet.rendezvous.env import JobEnv, job_id, parse_master, resolve
from ringlet.rendezvous.secret import (
    LocalSecret,
    SecretError,
    is_local_address,
    private_dir,
    read_secret_file,
)
from ringlet.rendezvous.slurm import expand_nodelist, expand_tasks_per_node, first_host
from ringlet.world import _local_secret

RINGLET = {
    "RINGLET_RANK": "2",
    "RINGLET_WORLD_SIZE": "4",
    "RINGLET_MASTER": "node01:29500",
    "RINGLET_LOCAL_RANK": "0",
    "RINGLET_LOCAL_SIZE": "2",
}
TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29400",
}
SLURM = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2),1,1",
    "SLURM_JOB_NODELIST": "node[01-04,07],gpu3",
    "SLURM_JOB_ID": "4242",
}


def test_ringlet_variables() -> None:
    env = resolve(environ=RINGLET)
    assert env == JobEnv(
        rank=2,
        world_size=4,
        master_host="node01",
        master_port=29500,
        local_rank=0,
        local_size=2,
        secret=None,
        timeout=300.0,
        source="ringlet",
        store_port_offset=0,
    )
    assert env.store_port == 29500


def test_ringlet_variables_win_over_torchrun_ones() -> None:
    # `ringlet run` sets both kinds; its own are authoritative.
    env = resolve(environ={**TORCHRUN, **RINGLET})
    assert (env.source, env.rank, env.world_size, env.master_host) == ("ringlet", 2, 4, "node01")


def test_torchrun_variables() -> None:
    env = resolve(environ=TORCHRUN)
    assert (env.source, env.rank, env.world_size) == ("torchrun", 5, 8)
    assert (env.local_rank, env.local_size) == (1, 4)
    assert (env.master_host, env.master_port, env.store_port_offset) == ("10.0.0.7", 29400, 0)


def test_torchrun_agent_store_moves_ours_to_the_next_port() -> None:
    env = resolve(environ={**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (env.master_port, env.store_port_offset, env.store_port) == (29400, 1, 29401)
    env = resolve(environ={**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "False"})
    assert env.store_port_offset == 0
    # torchrun without a shared agent store: MASTER_PORT is rank 0's torch store, ours is apart
    elastic = {**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RUN_ID": "r7"}
    assert resolve(environ=elastic).store_port_offset == 1


def test_slurm_variables() -> None:
    env = resolve(environ=SLURM)
    assert (env.source, env.rank, env.world_size) == ("slurm", 3, 6)
    assert (env.local_rank, env.local_size) == (1, 2)
    assert env.master_host == "node01"
    assert env.master_port == 20000 + 4242 * 16 % 10000  # step 0 of job 4242
    assert 20000 <= resolve(environ={**SLURM, "SLURM_JOB_ID": "987654321"}).master_port <= 29999


def test_slurm_port_and_master_overrides() -> None:
    assert resolve(environ={**SLURM, "RINGLET_PORT": "31000"}).master_port == 31000
    env = resolve(environ={**SLURM, "RINGLET_PORT": "31000", "MASTER_PORT": "32000"})
    assert env.master_port == 32000
    env = resolve(environ={**SLURM, "MASTER_ADDR": "login2"})
    assert env.master_host == "login2"
    old_name = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert resolve(environ={**old_name, "SLURM_NODELIST": "c[5-6]"}).master_host == "c5"


def test_open_mpi_variables() -> None:
    environ = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
        "MASTER_ADDR": "head",
        "MASTER_PORT": "29555",
    }
    env = resolve(environ=environ)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_size) == (
        "mpi",
        1,
        3,
        1,
        3,
    )
    assert (env.master_host, env.master_port) == ("head", 29555)


def test_pmi_variables_with_ringlet_master() -> None:
    environ = {"PMI_RANK": "0", "PMI_SIZE": "2", "RINGLET_MASTER": "[fe80::1]:4000"}
    env = resolve(environ=environ)
    assert (env.source, env.rank, env.world_size) == ("mpi", 0, 2)
    assert (env.master_host, env.master_port) == ("fe80::1", 4000)


def test_mpi_without_a_master_says_what_to_export() -> None:
    with pytest.raises(ValueError, match=r"MASTER_ADDR\+MASTER_PORT or RINGLET_MASTER"):
        resolve(environ={"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_explicit_arguments() -> None:
    env = resolve(rank=1, world_size=2, master="127.0.0.1:5000", environ={})
    assert (env.source, env.rank, env.world_size) == ("arguments", 1, 2)
    assert (env.master_host, env.master_port, env.local_rank) == ("127.0.0.1", 5000, None)
    # arguments win over a complete environment
    env = resolve(rank=0, world_size=3, master="h:1234", environ=TORCHRUN)
    assert (env.source, env.rank, env.world_size, env.master_host) == ("arguments", 0, 3, "h")
    assert env.local_rank is None  # torchrun's placement is for another rank and size


def test_explicit_arguments_keep_a_matching_local_placement() -> None:
    env = resolve(rank=5, world_size=8, master="h:1234", environ=TORCHRUN)
    assert (env.source, env.local_rank, env.local_size) == ("arguments", 1, 4)


def test_partial_arguments_are_completed_from_the_environment() -> None:
    master_only = {"MASTER_ADDR": "m", "MASTER_PORT": "7000"}
    env = resolve(rank=1, world_size=2, environ=master_only)
    assert (env.rank, env.world_size, env.master_host, env.master_port) == (1, 2, "m", 7000)
    assert env.source == "torchrun"
    env = resolve(master="other:8000", environ=TORCHRUN)
    assert (env.rank, env.world_size, env.master_host, env.master_port) == (5, 8, "other", 8000)
    assert env.local_rank == 1
    env = resolve(rank=3, environ=TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, None)


def test_single_process_needs_no_master() -> None:
    env = resolve(world_size=1, environ={})
    assert (env.rank, env.world_size, env.master_host, env.master_port) == (0, 1, "127.0.0.1", 0)
    assert env.source == "arguments"
    env = resolve(environ={"WORLD_SIZE": "1"})
    assert (env.rank, env.master_port, env.source) == (0, 0, "torchrun")


def test_nothing_set_names_every_source_and_its_variables() -> None:
    with pytest.raises(ValueError) as info:
        resolve(environ={})
    message = str(info.value)
    assert message.startswith("ringlet.init(): cannot tell this process's rank and world size")
    for name in (
        "RINGLET_RANK",
        "RINGLET_WORLD_SIZE",
        "RINGLET_MASTER",
        "RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NODELIST",
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "rank=, world_size=, master=",
        "ringlet run sets them",
    ):
        assert name in message, name


def test_partly_set_source_names_only_what_is_missing() -> None:
    with pytest.raises(ValueError) as info:
        resolve(environ={"RINGLET_RANK": "0", "RINGLET_WORLD_SIZE": "2"})
    ringlet_line = next(
        line for line in str(info.value).splitlines() if line.startswith("  ringlet:")
    )
    assert "RINGLET_MASTER" in ringlet_line and "RINGLET_RANK" not in ringlet_line
    with pytest.raises(ValueError, match="arguments: rank=1, world_size=4, master=None"):
        resolve(rank=1, world_size=4, environ={})


@pytest.mark.parametrize(
    ("kwargs", "environ", "match"),
    [
        ({"rank": 4, "world_size": 4, "master": "h:1"}, {}, "rank=4 .* not in 0..3"),
        ({"rank": -1, "world_size": 4, "master": "h:1"}, {}, "rank=-1"),
        ({"rank": 0, "world_size": 0, "master": "h:1"}, {}, "world_size=0"),
        ({"rank": 0, "world_size": 2, "master": "h:0"}, {}, "port 0"),
        ({"rank": 0, "world_size": 2, "master": "h:70000"}, {}, "not in 0-65535"),
        ({"rank": 0, "world_size": 2, "master": "hostonly"}, {}, "not host:port"),
        ({}, {**TORCHRUN, "RANK": "five"}, "RANK='five' is not an integer"),
        ({}, {**TORCHRUN, "RANK": "9"}, r"rank=9 \(from torchrun\)"),
        ({}, {**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4"),
        ({}, {**RINGLET, "RINGLET_MASTER": "node01"}, "RINGLET_MASTER='node01'"),
        ({}, {**SLURM, "SLURM_JOB_NODELIST": "node[01-"}, "unbalanced"),
    ],
)
def test_bad_values_are_value_errors(
    kwargs: dict[str, object], environ: dict[str, str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(environ=environ, **kwargs)  # type: ignore[arg-type]


def test_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError):
        resolve(rank="0", world_size=1, environ={})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resolve(rank=True, world_size=2, master="h:1", environ={})
    with pytest.raises(TypeError):
        resolve(world_size=1, secret=123, environ={})  # type: ignore[arg-type]


def test_timeout_argument_then_environment_then_default() -> None:
    assert resolve(world_size=1, environ={}).timeout == 300.0
    assert resolve(world_size=1, environ={"RINGLET_TIMEOUT": "12.5"}).timeout == 12.5
    assert resolve(world_size=1, timeout=3, environ={"RINGLET_TIMEOUT": "12.5"}).timeout == 3.0
    with pytest.raises(ValueError, match="RINGLET_TIMEOUT='soon'"):
        resolve(world_size=1, environ={"RINGLET_TIMEOUT": "soon"})
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            resolve(world_size=1, timeout=bad, environ={})


def test_secret_argument_then_environment_then_none() -> None:
    assert resolve(world_size=1, environ={}).secret is None
    assert resolve(world_size=1, environ={"RINGLET_SECRET": "abc\n"}).secret == b"abc"
    env = resolve(world_size=1, secret="xyz", environ={"RINGLET_SECRET": "abc"})
    assert env.secret == b"xyz"
    assert resolve(world_size=1, secret=b"\x00\x01", environ={}).secret == b"\x00\x01"
    with pytest.raises(ValueError, match="empty"):
        resolve(world_size=1, environ={"RINGLET_SECRET": ""})


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*RINGLET, *TORCHRUN, *SLURM, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RINGLET_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RINGLET_RANK", "1")
    monkeypatch.setenv("RINGLET_WORLD_SIZE", "2")
    monkeypatch.setenv("RINGLET_MASTER", "localhost:6000")
    monkeypatch.setenv("RINGLET_TIMEOUT", "9")
    env = resolve()
    assert (env.rank, env.world_size, env.master_host, env.timeout) == (1, 2, "localhost", 9.0)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
        ("a,b,c", ["a", "b", "c"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
        ("gpu[7]x,cpu[2-3]", ["gpu7x", "cpu2", "cpu3"]),
    ],
)
def test_nodelist_expansion(nodelist: str, hosts: list[str]) -> None:
    assert list(expand_nodelist(nodelist)) == hosts
    assert first_host(nodelist) == hosts[0]


def test_first_host_of_a_huge_nodelist_is_cheap() -> None:
    assert first_host("node[000000-999999]") == "node000000"


@pytest.mark.parametrize("nodelist", ["node[01-", "node]1[", "node[a-b]", "node[1-2-3]", " , "])
def test_bad_nodelists(nodelist: str) -> None:
    with pytest.raises(ValueError):
        first_host(nodelist)


def test_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


def test_parse_master() -> None:
    assert parse_master("host:1", "m") == ("host", 1)
    assert parse_master(" [::1]:29500 ", "m") == ("::1", 29500)
    with pytest.raises(ValueError, match="m='::1:5'"):
        parse_master("::1:5", "m")


# -- the job id and the secret when RINGLET_SECRET is not given (issue 11) ----------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"RINGLET_JOB_ID": "abc", "TORCHELASTIC_RUN_ID": "r"}, "abc"),
        ({"TORCHELASTIC_RUN_ID": "5f1c", "SLURM_JOB_ID": "9"}, "torchrun:5f1c"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "2"}, "slurm:9.2"),
        ({"PMIX_NAMESPACE": "prterun-h-77@1"}, "mpi:prterun-h-77@1"),
        ({}, ""),
    ],
)
def test_job_id_comes_from_the_launcher(environ: dict[str, str], expected: str) -> None:
    assert job_id(environ) == expected
    assert resolve(environ={**TORCHRUN, **environ}).job_id == expected


def test_secret_file_is_read_when_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  from-a-file\n")
    path.chmod(0o600)
    env = resolve(environ={**TORCHRUN, "RINGLET_SECRET_FILE": str(path)})
    assert env.secret == b"from-a-file" and env.secret_file == str(path)
    # RINGLET_SECRET wins over the file
    both = {**TORCHRUN, "RINGLET_SECRET_FILE": str(path), "RINGLET_SECRET": "env"}
    assert resolve(environ=both).secret == b"env"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_secret_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    path.write_text("s")
    path.chmod(mode)
    with pytest.raises(SecretError, match=f"chmod 600 {path}"):
        resolve(environ={**TORCHRUN, "RINGLET_SECRET_FILE": str(path)})


def test_empty_or_missing_secret_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    empty.chmod(0o600)
    with pytest.raises(SecretError, match="no usable secret"):
        read_secret_file(str(empty))
    with pytest.raises(SecretError, match="cannot be read"):
        read_secret_file(str(tmp_path / "missing"))


def test_local_secret_is_private_and_replaced_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    local = LocalSecret("job\0127.0.0.1:1234")
    assert local.path.parent == runtime / "ringlet"
    assert local.path.parent.stat().st_mode & 0o777 == 0o700
    first = local.create()
    local.publish(first)
    assert local.path.stat().st_mode & 0o777 == 0o600
    assert LocalSecret("job\0127.0.0.1:1234").read(time.monotonic() + 1) == first
    assert LocalSecret("other\0127.0.0.1:1234").path != local.path
    second = local.create()
    assert second != first and len(second) == 64
    local.publish(second)
    assert local.read(time.monotonic() + 1, previous=first) == second
    with pytest.raises(SecretError, match="did not publish a new secret"):
        local.read(time.monotonic() + 0.1, previous=second)
    local.remove(first)  # not the secret it holds: kept
    assert local.path.exists()
    local.remove(second)
    assert not local.path.exists()


def test_a_directory_someone_else_made_first_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"ringlet-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.raises(SecretError, match="other users may read it"):
        private_dir()
    planted.rmdir()
    planted.symlink_to(tmp_path)
    with pytest.raises(SecretError, match="not a directory"):
        private_dir()
    if os.geteuid() == 0:  # as root the test can plant a directory owned by another user
        planted.unlink()
        planted.mkdir(mode=0o700)
        os.chown(planted, 4242, 4242)
        with pytest.raises(SecretError, match="belongs to uid 4242"):
            private_dir()


def _job(**changes: object) -> JobEnv:
    base = resolve(environ={**TORCHRUN, "MASTER_ADDR": "127.0.0.1", "LOCAL_WORLD_SIZE": "8"})
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_no_secret_on_one_host_makes_one_and_across_hosts_refuses() -> None:
    assert _local_secret(_job(secret=b"given")) is None
    assert _local_secret(_job(world_size=1, rank=0)) is None
    assert isinstance(_local_secret(_job()), LocalSecret)
    assert isinstance(_local_secret(_job(local_size=None)), LocalSecret)
    with pytest.raises(SecretError, match="4 of 8 ranks on this host") as err:
        _local_secret(_job(local_size=4))
    assert "RINGLET_SECRET=" in str(err.value) and "RINGLET_SECRET_FILE" in str(err.value)
    with pytest.raises(SecretError, match="not an address of this host"):
        _local_secret(_job(local_size=None, master_host="192.0.2.1"))  # TEST-NET: never ours


def test_local_addresses() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("localhost")
    assert not is_local_address("192.0.2.1") and not is_local_address("no-such-host.invalid")


# -- engines with nothing exported (issue 14) ---------------------------------------------------


def test_srun_step_variables_win_over_the_allocation() -> None:
    env = resolve(
        environ={
            **SLURM,
            "SLURM_JOB_NODELIST": "c[1-4]",
            "SLURM_STEP_NODELIST": "c[3-4]",
            "SLURM_STEP_TASKS_PER_NODE": "3,1",
            "SLURMD_NODENAME": "c4",
            "SLURM_NODEID": "3",  # the allocation's index; the step's is 1
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "0",
            "SLURM_STEP_ID": "2",
        }
    )
    assert (env.master_host, env.local_size) == ("c3", 1)
    assert env.master_port == 20000 + (4242 * 16 + 2) % 10000
    assert env.job_id == "slurm:4242.2"


def test_open_mpi_on_one_host_needs_nothing_exported() -> None:
    from ringlet.rendezvous.env import derived_port

    environ = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "PMIX_NAMESPACE": "prterun-vm-4711@1",
    }
    env = resolve(environ=environ)
    assert (env.master_host, env.master_port) == (
        "127.0.0.1",
        derived_port("mpi:prterun-vm-4711@1"),
    )
    assert 20000 <= env.master_port <= 29999
    spread = {**environ, "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "PMIX_NAMESPACE": "not-prrte@1"}
    with pytest.raises(ValueError, match="the ranks span hosts, 1 of 2 here"):
        resolve(environ=spread)  # a namespace that names no mpirun host


#: Rank 1 of 4, two per host, under an mpirun that runs on node-01 (a name with a dash).
OPEN_MPI_SPREAD = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "PMIX_NAMESPACE": "prterun-node-01-4711@1",
}


def resolving_to(monkeypatch: pytest.MonkeyPatch, address: str | None) -> None:
    """Every host name resolves to ``address`` (None: to nothing), as DNS would say."""

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if address is None:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_prrte_namespace_names_mpirun_host() -> None:
    from ringlet.rendezvous.launchers import mpirun_host

    for namespace, host in [("prterun-vm-22608@1", "vm"), ("prterun-node-01-4711@2", "node-01"),
                            ("prte-gpu-a-3-77@1", "gpu-a-3"), ("other@1", None), ("", None)]:  # fmt: skip
        assert mpirun_host({"PMIX_NAMESPACE": namespace}) == host, namespace


def test_open_mpi_across_hosts_takes_mpirun_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from ringlet.rendezvous.env import derived_port

    resolving_to(monkeypatch, "10.0.0.1")
    env = resolve(environ=OPEN_MPI_SPREAD)
    port = derived_port("mpi:prterun-node-01-4711@1")
    assert (env.master_host, env.master_port, env.local_size) == ("node-01", port, 2)
    # rank 0 on mpirun's host: its PMIx server is mpirun's own (daemon 0)
    here = {**OPEN_MPI_SPREAD, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    uri = "prterun-node-01-4711@0.0;tcp4://10.0.0.1:41000"
    assert resolve(environ={**here, "PMIX_SERVER_URI41": uri}).master_host == "node-01"
    fqdn = {**here, "PMIX_HOSTNAME": "node-01.cluster.example"}  # PRRTE drops the domain
    assert resolve(environ=fqdn).master_host == "node-01"
    # MASTER_ADDR, or a master given to init(), wins and is not checked
    given = {**OPEN_MPI_SPREAD, "MASTER_ADDR": "10.0.0.7"}
    assert resolve(environ=given).master_host == "10.0.0.7"
    resolving_to(monkeypatch, None)
    assert resolve(master="10.0.0.8:29500", environ=OPEN_MPI_SPREAD).master_host == "10.0.0.8"


def test_open_mpi_mpirun_host_that_cannot_be_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = {**OPEN_MPI_SPREAD, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                 "PMIX_SERVER_URI41": "prterun-node-01-4711@0.1;tcp4://10.0.0.2:41000"}  # fmt: skip
    resolving_to(monkeypatch, "10.0.0.1")
    with pytest.raises(ValueError, match=r"mpirun's host 'node-01' .*but rank 0, which serves the"
                       r" store there, runs on .*set MASTER_ADDR to rank 0's host"):  # fmt: skip
        resolve(environ=elsewhere)
    resolving_to(monkeypatch, "127.0.1.1")  # Debian's /etc/hosts line for the machine's own name
    with pytest.raises(ValueError, match=r"'node-01' .*resolves to a loopback address \(127.0.1.1"):
        resolve(environ=OPEN_MPI_SPREAD)
    resolving_to(monkeypatch, None)
    with pytest.raises(ValueError, match=r"'node-01' .*which does not resolve on .*MASTER_ADDR"):
        resolve(environ=OPEN_MPI_SPREAD)


def test_rank_0_absent_at_mpirun_host_is_said_in_the_wait() -> None:
    from ringlet.errors import CollectiveTimeout
    from ringlet.rendezvous.launchers import reach_mpirun_host

    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout, match=rf"no store answered at 127.0.0.1:{port}"
                           r" within 0.5 s .*rank 0 is not there or not reachable"):  # fmt: skip
            reach_mpirun_host("127.0.0.1", port, b"k" * 32, "mpi:prterun-h-1@1", 0.5)
    assert time.monotonic() - start < 5


def test_torch_elastic_restart_is_another_job() -> None:
    from ringlet.rendezvous.torchelastic import key

    first = {"TORCHELASTIC_RUN_ID": "5f1c", "TORCHELASTIC_RESTART_COUNT": "0", "WORLD_SIZE": "4"}
    again = {**first, "TORCHELASTIC_RESTART_COUNT": "2"}
    assert (job_id(first), job_id(again)) == ("torchrun:5f1c", "torchrun:5f1c@attempt2")
    assert key(first) != key(again) == "ringlet/5f1c/attempt2/world4/store"
    assert key({**first, "WORLD_SIZE": "8"}) != key(first)  # a node joined: no restart, a new round
    # no shared agent store: the round is torch's fresh MASTER_PORT, not each agent's own count
    own = {
        **first,
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "4",
    }
    veteran = {**own, "TORCHELASTIC_RESTART_COUNT": "1"}
    assert (job_id(own), key(own)) == (job_id(veteran), key(veteran)) != (job_id(first), key(first))
    assert job_id({**own, "MASTER_PORT": "5"}) != job_id(own)
    assert job_id({"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "1"}) != ""


def test_kubernetes_jobset_variables() -> None:
    pod = {"JOBSET_NAME": "train", "REPLICATED_JOB_NAME": "trainer", "JOB_INDEX": "0",
           "JOB_COMPLETION_INDEX": "3", "WORLD_SIZE": "4"}  # fmt: skip
    env = resolve(environ=pod)
    assert (env.source, env.rank, env.world_size, env.local_size) == ("jobset", 3, 4, 1)
    assert env.master_host == "train-trainer-0-0.train"  # JobSet's pod 0-0 under its subdomain
    assert 20000 <= env.master_port <= 29999 and env.job_id == "jobset:train"
    with pytest.raises(ValueError, match=r"RANK \(JOB_INDEX > 0\)"):
        resolve(environ={**pod, "JOB_INDEX": "1"})
    assert resolve(environ={**pod, "JOB_INDEX": "1", "RANK": "5", "WORLD_SIZE": "8",
                            "MASTER_PORT": "29500"}).rank == 5  # fmt: skip


def test_inside_ray_the_error_points_to_ringlet_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(ValueError) as outside:
        resolve(environ={})
    assert "ringlet.ray.init()" not in str(outside.value)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    with pytest.raises(ValueError, match=r"Inside Ray .* call ringlet\.ray\.init\(\)"):
        resolve(environ={})

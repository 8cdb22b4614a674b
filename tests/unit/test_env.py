"""Where init() finds rank, size, master and secret: every source, the SLURM parsers, the errors."""

from __future__ import annotations

import pytest

from ringlet.rendezvous.env import JobEnv, parse_master, resolve
from ringlet.rendezvous.slurm import expand_nodelist, expand_tasks_per_node, first_host

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


def test_slurm_variables() -> None:
    env = resolve(environ=SLURM)
    assert (env.source, env.rank, env.world_size) == ("slurm", 3, 6)
    assert (env.local_rank, env.local_size) == (1, 2)
    assert env.master_host == "node01"
    assert env.master_port == 20000 + 4242 % 10000
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
        "SLURM_JOB_NODELIST",
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

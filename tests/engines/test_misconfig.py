"""A misconfigured job fails in seconds with an error that says what is wrong and on which node.

Real processes with exactly the variables a launcher (or a hand-written script) would give them;
each case must end well under 10 s, not at the 300 s default timeout.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from test_engines import clean_env, free_port

# init() and how long it took (its start-up under a loaded machine is not the point)
INIT = textwrap.dedent("""
    import sys, time
    import ringlet
    started = time.monotonic()
    try:
        ringlet.init()
    finally:
        print(f"init() ended after {time.monotonic() - started:.2f} s", file=sys.stderr)
""")


def start(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], env=clean_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(procs: list[subprocess.Popen[str]], within: float) -> list[str]:
    """Every process's stderr, each having failed with init() ending within ``within`` seconds."""
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=within + 50)  # + interpreter start-up, generously
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError(f"still running after {within + 50} s") from None
        assert proc.returncode != 0, err
        took = [float(m) for m in re.findall(r"init\(\) ended after ([\d.]+) s", err)]
        assert took and max(took) < within, err
        errors.append(err)
    return errors


def test_nodes_disagreeing_on_ranks_per_node(tmp_path: Path) -> None:
    """`ringlet run -n 2` on node 0 but `-n 1` on node 1: both nodes say so, naming the host."""
    script = tmp_path / "train.py"
    script.write_text(INIT)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "ringlet", "run", "--nnodes", "2", "--node-rank", str(k),
             "-n", str(n), "--master", f"127.0.0.1:{port}", "--grace", "1", str(script)],
            env=clean_env(RINGLET_SECRET="misconfigured-job"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, n in ((0, 2), (1, 1))
    ]  # fmt: skip
    errors = finish(nodes, within=10)
    for err in errors:
        assert "the nodes disagree on the world size" in err, err
        assert socket.gethostname() in err, err
    assert any("one of 4 ranks, 2 on this node" in e or "one of 2 ranks, 1 on this node" in e
               for e in errors), errors  # fmt: skip


def test_world_size_disagreement_names_both_views() -> None:
    port, common = free_port(), {"MASTER_ADDR": "127.0.0.1", "RINGLET_SECRET": "s" * 32}
    procs = [start(INIT, RANK=str(r), WORLD_SIZE=str(n), MASTER_PORT=str(port), **common)
             for r, n in ((0, 2), (1, 3))]  # fmt: skip
    errors = finish(procs, within=10)
    assert any("one of 3 ranks" in e and "one of 2" in e for e in errors), errors
    assert all("disagree on the world size" in e for e in errors), errors


def test_a_rank_that_never_arrives_is_named() -> None:
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3",
           "RINGLET_SECRET": "s" * 32, "RINGLET_TIMEOUT": "3"}  # fmt: skip
    errors = finish([start(INIT, RANK=str(r), **env) for r in (0, 1)], within=10)
    for err in errors:
        assert "1 of 3 ranks never arrived at the store within 3 s: rank(s) 2" in err, err
        assert socket.gethostname() in err, err


def test_a_missing_master_is_named() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RINGLET_SECRET": "s" * 32,
        "RINGLET_TIMEOUT": "3",
    }
    absent, slurm, mpi = finish(
        [
            start(INIT, **env),  # rank 0 never started: the store is not there
            start(INIT, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="77"),  # by hand
            start(INIT, PMI_RANK="1", PMI_SIZE="4", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2"),
        ],
        within=10,
    )
    assert "could not reach the rendezvous store" in absent and "rank 0 is running" in absent
    assert "SLURM_STEP_NODELIST (or MASTER_ADDR)" in slurm, slurm
    assert "MASTER_ADDR+MASTER_PORT or RINGLET_MASTER; the ranks span hosts, 2 of 4 here" in mpi
    # (across hosts without a secret: tests/ranks/test_security.py)


def test_mpiexec_pmi_port_without_its_proxy_is_named() -> None:
    """-pmi-port's variables by hand (no Hydra proxy at PMI_PORT, or no PMI_ID): said at once."""
    port = str(free_port())
    gone, no_id = finish(
        [
            start(INIT, PMI_PORT=f"127.0.0.1:{port}", PMI_ID="1", MPI_LOCALNRANKS="2"),
            start(INIT, PMI_PORT=f"127.0.0.1:{port}", MPI_LOCALNRANKS="2"),
        ],
        within=10,
    )
    said = "ConnectionError: ringlet.init() under mpiexec -pmi-port: cannot reach Hydra's proxy"
    assert f"{said} at PMI_PORT='127.0.0.1:{port}'" in gone, gone
    assert "PMI_ID (mpiexec -pmi-port sets it beside PMI_PORT)" in no_id, no_id

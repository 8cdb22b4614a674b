"""torch elastic with a changing set of nodes: the real ``torchrun --nnodes 1:2``, agents here.

Each agent is one "node" of two ranks, meeting through torch's c10d rendezvous. Node A runs alone
(world 2); node B joins, so A's agent stops its ranks and a new round of world 4 starts with the
same TORCHELASTIC_RESTART_COUNT (a membership change is no restart); node B dies, A's ranks fail
and A's agent restarts them alone (world 2, restart 1); then node C joins, whose agent counts no
restart at all (the count is each agent's own, not the job's). Each round's ranks must meet in
their own store, and torch's gloo beside ringlet on MASTER_PORT: each checks both against NumPy.

The agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13's shared agent store a
node joining a running job never starts (the joining agent waits for the round's MASTER_ADDR key,
which the running rank-0 agent, already holding its store, never writes) and times out, ringlet
or not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spmd import free_port

pytestmark = [pytest.mark.torch, pytest.mark.long]  # ~35 s: four rounds of torchrun agents

LAUNCHER_PREFIXES = ("RINGLET_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_",
                     "SLURM", "OMPI_", "PMI", "MPI_LOCAL", "TORCHELASTIC", "PET_")  # fmt: skip

SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys, time
    import numpy as np
    import torch
    import torch.distributed as dist
    import ringlet

    node, n = os.environ["NODE"], int(os.environ["WORLD_SIZE"])
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    comm = ringlet.init(timeout=60)
    r = comm.rank
    assert comm.size == n, (comm.size, n)
    x = np.arange(6.0) * (r + 1)
    comm.all_reduce(x)
    assert (x == np.arange(6.0) * n * (n + 1) / 2).all(), x
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # beside ringlet
    t = torch.full((3,), float(r + 1))
    dist.all_reduce(t)
    assert t.tolist() == [n * (n + 1) / 2] * 3, t
    comm.barrier()
    print("ROUND " + json.dumps({"node": node, "rank": r, "size": n, "restart": restart,
                                 "round": os.environ["MASTER_PORT"], "t": time.time()}),
          flush=True)
    if n == 2:
        time.sleep(600)  # node A alone: runs until a node's arrival makes its agent stop it
    if node == "B":
        os.kill(os.getppid(), 9)  # node B dies, agent and all; its ranks go too
        os._exit(1)
    if restart == 0 and node == "A":
        comm.all_reduce(x)  # node B's ranks never come: this fails, and A's agent restarts
        os._exit(2)
    dist.destroy_process_group()
    comm.close()
""")


def agent(node: str, endpoint: str, run_id: str, script: Path, log: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(
        NODE=node,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        RINGLET_SECRET="an-elastic-jobs-secret-0123456789",
    )
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2",
            "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=1,join_timeout=120",
            "--max-restarts", "1", "--monitor-interval", "0.5", str(script)]  # fmt: skip
    out = log.open("w")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def rounds(log: Path) -> list[dict[str, object]]:
    return [json.loads(m) for m in re.findall(r"ROUND (\{[^{}]*\})", log.read_text())]


def wait_for(what: str, check: object, deadline: float, logs: list[Path]) -> None:
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            text = "\n".join(f"--- {p.name} ---\n{p.read_text()[-6000:]}" for p in logs
                             if p.exists())  # fmt: skip
            pytest.fail(f"timed out waiting for {what}\n{text}")
        time.sleep(0.2)


def test_nodes_joining_and_leaving_meet_each_rounds_own_store(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = tmp_path / "elastic.py"
    script.write_text(SCRIPT)
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"elastic-{os.getpid()}"
    logs = {node: tmp_path / f"node_{node}.log" for node in "ABC"}
    every = list(logs.values())
    a = agent("A", endpoint, run_id, script, logs["A"])
    procs = [a]

    def seen() -> list[dict[str, object]]:
        return [x for log in every if log.exists() for x in rounds(log)]

    try:
        deadline = time.monotonic() + 300
        wait_for("node A alone", lambda: len(seen()) >= 2, deadline, every)
        procs.append(agent("B", endpoint, run_id, script, logs["B"]))
        wait_for("node A alone again", lambda: len(seen()) >= 8, deadline, every)
        procs.append(agent("C", endpoint, run_id, script, logs["C"]))
        for proc in (a, procs[2]):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    report = "\n".join(f"--- {p.name} ---\n{p.read_text()[-8000:]}" for p in every if p.exists())
    by_round: dict[str, list[dict[str, object]]] = {}
    for x in sorted(seen(), key=lambda x: float(str(x["t"]))):
        by_round.setdefault(str(x["round"]), []).append(x)
    summary = [
        (len(xs), sorted({(str(x["node"]), int(str(x["restart"]))) for x in xs}))
        for xs in by_round.values()
    ]
    assert summary == [
        (2, [("A", 0)]),
        (4, [("A", 0), ("B", 0)]),
        (2, [("A", 1)]),
        (4, [("A", 1), ("C", 0)]),  # the agents' restart counts differ: one round all the same
    ], report
    for xs in by_round.values():
        assert sorted(int(str(x["rank"])) for x in xs) == list(range(len(xs))), report
    assert a.returncode == 0 and procs[2].returncode == 0, report

"""Collectives across simulated hosts: real processes in network namespaces (tests/netns.py).

Each layout runs one job whose ranks sit on namespaced hosts (own hostname, /dev/shm, address),
so ringlet sees several machines joined by a bridge. Every rank runs worker.py: every collective
at float32/float64/int32/bfloat16, sizes 0, a few elements and about 3 MiB, checked against NumPy
from the same seeds; the test then checks what each rank saw of the topology and that every rank
holds the same bits after each all_reduce. A failure shows every rank's fate and stderr.
"""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import netns

pytestmark = pytest.mark.multihost
WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
_ports = itertools.count(29500)  # a fresh rendezvous port per job: no TIME_WAIT to trip over


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.Hosts]:
    """Three uncapped simulated hosts shared by the module's jobs (they take turns)."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    with netns.Hosts(3) as made:
        yield made


def rank_envs(
    hosts: netns.Hosts, where: Sequence[int], extra: dict[str, str]
) -> list[dict[str, str]]:
    """What a launcher would give each rank: rank 0's host is the master; RINGLET_NODE_RANK is not
    set, so ringlet can only tell the hosts apart by what the namespaces make different."""
    master, secret = f"{hosts.address(where[0])}:{next(_ports)}", secrets.token_hex(16)
    return [
        netns.clean_env({"RINGLET_RANK": str(r), "RINGLET_WORLD_SIZE": str(len(where)),
                         "RINGLET_MASTER": master, "RINGLET_SECRET": secret,
                         "RINGLET_TIMEOUT": "30", "PYTHONUNBUFFERED": "1"} | extra)
        for r in range(len(where))
    ]  # fmt: skip


def records(outcome: netns.RankOutcome, key: str) -> list[Any]:
    """The values under `key` in a rank's JSON stdout lines."""
    found = []
    for line in outcome.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if key in record:
                found.append(record[key])
    return found


def check_topology(
    hosts: netns.Hosts, where: Sequence[int], outcomes: list[netns.RankOutcome]
) -> None:
    """Ranks on one namespace host report that hostname, local_size = its rank count and
    local_rank = their order there; ranks on different hosts report different hostnames."""
    seen = {o.rank: records(o, "topology")[0] for o in outcomes}
    for rank, host in enumerate(where):
        peers = [r for r, h in enumerate(where) if h == host]
        got = seen[rank]
        assert got["hostname"] == hosts.hosts[host].hostname, (rank, got)
        assert (got["local_rank"], got["local_size"]) == (peers.index(rank), len(peers)), (
            f"rank {rank} on host {host} (with ranks {peers}) reported local_rank "
            f"{got['local_rank']} of local_size {got['local_size']}"
        )
    names = {seen[r]["hostname"] for r in range(len(where))}
    assert len(names) == len(set(where)), names


def run_job(hosts: netns.Hosts, where: Sequence[int], tmp_path: Path, timeout: float,
            extra: dict[str, str] | None = None) -> list[netns.RankOutcome]:  # fmt: skip
    """worker.py on every rank of `where` (the host of each rank); fails unless all exit 0."""
    job = netns.Job(hosts, where, [sys.executable, str(WORKER)],
                    rank_envs(hosts, where, extra or {}), tmp_path)  # fmt: skip
    outcomes = job.wait(timeout)
    if any(o.returncode != 0 for o in outcomes):
        pytest.fail(
            f"ranks on hosts {list(where)} failed:\n{netns.report(outcomes)}", pytrace=False
        )
    return outcomes


LAYOUTS = {
    "1+1": netns.layout_hosts("1+1"),
    "2+2": netns.layout_hosts("2+2"),
    "3+1": netns.layout_hosts("3+1"),
    "2+1+1": netns.layout_hosts("2+1+1"),
    "interleaved-2x2": [0, 1, 0, 1],  # same-host ranks not adjacent in rank order
}


@pytest.mark.timeout(75)
@pytest.mark.parametrize(  # the interleaved layout with -m long (test_topology's by default)
    "layout", [pytest.param(k, marks=pytest.mark.long) if "interleaved" in k else k for k in LAYOUTS]
)
def test_collectives_across_hosts(hosts: netns.Hosts, layout: str, tmp_path: Path) -> None:
    """Every collective, dtype and size is right on every rank; topology seen; bits agree."""
    where = LAYOUTS[layout]
    # ~3 MiB at every dtype in the main layout; elsewhere at 4- and 2-byte dtypes only (time).
    big = "float32,float64,int32,bfloat16" if layout == "2+2" else "float32,bfloat16"
    outcomes = run_job(hosts, where, tmp_path, timeout=60, extra={"MULTIHOST_MIB_DTYPES": big})
    check_topology(hosts, where, outcomes)
    wrong = [f"[rank{o.rank}] {f}" for o in outcomes for f in records(o, "failures")[0]]
    assert not wrong, f"{len(wrong)} wrong results in layout {layout}:\n" + "\n".join(wrong)
    digests = [records(o, "digests")[0] for o in outcomes]
    differ = [case for case in digests[0] if len({d[case] for d in digests}) > 1]
    assert not differ, f"ranks hold different bits after: {', '.join(differ)}"


@pytest.mark.timeout(40)
def test_ringlet_run_spans_hosts(hosts: netns.Hosts, tmp_path: Path) -> None:
    """`ringlet run --nnodes 2 --node-rank K --master IP:PORT` on each host forms one 4-rank job
    that sees two hosts of two ranks."""
    master, secret = f"{hosts.address(0)}:{next(_ports)}", secrets.token_hex(16)
    env = netns.clean_env({"RINGLET_SECRET": secret, "MULTIHOST_CASES": "topology",
                           "RINGLET_TIMEOUT": "20"})  # fmt: skip
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "ringlet", "run", "-n", "2", "--nnodes", "2", "--node-rank",
               str(node), "--master", master, "--no-prefix", str(WORKER)]  # fmt: skip
        procs.append(hosts.popen(node, cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for node, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((node, proc.returncode, out, err))
    failed = [r for r in results if r[1] != 0]
    assert not failed, "\n".join(f"node {n}: exit {c}\n{e}" for n, c, _, e in failed)
    seen = [json.loads(line)["topology"] for _, _, out, _ in results
            for line in out.splitlines() if line.startswith('{"topology"')]  # fmt: skip
    assert sorted(s["rank"] for s in seen) == [0, 1, 2, 3]
    for s in seen:
        assert s["hostname"] == hosts.hosts[s["rank"] // 2].hostname
        assert (s["local_rank"], s["local_size"]) == (s["rank"] % 2, 2), s

"""Issue 11's failure detection on every transport, rank 0 included: shm, TCP and both at once.

test_faults.py and test_stall.py drill these on one transport at a time; here the same rank
bodies run where they were not yet: rank 0 (the store's host) SIGKILLed over shared memory, and
every drill on two simulated hosts of two ranks (shared memory inside a host, TCP between them),
where one call's messages take both transports. The survivors must raise an error naming the
culprit in about a second (a per-call timeout: within that timeout plus the bounded report).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_faults import _check_survivors, _env, killed_mid_all_reduce
from test_stall import LIMIT, rank0_leaves, rank0_stops

import spmd

TWO_HOSTS = {"per_rank_env": lambda r: {"RINGLET_HOST_ID": f"h{r // 2}"}}  # ranks 0-1 | 2-3


@pytest.mark.alone
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("victim", "hosts"), [(0, 1), (0, 2), (3, 2), (1, 2)])
def test_sigkill_of_any_rank_is_seen_in_about_a_second(
    victim: int, hosts: int, tmp_path: Path
) -> None:
    """Over shared memory on one host, or over shm+tcp on two: victim 0 hosts the store."""
    env = _env("auto")
    where = TWO_HOSTS if hosts == 2 else {}
    n = 4 if hosts == 2 else 3
    outcomes = spmd.run(killed_mid_all_reduce, n, victim, 16, tmp_path / "death", env=env,
                        timeout=50, expect_failure=True, **where)  # fmt: skip
    times = _check_survivors(outcomes, victim, 2.0, env)
    print(f"SIGKILL of rank {victim} of {n} on {hosts} host(s): max {max(times):.3f} s")


@pytest.mark.timeout(60)
def test_rank_0_stopped_is_a_timeout_naming_it_across_hosts(tmp_path: Path) -> None:
    env = {"RINGLET_TIMEOUT": "60"}
    outcomes = spmd.run(rank0_stops, 4, tmp_path, timeout=50, env=env, expect_failure=True,
                        **TWO_HOSTS)  # fmt: skip
    assert outcomes[0] == ("died", "killed by signal SIGKILL"), outcomes[0]
    for rank in (1, 2, 3):
        status, got = outcomes[rank]
        assert status == "ok", f"rank {rank}: {got}"
        assert got["error"] == "CollectiveTimeout" and "rank 0" in got["message"], got
        assert got["took"] < LIMIT, f"rank {rank} took {got['took']:.1f} s (limit {LIMIT} s)"
        print(f"shm+tcp: rank {rank} raised after {got['took']:.2f} s")


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_rank_0_leaving_is_seen_at_once_across_hosts() -> None:
    env = {"RINGLET_TIMEOUT": "30"}
    outcomes = spmd.run(rank0_leaves, 4, timeout=40, env=env, expect_failure=True, **TWO_HOSTS)
    assert outcomes[0][0] == "error" and "rank 0's own code failed" in outcomes[0][1]
    for rank in (1, 2, 3):
        status, got = outcomes[rank]
        assert status == "ok", f"rank {rank}: {got}"
        assert got["error"] == "PeerError" and "rank 0" in got["message"], got
        assert got["took"] < 2.0, f"rank {rank} took {got['took']:.1f} s"
        print(f"shm+tcp: rank {rank} raised after {got['took']:.2f} s")

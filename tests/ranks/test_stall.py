"""Rank 0 stopped (SIGSTOP: the store's host frozen, its sockets open) or gone while others wait.

The per-call ``timeout=`` must hold whoever freezes: the others raise a CollectiveTimeout that
names rank 0 within the call's timeout plus the bounded report, not after the job-wide timeout
their store requests would otherwise wait for.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringlet
import spmd

CALL_TIMEOUT = 2.0
#: The call's timeout, the failure report's bound (failures.REPORT_BOUND) and slack for a loaded box.
LIMIT = CALL_TIMEOUT + 2.0 + 3.0


def rank0_stops(comm, done: Path) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    pids = comm.all_gather_object(os.getpid())
    x = np.arange(4.0)
    comm.all_reduce(x)
    if comm.rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(60)  # a survivor kills it once every survivor has raised
        return None
    time.sleep(0.2)  # let rank 0 stop before the call
    start = time.monotonic()
    try:
        comm.all_reduce(x, timeout=CALL_TIMEOUT)
        raise AssertionError("all_reduce returned while rank 0 was stopped")
    except ringlet.RingletError as exc:
        took, error, message = time.monotonic() - start, type(exc).__name__, str(exc)
        missing = getattr(exc, "missing", ())
    (done / str(comm.rank)).write_text("raised")
    if comm.rank == 1:
        end = time.monotonic() + 20
        while len(list(done.iterdir())) < comm.size - 1 and time.monotonic() < end:
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
    return {"took": took, "error": error, "message": message, "missing": tuple(missing)}


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_stopped_rank_0_is_a_timeout_naming_it_within_the_calls_timeout(
    transport: str, tmp_path: Path
) -> None:
    env = {"RINGLET_TIMEOUT": "60", "RINGLET_TRANSPORT": transport}
    outcomes = spmd.run(rank0_stops, 3, tmp_path, timeout=50, env=env, expect_failure=True)
    assert outcomes[0] == ("died", "killed by signal SIGKILL"), outcomes[0]
    for rank in (1, 2):
        status, got = outcomes[rank]
        assert status == "ok", f"rank {rank}: {got}"
        assert got["error"] == "CollectiveTimeout", got
        assert "rank 0" in got["message"], got["message"]
        assert got["took"] < LIMIT, f"rank {rank} took {got['took']:.1f} s (limit {LIMIT} s)"
        print(f"{transport}: rank {rank} raised after {got['took']:.2f} s: {got['message'][:160]}")


def rank0_leaves(comm) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    comm.barrier()
    if comm.rank == 0:
        raise RuntimeError("rank 0's own code failed")  # it closes and stays up for the others
    start = time.monotonic()
    try:
        comm.all_reduce(np.arange(4.0))
        raise AssertionError("all_reduce returned without rank 0")
    except ringlet.RingletError as exc:
        return {"took": time.monotonic() - start, "error": type(exc).__name__, "message": str(exc)}


@pytest.mark.alone
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_rank_that_leaves_is_seen_at_once_by_ranks_waiting_for_it(transport: str) -> None:
    """Rank 0 stays alive after it closed (it keeps the store up for the others' check-out):
    over TCP its closed sockets say it left; over shared memory the segment must say so too."""
    env = {"RINGLET_TIMEOUT": "30", "RINGLET_TRANSPORT": transport}
    outcomes = spmd.run(rank0_leaves, 3, timeout=40, env=env, expect_failure=True)
    assert outcomes[0][0] == "error" and "rank 0's own code failed" in outcomes[0][1]
    for rank in (1, 2):
        status, got = outcomes[rank]
        assert status == "ok", f"rank {rank}: {got}"
        assert got["error"] == "PeerError" and "rank 0" in got["message"], got
        assert got["took"] < 5.0, f"rank {rank} took {got['took']:.1f} s"  # was the 10 s close wait
        print(f"{transport}: rank {rank} raised after {got['took']:.2f} s")

"""tests/spmd.py itself: a job whose store port another process took first starts again."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import spmd


def _rank(comm) -> int:  # type: ignore[no-untyped-def]
    """10 x the world size (from a real all_reduce) plus the rank."""
    return int(comm.all_reduce(np.ones(1))[0]) * 10 + int(comm.rank)


@pytest.mark.timeout(60)
def test_a_job_whose_store_port_is_taken_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first port handed out is held by a socket here (as by another job on the machine):
    rank 0's store cannot listen there, and the job runs again on a fresh port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken: list[int] = [held.getsockname()[1]]
        real = spmd.free_port
        monkeypatch.setattr(spmd, "free_port", lambda: taken.pop() if taken else real())
        assert spmd.run(_rank, 2, env={"RINGLET_TRANSPORT": "tcp"}, timeout=40) == [20, 21]
        assert not taken  # the held port was handed out, so the job did start twice

"""A small SPMD harness for ShmGroup tests: N processes (forked by spmd's fork server), a
file-based exchange, and a report of every rank (result, traceback, "timed out" or "killed by
signal") on failure.

``run_group(body, n, *args)`` starts n processes; each opens a ShmGroup (exchange through files in
a temporary directory), calls ``body(group, *args)`` and sends back its return value or its
exception. The tests of this module check the harness and the group's set-up itself.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import spmd
from ringlet.transport.shm import ShmGroup, ShmTuning
from ringlet.transport.shm_wait import PeerWatch, process_start_time


class FileExchange:
    """All-gather small byte strings through files: what the communicator does with its store."""

    def __init__(self, directory: str, rank: int, size: int, timeout: float = 20.0) -> None:
        self.directory, self.rank, self.size, self.timeout = Path(directory), rank, size, timeout
        self.round = 0

    def __call__(self, value: bytes) -> list[bytes]:
        self.round += 1
        mine = self.directory / f"{self.round}.{self.rank}"
        tmp = self.directory / f"{self.round}.{self.rank}.tmp"
        tmp.write_bytes(value)
        tmp.rename(mine)
        deadline = time.monotonic() + self.timeout
        out: list[bytes] = []
        for q in range(self.size):
            path = self.directory / f"{self.round}.{q}"
            while not path.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"exchange round {self.round}: rank {q} never wrote")
                time.sleep(0.001)
            out.append(path.read_bytes())
        return out


@dataclass
class Outcome:
    """What one rank ended with."""

    rank: int
    status: str = "timed out"  # "ok", "error", "timed out", "killed by signal N", "exited N"
    value: Any = None
    error: BaseException | None = None
    error_type: str = ""
    detail: str = ""
    elapsed: float = 0.0
    attrs: dict[str, Any] = field(default_factory=dict)


def _child(
    rank: int,
    size: int,
    directory: str,
    job: str,
    open_kw: dict[str, Any],
    body: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    start = time.monotonic()
    try:
        group = ShmGroup.open(
            rank,
            size,
            job=job,
            exchange=FileExchange(directory, rank, size),
            timeout=20.0,
            **open_kw,
        )
        try:
            value = body(group, *args)
        finally:
            group.close()
        results.put((rank, "ok", pickle.dumps(value), "", "", time.monotonic() - start, {}))
    except BaseException as exc:
        attrs = {k: getattr(exc, k) for k in ("missing", "rank", "signatures") if hasattr(exc, k)}
        results.put(
            (
                rank,
                "error",
                b"",
                type(exc).__name__,
                traceback.format_exc(),
                time.monotonic() - start,
                attrs,
            )
        )


def run_group(
    body: Callable[..., Any],
    size: int,
    *args: Any,
    timeout: float = 60.0,
    expect_errors: bool = False,
    job: str | None = None,
    **open_kw: Any,
) -> list[Outcome]:
    """Run ``body(group, *args)`` on ``size`` spawned ranks; return every rank's Outcome.

    Unless ``expect_errors``, any rank not ending "ok" fails the test with a report of all ranks.
    """
    ctx = spmd.context()
    results = ctx.Queue()
    job = job or f"t{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="ringlet-shm-test-") as directory:
        procs = [
            ctx.Process(target=_child, args=(r, size, directory, job, open_kw, body, args, results))
            for r in range(size)
        ]
        for p in procs:
            p.start()
        outcomes = [Outcome(r) for r in range(size)]
        deadline = time.monotonic() + timeout
        pending = set(range(size))
        while pending and time.monotonic() < deadline:
            try:
                rank, status, value, etype, detail, elapsed, attrs = results.get(timeout=0.05)
            except queue.Empty:
                for r in list(pending):
                    code = procs[r].exitcode
                    if code is not None and code != 0 and results.empty():
                        outcomes[r].status = (
                            f"killed by signal {-code}" if code < 0 else f"exited {code}"
                        )
                        pending.discard(r)
                continue
            o = outcomes[rank]
            o.status, o.error_type, o.detail, o.elapsed, o.attrs = (
                status,
                etype,
                detail,
                elapsed,
                attrs,
            )
            if status == "ok":
                o.value = pickle.loads(value)
            pending.discard(rank)
        for r in pending:  # still running: dump its stacks into stderr, then stop it
            if procs[r].pid is not None and procs[r].exitcode is None:
                os.kill(procs[r].pid, signal.SIGUSR1)
        time.sleep(0.2 if pending else 0)
        for p in procs:
            p.join(timeout=5)
            if p.exitcode is None:
                p.kill()
                p.join()
    if not expect_errors and any(o.status != "ok" for o in outcomes):
        pytest.fail(report(outcomes))
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    """Every rank's fate, for an assertion message."""
    lines = []
    for o in outcomes:
        lines.append(f"[rank{o.rank}] {o.status} {o.error_type}")
        if o.detail:
            lines.extend(f"[rank{o.rank}]   {line}" for line in o.detail.rstrip().splitlines())
    return "\n".join(lines)


def leftovers(job: str) -> list[str]:
    """Segment names of ``job`` still in /dev/shm."""
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"ringlet-{job}-")]


# -- bodies (module level: spawned processes import them) -------------------------------------
def _describe(group: ShmGroup) -> dict[str, Any]:
    return {"rank": group.rank, "size": group.size, "cma": group.uses_cma, "pid": os.getpid()}


def _raise_on(group: ShmGroup, bad: int) -> int:
    if group.rank == bad:
        raise ValueError(f"rank {bad} fails on purpose")
    return group.rank


# -- tests of the harness and of opening a group ----------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 2, 3])
def test_open_attaches_every_rank_and_leaves_nothing_in_dev_shm(size: int) -> None:
    job = f"open{secrets.token_hex(3)}"
    outcomes = run_group(_describe, size, job=job)
    assert [o.value["rank"] for o in outcomes] == list(range(size))
    assert len({o.value["pid"] for o in outcomes}) == size
    assert len({o.value["cma"] for o in outcomes}) == 1  # every rank made the same choice
    assert leftovers(job) == []


@pytest.mark.timeout(60)
def test_harness_reports_every_rank() -> None:
    outcomes = run_group(_raise_on, 2, 1, expect_errors=True)
    assert outcomes[0].status == "ok" and outcomes[0].value == 0
    assert outcomes[1].status == "error" and outcomes[1].error_type == "ValueError"
    text = report(outcomes)
    assert "[rank0] ok" in text and "fails on purpose" in text


@pytest.mark.timeout(30)
def test_use_cma_false_is_honoured() -> None:
    outcomes = run_group(_describe, 2, tuning=ShmTuning(use_cma=False))
    assert [o.value["cma"] for o in outcomes] == [False, False]


# -- telling a dead peer from a live one (needs a process that exits) -------------------------
def test_process_start_time_tells_live_dead_and_reused_pids() -> None:
    me = process_start_time(os.getpid())
    assert me is not None and me == process_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(child.pid)
    deadline = time.monotonic() + 10
    while process_start_time(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not reaped: a zombie counts as dead
    assert process_start_time(child.pid) is None
    child.wait()
    watch = PeerWatch([(os.getpid(), me), (child.pid, start), (os.getpid(), (me or 0) + 1)])
    assert watch.dead([0, 1, 2]) == [1, 2]  # rank 2: same pid, other start time = reused pid
    assert PeerWatch([(child.pid, None)]).dead([0]) == []  # not watchable: left to the deadline


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

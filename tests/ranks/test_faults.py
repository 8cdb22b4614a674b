"""Dead peers and the flight recorder, on real ranks: SIGKILL mid-collective, what survivors see.

The fault injector is a rank killing itself (SIGKILL, no chance to say goodbye) at a chosen point;
it writes the time of death to a file first, so survivors can report how fast they noticed.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringlet
import spmd
from ringlet.calls import Call
from ringlet.recorder import FlightRecorder

TCP = {"RINGLET_TRANSPORT": "tcp", "RINGLET_TIMEOUT": "20"}


def _env(transport: str) -> dict[str, str]:
    """TCP, or (RINGLET_TRANSPORT unset) the shared memory ranks on one host use; a job id of
    its own, so the test can look for segments the job left in /dev/shm."""
    job = {"RINGLET_JOB_ID": f"faults{os.getpid()}x{next(_JOBS)}"}
    if transport == "auto":
        pytest.importorskip("ringlet.transport.shm")
        return {"RINGLET_TIMEOUT": "20", **job}
    return {**TCP, **job}


_JOBS = itertools.count()


def _leftover_segments(env: dict[str, str]) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if env["RINGLET_JOB_ID"] in n]


def _die(deathfile: Path) -> None:
    deathfile.write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _sockets() -> int:
    """Open sockets of this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def _aftermath(comm, exc: ringlet.PeerError, deathfile: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """What a survivor saw: the error, how long after the death, and the communicator afterwards."""
    detected = time.time()
    start = time.monotonic()
    try:
        comm.all_reduce(np.ones(2))
        later = "no error"
    except ringlet.BrokenCommunicator as broken:
        later = "" if broken.__cause__ is exc and str(exc) in str(broken) else f"cause: {broken!r}"
    except BaseException as other:
        later = repr(other)
    later_took = time.monotonic() - start
    comm.close()
    comm.close()  # closing twice is harmless
    for thread in threading.enumerate():
        if thread.name.startswith("ringlet-"):
            thread.join(timeout=2.0)  # an accept loop ends as its socket closes
    threads = [t.name for t in threading.enumerate() if t.name.startswith("ringlet-")]
    return {
        "cls": type(exc).__name__,
        "message": str(exc),
        "blamed": exc.rank,
        "detection": detected - float(deathfile.read_text()),
        "later": later,
        "later_took": later_took,
        "threads": threads,
        "sockets": _sockets(),
    }


def killed_mid_all_reduce(comm, victim: int, mib: int, deathfile: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The victim dies while every rank is inside a long all_reduce."""
    x = np.ones(mib << 18, np.float32)
    comm.all_reduce(np.ones(4))  # connections are up; the next call is the long one
    if comm.rank == victim:
        threading.Timer(0.05, _die, (deathfile,)).start()
    try:
        for _ in range(50):
            comm.all_reduce(x)
    except ringlet.PeerError as exc:
        return _aftermath(comm, exc, deathfile)
    return {"cls": "no error"}


def killed_between_calls(comm, victim: int, at: int, deathfile: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Mixed small collectives; the victim dies at call ``at``, so the others wait on a dead rank."""
    n, me = comm.size, comm.rank
    ops = [
        lambda: comm.all_reduce(np.full(7, me, np.int64)),
        lambda: comm.broadcast(np.ones(5), root=at % n),
        lambda: comm.all_gather(np.ones(3, np.float32)),
        lambda: comm.reduce_scatter(np.ones(2 * n)),
        lambda: comm.barrier(),
        lambda: comm.gather(np.ones(2), root=(at + 1) % n),
        lambda: comm.all_to_all(np.ones(n)),
    ]
    try:
        for i in range(1000):
            if i == at and me == victim:
                _die(deathfile)
            ops[i % len(ops)]()
    except ringlet.PeerError as exc:
        return _aftermath(comm, exc, deathfile)
    return {"cls": "no error"}


def _check_survivors(
    outcomes: list[tuple[str, Any]], victim: int, limit: float, env: dict[str, str]
) -> list[float]:
    """Every survivor raised PeerError naming the victim within ``limit`` s and cleaned up;
    returns the detection times."""
    assert outcomes[victim] == ("died", "killed by signal SIGKILL"), outcomes[victim]
    times = []
    for rank, (status, out) in enumerate(outcomes):
        if rank == victim:
            continue
        assert status == "ok", f"rank {rank}: {out}"
        assert out["cls"] == "PeerError", f"rank {rank}: {out}"
        assert out["blamed"] == victim and f"rank {victim}" in out["message"], out["message"]
        assert f"on rank {rank}" in out["message"], out["message"]
        assert out["detection"] < limit, f"rank {rank} took {out['detection']:.2f} s"
        assert out["later"] == "" and out["later_took"] < 0.05, out
        assert out["threads"] == [] and out["sockets"] == 0, out
        times.append(out["detection"])
    assert multiprocessing.active_children() == []  # no rank left behind
    assert _leftover_segments(env) == []
    return times


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("n", "victim", "transport"), [(3, 1, "tcp"), (3, 0, "tcp"), (3, 1, "auto")]
)
@pytest.mark.alone
def test_sigkill_during_a_64_mib_all_reduce(
    n: int, victim: int, transport: str, tmp_path: Path
) -> None:
    """Victim 0 also hosts the rendezvous store: the survivors learn it from the sockets alone."""
    env = _env(transport)
    outcomes = spmd.run(
        killed_mid_all_reduce,
        n,
        victim,
        64,
        tmp_path / "death",
        env=env,
        timeout=50,
        expect_failure=True,
    )
    times = _check_survivors(outcomes, victim, 2.0, env)
    print(
        f"detection after SIGKILL of rank {victim} of {n} in a 64 MiB all_reduce ({transport}): "
        f"max {max(times):.3f} s"
    )


@pytest.mark.alone
@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_sigkill_between_small_collectives(transport: str, tmp_path: Path) -> None:
    env = _env(transport)
    outcomes = spmd.run(
        killed_between_calls,
        4,
        2,
        37,
        tmp_path / "death",
        env=env,
        timeout=50,
        expect_failure=True,
    )
    times = _check_survivors(outcomes, 2, 2.0, env)
    print(f"detection after SIGKILL between small collectives: max {max(times):.3f} s")


@pytest.mark.slow
@pytest.mark.drill
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_repeated_random_sigkills_on_8_ranks(transport: str, tmp_path: Path) -> None:
    """Kill a random rank at a random call of 1,000 mixed collectives, again and again
    (RINGLET_KILL_RUNS times, 8 by default)."""
    rng = random.Random(6)
    slowest = 0.0
    runs = int(os.environ.get("RINGLET_KILL_RUNS", "8"))
    for run in range(runs):
        victim, at = rng.randrange(8), rng.randrange(1, 1000)
        env = _env(transport)
        outcomes = spmd.run(
            killed_between_calls,
            8,
            victim,
            at,
            tmp_path / f"death{run}",
            env=env,
            timeout=120,
            expect_failure=True,
        )
        slowest = max(slowest, *_check_survivors(outcomes, victim, 5.0, env))
    print(f"{runs} runs over {transport}: no hang, slowest detection {slowest:.3f} s")


# -- the flight recorder -------------------------------------------------------------------------
def recorded_timeout(comm) -> list[str]:  # type: ignore[no-untyped-def]
    """A few calls, then rank 1 stays away: the others dump their trace and log a summary."""
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("ringlet").addHandler(Catch())
    comm.all_reduce(np.ones(1000, np.float32))
    comm.broadcast(np.ones(3), root=1)
    comm.all_gather(np.ones(2))
    if comm.rank != 1:
        first = comm.all_reduce(np.ones(4), async_op=True, timeout=1.0)
        queued = comm.barrier(async_op=True)  # still issued when the first fails
        for work in (first, queued):
            try:
                work.wait()
            except ringlet.RingletError:
                pass
    else:
        time.sleep(2.5)
    return lines


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_flight_recorder_writes_a_trace_per_failed_rank(tmp_path: Path) -> None:
    env = {**TCP, "RINGLET_TRACE_DIR": str(tmp_path), "RINGLET_TRACE_SIZE": "4"}
    logs = spmd.run(recorded_timeout, 3, env=env, timeout=40)
    files = sorted(tmp_path.glob("ringlet-trace-*.json"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["r0.json", "r2.json"], files
    for rank, path in ((0, files[0]), (2, files[1])):
        trace = json.loads(path.read_text())
        assert (trace["rank"], trace["size"], trace["error_class"]) == (
            rank,
            3,
            "CollectiveTimeout",
        )
        calls = trace["calls"]
        # 4 kept of 5: the first all_reduce fell out of the ring buffer
        assert [c["op"] for c in calls] == ["broadcast", "all_gather", "all_reduce", "barrier"]
        assert [c["seq"] for c in calls] == [1, 2, 3, 4], calls
        done, failed, issued = calls[-3], calls[-2], calls[-1]
        assert done["state"] == "done" and done["algorithm"] and done["peers"], done
        assert done["start"] <= done["end"] and done["seconds"] >= 0, done
        assert failed["state"] == "failed" and failed["op"] == "all_reduce", failed
        assert failed["error"].startswith("CollectiveTimeout: ") and failed["algorithm"], failed
        assert failed["peers"] and set(failed["peers"]) <= {0, 1, 2} - {rank}, failed
        assert 1.0 <= failed["seconds"] < 3.0, failed
        assert issued["state"] == "issued" and issued["op"] == "barrier", issued
        summary = [line for line in logs[rank] if line.startswith(f"ringlet rank {rank} ")]
        assert len(summary) == 1 and str(path) in summary[0], logs[rank]
        assert "all_reduce(float64 (4,), op=sum) (call #3, " in summary[0], summary[0]
        assert "last completed: all_gather(float64 ()) (call #2)" in summary[0], summary[0]
        assert "\n" not in summary[0]


@pytest.mark.alone
def test_flight_recorder_costs_little_per_call() -> None:
    """The fast path adds one small object per call: issue, begin, finish stay within ~2 µs."""
    recorder = FlightRecorder(0, 2, 1, 0, "job", capacity=256)
    call = Call("all_reduce", 0, 0, "all_reduce(float32 (4,), op=sum)")
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20_000):
            entry = recorder.issue(call)
            recorder.begin(entry)
            entry.finish()
        best = min(best, (time.perf_counter() - start) / 20_000)
    print(f"flight recorder: {best * 1e6:.2f} µs per call")
    assert best < 2e-6 * 2, f"{best * 1e6:.2f} µs per call"  # 2 µs, with room for a busy machine
    assert len(recorder.entries) == 256

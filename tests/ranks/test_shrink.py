"""Surviving lost ranks on real ranks: SIGKILL, shrink, every collective on the survivors; a rank
killed during the agreement, a stopped rank kept, rank 0 (the store's host) lost; the NumPy
training drills and a replacement rejoining (the DDP drills are in test_survive_ddp.py).

The fault injector is a rank killing itself (SIGKILL, no goodbye) at a chosen point, or a survivor
stopping another with SIGSTOP and resuming it with SIGCONT.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringlet
import spmd
from ringlet import survive

_JOBS = itertools.count()
TRANSPORTS = ["tcp", "auto"]


def _env(transport: str) -> dict[str, str]:
    env = {"RINGLET_TIMEOUT": "20", "RINGLET_JOB_ID": f"shrink{os.getpid()}x{next(_JOBS)}"}
    return env | ({"RINGLET_TRANSPORT": "tcp"} if transport == "tcp" else {})


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _every_collective(comm: ringlet.Communicator) -> None:
    """Every collective of the (shrunken) communicator against a NumPy reference."""
    n, me = comm.size, comm.rank
    x = np.arange(6, dtype=np.float64) + me
    ref = sum(np.arange(6, dtype=np.float64) + r for r in range(n))
    np.testing.assert_array_equal(comm.all_reduce(x.copy()), ref)
    np.testing.assert_array_equal(comm.all_reduce(x.copy(), op="max"), x - me + n - 1)
    y = comm.reduce(x.copy(), root=n - 1)
    if me == n - 1:
        np.testing.assert_array_equal(y, ref)
    b = np.full(3, me, np.int32)
    np.testing.assert_array_equal(comm.broadcast(b, root=1), [1, 1, 1])
    got = comm.all_gather(np.full(2, me, np.int64))
    np.testing.assert_array_equal(got, np.repeat(np.arange(n), 2))
    g = comm.gather(np.full(1, me * 10), root=0)
    if me == 0:
        np.testing.assert_array_equal(g, np.arange(n) * 10)
    s = comm.scatter(np.arange(2 * n, dtype=np.float32) if me == 0 else None, root=0)
    np.testing.assert_array_equal(s, [2 * me, 2 * me + 1])
    rs = comm.reduce_scatter(np.ones(2 * n) * (me + 1))
    np.testing.assert_array_equal(rs, np.full(2, n * (n + 1) / 2))
    a2a = comm.all_to_all(np.arange(n, dtype=np.int64) + 100 * me)
    np.testing.assert_array_equal(a2a, 100 * np.arange(n) + me)
    comm.barrier()
    if n > 1:
        comm.send(np.full(4, me, np.float32), dst=(me + 1) % n)
        got_p2p = comm.recv(np.empty(4, np.float32), src=(me - 1) % n)
        np.testing.assert_array_equal(got_p2p, np.full(4, (me - 1) % n))
    assert comm.all_gather_object(me) == list(range(n))


def _lose(comm: ringlet.Communicator, victims: tuple[int, ...], at: int) -> ringlet.Communicator:
    """Small collectives until the victims kill themselves at call ``at``; shrink; return it."""
    comm.barrier()
    try:
        for i in range(1000):
            if i == at and comm.rank in victims:
                _die()
            comm.all_reduce(np.full(5, comm.rank, np.int64))
    except ringlet.PeerError:
        pass
    return survive.shrink(comm)


def killed_then_shrunk(comm: ringlet.Communicator, victims: tuple[int, ...]) -> dict[str, Any]:
    start = time.monotonic()
    new = _lose(comm, victims, 7)
    took = time.monotonic() - start
    assert new.members == [g for g in range(comm.size) if g not in victims], new.members
    assert new.rank == new.members.index(comm.rank) and new.size == len(new.members)
    _every_collective(new)
    again = new.dup()  # a shrunken communicator is a communicator like any other
    _every_collective(again)
    again.close()
    new.close()
    return {"members": new.members, "took": took}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("transport", "victims"),
    [("tcp", (2,)), ("auto", (2,)), ("tcp", (1, 3))],
    ids=["one-tcp", "one-shm", "two-at-once-tcp"],
)
def test_survivors_shrink_and_run_every_collective(
    transport: str, victims: tuple[int, ...]
) -> None:
    out = spmd.run(
        killed_then_shrunk, 4, victims, env=_env(transport), timeout=45, expect_failure=True
    )
    for r, (status, value) in enumerate(out):
        if r in victims:
            assert (status, value) == ("died", "killed by signal SIGKILL"), (r, status, value)
        else:
            assert status == "ok", f"rank {r}: {value}"
            assert value["members"] == [g for g in range(4) if g not in victims]
    print(
        f"kill {victims} ({transport}): shrink took max "
        f"{max(v['took'] for s, v in out if s == 'ok'):.3f} s after the kill"
    )


def killed_during_agreement(comm: ringlet.Communicator) -> list[int]:
    """Rank 1 dies; rank 3 dies in the agreement itself, right after it registered."""
    if comm.rank == 3:
        survive.FAULTS["registered"] = _die
    new = _lose(comm, (1,), 3)
    _every_collective(new)
    return new.members


@pytest.mark.timeout(60)
def test_rank_killed_during_the_agreement() -> None:
    out = spmd.run(killed_during_agreement, 4, env=_env("auto"), timeout=45, expect_failure=True)
    assert [s for s, _ in out] == ["ok", "died", "ok", "died"], out
    assert out[0][1] == out[2][1] == [0, 2]


def stopped_rank_kept(comm: ringlet.Communicator) -> dict[str, Any]:
    """Rank 2 stops rank 3 (SIGSTOP) for 1.5 s, then rank 1 dies: rank 3 is slow, not gone."""
    pids = comm.all_gather_object(os.getpid())
    comm.barrier()
    start = time.monotonic()
    try:
        if comm.rank == 2:
            os.kill(pids[3], signal.SIGSTOP)
            threading.Timer(1.5, os.kill, (pids[3], signal.SIGCONT)).start()
            comm.send(np.ones(1), dst=1)
        if comm.rank == 1:
            comm.recv(np.empty(1), src=2)
            _die()
        comm.all_reduce(np.ones(3))
    except ringlet.PeerError:
        pass
    new = survive.shrink(comm)
    took = time.monotonic() - start
    _every_collective(new)
    return {"members": new.members, "took": took}


@pytest.mark.timeout(60)
def test_a_stopped_rank_is_not_removed() -> None:
    out = spmd.run(stopped_rank_kept, 4, env=_env("tcp"), timeout=45, expect_failure=True)
    assert [s for s, _ in out] == ["ok", "died", "ok", "ok"], out
    for r in (0, 2, 3):
        assert out[r][1]["members"] == [0, 2, 3], out[r]
    assert out[0][1]["took"] >= 1.4, out[0]  # rank 0 waited for the stopped rank


def rank0_lost(comm: ringlet.Communicator) -> str:
    try:
        _lose(comm, (0,), 3)
    except ringlet.PeerError as exc:
        return str(exc)
    return "shrank"


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_losing_rank_0_is_a_clear_error() -> None:
    """The store lives in global rank 0's process: without it there is no agreement, and shrink
    says so (in seconds, not after the timeout)."""
    start = time.monotonic()
    out = spmd.run(rank0_lost, 3, env=_env("tcp"), timeout=45, expect_failure=True)
    assert out[0] == ("died", "killed by signal SIGKILL"), out[0]
    for status, message in out[1:]:
        assert status == "ok" and "global rank 0" in message and "cannot shrink" in message, message
    assert time.monotonic() - start < 15


# -- training that carries on ------------------------------------------------------------------
def _batch(step: int, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    x = rng.standard_normal((n, 8))
    return x, np.sin(x.sum(axis=1, keepdims=True))


def _grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of the mean squared error of a one-hidden-layer tanh MLP, summed over rows."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    err = h @ p["w2"] + p["b2"] - y
    dh = (err @ p["w2"].T) * (1 - h**2)
    return {"w2": h.T @ err, "b2": err.sum(0), "w1": x.T @ dh, "b1": dh.sum(0)}


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w1": rng.standard_normal((8, 16)) * 0.3,
        "b1": np.zeros(16),
        "w2": rng.standard_normal((16, 1)) * 0.3,
        "b2": np.zeros(1),
    }


def _numpy_loop(
    job: survive.Elastic, params: dict[str, np.ndarray], steps: int, before: Any = None
) -> dict[str, Any]:
    """SGD on the MLP, each rank a shard of the step's batch; ``before(step)`` runs first in each
    step (the fault injector). Records a digest of the parameters after every completed step."""
    digests: dict[int, float] = {}
    done: dict[int, float] = {}
    for step in job.steps(steps):
        with job.guard():
            if before is not None:
                before(step)
            c = job.comm
            x, y = _batch(step)
            mine = slice(c.rank * len(x) // c.size, (c.rank + 1) * len(x) // c.size)
            g = _grads(params, x[mine], y[mine])
            flat = np.concatenate([g[k].ravel() for k in sorted(g)])
            c.all_reduce(flat)
            flat /= len(x)  # the global batch's mean, whatever the number of ranks
            at = 0
            for k in sorted(g):
                params[k] -= 0.1 * flat[at : at + g[k].size].reshape(g[k].shape)
                at += g[k].size
        if job.step == step + 1:  # completed (a recovered step is yielded again)
            digests[step] = float(sum(v.sum() for v in params.values()))
            done[step] = time.time()
    return {
        "digests": digests,
        "done": done,
        "members": job.comm.members,
        "shrinks": job.shrinks,
        "grows": job.grows,
    }


@dataclass(frozen=True)
class Kill:
    """A drill's fault: ``victim`` SIGKILLs itself at step ``at``, writing the time to
    ``deathfile`` first (and with ``replace`` its environment, for the test to start a
    replacement with, as a launcher would)."""

    victim: int
    at: int
    deathfile: Path
    replace: bool = False


def injector(comm: ringlet.Communicator, job: survive.Elastic, kill: Kill) -> Any:
    """A drill's ``before(step)``: the kill; with ``replace`` rank 0 then waits for the
    replacement to ask."""
    victim, kill_at, deathfile, replace = kill.victim, kill.at, kill.deathfile, kill.replace

    def before(step: int) -> None:
        if step == kill_at and comm.rank == victim:
            if replace:
                env = {k: v for k, v in os.environ.items() if k.startswith("RINGLET_")}
                Path(f"{deathfile}.env").write_text(json.dumps(env))
            deathfile.write_text(repr(time.time()))
            _die()
        if replace and step == kill_at + 1 and job.comm.rank == 0:
            # training this small ends sooner than a process starts: wait for the replacement to
            # ask, unless it was admitted already, in the redo of the lost step
            while job.comm.size < comm.size and survive.pending(job.comm) == 0:
                time.sleep(0.01)

    return before


def numpy_drill(comm: ringlet.Communicator, kill: Kill, steps: int) -> dict[str, Any]:
    """4 ranks train the MLP with the NumPy loop under ``elastic``; ``kill`` strikes."""
    params = _params()
    job = survive.elastic(comm, params)
    before = injector(comm, job, kill)
    return _numpy_loop(job, params, steps, before)


def _replacement(env: dict[str, str], steps: int, out: str) -> None:
    """A new process for the lost rank: rejoin, receive the state, train to the end."""
    import traceback

    os.environ.update(env, RINGLET_RESTART_COUNT="1")
    try:
        comm = survive.init_or_rejoin()
        params = {k: np.zeros_like(v) for k, v in _params().items()}  # the members send theirs
        result = _numpy_loop(survive.elastic(comm, params), params, steps)
        comm.close()
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def _recovery(out: list[tuple[str, Any]], victim: int, kill_at: int, deathfile: Path) -> float:
    """Every survivor finished every step with the same parameters, recovering once; returns the
    time from the kill to the next completed step (slowest survivor)."""
    survivors = [v for r, (s, v) in enumerate(out) if r != victim]
    assert out[victim] == ("died", "killed by signal SIGKILL"), out[victim]
    assert all(s == "ok" for r, (s, _) in enumerate(out) if r != victim), out
    first = survivors[0]
    for v in survivors:
        assert v["digests"] == first["digests"]  # identical parameters after every step
        assert v["members"] == [g for g in range(4) if g != victim] or v["grows"]
        assert len(v["shrinks"]) == 1 and v["shrinks"][0]["lost"] == [victim], (
            "\n".join(
                f"{x['members']} {x['lost']} {x['redo']} {x['error'][:400]}" for x in v["shrinks"]
            )
            + f"\n{v['grows']}"
        )
    steps = sorted(first["digests"])
    assert steps == list(range(len(steps))) and len(steps) > kill_at
    killed = float(deathfile.read_text())
    return max(v["done"][kill_at] - killed for v in survivors)


def _drill(transport: str, runs: int, seed: int, tmp: Path) -> list[float]:
    rng = random.Random(seed)
    times = []
    for run in range(runs):
        victim, kill_at = rng.randrange(4), rng.randrange(1, 9)
        if victim == 0:
            victim = rng.randrange(1, 4)  # rank 0 hosts the store: losing it ends the job
        death = tmp / f"death{run}"
        out = spmd.run(
            numpy_drill,
            4,
            Kill(victim, kill_at, death),
            10,
            env=_env(transport),
            timeout=45,
            expect_failure=True,
        )
        times.append(_recovery(out, victim, kill_at, death))
    return times


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_numpy_training_carries_on(transport: str, tmp_path: Path) -> None:
    report(f"numpy drill ({transport})", _drill(transport, 1, 16, tmp_path))


@pytest.mark.drill
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_numpy_training_drill_20_runs(transport: str, tmp_path: Path) -> None:
    report(f"numpy drill, 20 runs ({transport})", _drill(transport, 20, 1616, tmp_path))


def report(label: str, times: list[float]) -> None:
    """Print a drill's kill -> next completed step times (median, max); every one under 5 s."""
    print(
        f"{label}: kill -> next completed step median {statistics.median(times):.3f} s,"
        f" max {max(times):.3f} s"
    )
    assert max(times) < 5.0


def with_replacement(
    drill: Any,
    args: tuple[Any, ...],
    replacement: Any,
    extra: tuple[Any, ...],
    death: Path,
    env: dict[str, str],
    timeout: float,
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """``drill(comm, *args)`` on 4 ranks while a thread plays the launcher: once the victim died
    (``death`` written), it starts ``replacement(env, *extra, out)`` with the victim's environment.
    Returns the ranks' outcomes and the replacement's result (which must not be an error)."""
    replaced, env_file = Path(f"{death}.replaced"), Path(f"{death}.env")
    procs = []

    def launcher() -> None:  # restarts the lost rank, as ringlet run --max-restarts would
        end = time.monotonic() + timeout
        while not death.exists() and time.monotonic() < end:
            time.sleep(0.01)
        if death.exists():
            victim_env = json.loads(env_file.read_text())  # written by a rank of this test
            target, more = replacement, (victim_env, *extra, str(replaced))
            p = spmd.context().Process(target=target, args=more)
            p.start()
            procs.append(p)

    watcher = threading.Thread(target=launcher)
    watcher.start()
    out = spmd.run(drill, 4, *args, env=env, timeout=timeout, expect_failure=True)
    watcher.join()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert replaced.exists(), f"the replacement did not finish: {out}"
    back = json.loads(replaced.read_text())
    assert "error" not in back, back.get("error")
    return out, back


def rejoined_at(out: list[tuple[str, Any]], back: dict[str, Any], kill_at: int) -> int:
    """The step the replacement was admitted at, once all 4 ended together with the same
    parameters after every step from there on."""
    first = out[0][1]
    assert back["members"] == first["members"] == [0, 1, 2, 3]
    assert first["grows"] and first["grows"][0]["members"] == [0, 1, 2, 3], first["grows"]
    joined = min(int(k) for k in back["digests"])
    # at kill_at when it asked before the survivors redid the step its predecessor interrupted
    assert joined == first["grows"][0]["step"] and joined >= kill_at
    assert {int(k): v for k, v in back["digests"].items()} == {
        k: v for k, v in first["digests"].items() if k >= joined
    }
    return joined


@pytest.mark.timeout(90)
def test_a_replacement_rejoins_and_receives_the_state(tmp_path: Path) -> None:
    """The victim's replacement asks to rejoin; the survivors admit it at the next step, hand it
    the step and the parameters, and all 4 finish with identical parameters."""
    death = tmp_path / "death"
    args = (Kill(2, 3, death, True), 10)
    out, back = with_replacement(numpy_drill, args, _replacement, (10,), death, _env("auto"), 60)
    _recovery(out, 2, 3, death)
    joined = rejoined_at(out, back, 3)
    print(f"replacement admitted at step {joined} (rank 2 killed at step 3)")

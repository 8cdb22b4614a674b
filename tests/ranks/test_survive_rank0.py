"""Losing global rank 0 when the rendezvous store lives outside it, as under ``ringlet run``.

The test plays node 0's launcher: it serves the store with ``launch_env.launcher_store`` (what
``ringlet run`` calls) and gives the ranks RINGLET_LAUNCHER_STORE=1, so rank 0 only joins the store.
Rank 0 is then SIGKILLed mid-training and the other three carry on, with identical parameters
after every step, under the NumPy loop and under torch's DDP. Under ``ringlet run
--max-restarts 1`` rank 0 comes back, rejoins and receives the state. Where rank 0 hosts the store
(any other launcher) its loss stays a clear error: test_shrink.py::test_losing_rank_0_is_a_clear_error.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_shrink import TRANSPORTS, Kill, _env, _recovery, numpy_drill, report

import ringlet
import spmd
from ringlet import survive
from ringlet.launch_env import launcher_store
from ringlet.rendezvous.env import LAUNCHER_STORE_VARIABLE

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "survive_mlp.py"


@contextlib.contextmanager
def store_outside(transport: str) -> Iterator[dict[str, str]]:
    """A job environment whose store this process serves, as ``ringlet run`` does."""
    env = _env(transport) | {"RINGLET_SECRET": secrets.token_hex(16), "RINGLET_WORLD_SIZE": "4"}
    envs = [env | {"RINGLET_MASTER": f"127.0.0.1:{spmd.free_port()}"}]
    server = launcher_store(envs, 0)
    assert server is not None and envs[0][LAUNCHER_STORE_VARIABLE] == "1"
    try:
        yield envs[0]
    finally:
        server.close()


def _drill(transport: str, runs: int, seed: int, tmp: Path) -> list[float]:
    """``runs`` NumPy drills, rank 0 SIGKILLed at a random step of 10; kill -> next step times."""
    rng = random.Random(seed)
    times = []
    for run in range(runs):
        kill_at = rng.randrange(1, 9)
        death = tmp / f"death{run}"
        with store_outside(transport) as env:
            out = spmd.run(
                numpy_drill, 4, Kill(0, kill_at, death), 10, env=env, timeout=45,
                expect_failure=True,
            )  # fmt: skip
        times.append(_recovery(out, 0, kill_at, death))
    return times


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rank_0_lost_the_others_train_on(transport: str, tmp_path: Path) -> None:
    """Rank 0 SIGKILLed mid-training: ranks 1-3 shrink, redo the step and finish all 10 steps
    with identical parameters after every one."""
    times = _drill(transport, 1, 4, tmp_path)
    print(f"rank 0 lost ({transport}): kill -> next completed step {times[0]:.3f} s")
    assert max(times) < 5.0


@pytest.mark.drill
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rank_0_lost_drill(transport: str, tmp_path: Path) -> None:
    """RINGLET_RANK0_DRILL_RUNS runs (10 by default), rank 0 killed at a random step each."""
    runs = int(os.environ.get("RINGLET_RANK0_DRILL_RUNS", "10"))
    report(f"rank 0 drill, {runs} runs ({transport})", _drill(transport, runs, 1600, tmp_path))


@pytest.mark.torch
@pytest.mark.timeout(300)
def test_rank_0_lost_under_torch_ddp(tmp_path: Path) -> None:
    """torch's DDP (survive.torch_ddp) on 4 ranks, rank 0 killed at step 3: the other three end
    with identical parameters after every step, those of one process on the whole batch."""
    pytest.importorskip("torch")
    from test_survive_ddp import _alone, ddp_drill

    death = tmp_path / "death"
    with store_outside("tcp") as env:
        out = spmd.run(
            ddp_drill, 4, "torch", Kill(0, 3, death), 7, env=env, timeout=200,
            expect_failure=True,
        )  # fmt: skip
    print(f"rank 0 lost under torch DDP: {_recovery(out, 0, 3, death):.3f} s to the next step")
    np.testing.assert_allclose(out[1][1]["final"], _alone(7), rtol=1e-4, atol=1e-6)


def _rejoin_rank_0(comm: ringlet.Communicator) -> str:
    """Not a replacement of rank 0 where rank 0 hosts the store: rejoin() refuses it at once."""
    comm.barrier()
    if comm.rank == 1:
        os.environ["RINGLET_RANK"] = "0"
        try:
            survive.rejoin(timeout=5)
        except ringlet.RingletError as exc:
            return str(exc)
    return "none"


@pytest.mark.timeout(60)
def test_rank_0_cannot_rejoin_where_it_hosts_the_store() -> None:
    out = spmd.run(_rejoin_rank_0, 2, env=_env("tcp"))
    assert "rank 0 hosts the store and cannot be replaced" in out[1], out


@pytest.mark.timeout(200)
def test_ringlet_run_restarts_rank_0_which_rejoins() -> None:
    """``ringlet run --max-restarts 1``: rank 0 SIGKILLs itself at step 30 of 60; the launcher
    (which serves the store) starts it again, it rejoins and receives the state from a member,
    and all 4 end with identical parameters; the job exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(spmd._SCRUB)}
    env |= {"SURVIVE_KILL": "1", "SURVIVE_VICTIM": "0", "RINGLET_TIMEOUT": "30"}
    result = subprocess.run(
        [sys.executable, "-m", "ringlet", "run", "-n", "4", "--max-restarts", "1", str(EXAMPLE)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 failed (killed by SIGKILL); restarting it (1 of 1)" in result.stderr
    done = re.findall(
        r"^\[r(\d)\] global rank \d: 60 steps on ranks \[0, 1, 2, 3\], lost (.*), parameters"
        r" digest (\S+)$",
        result.stdout,
        re.M,
    )
    assert sorted(r for r, _, _ in done) == ["0", "1", "2", "3"], result.stdout
    assert {lost for r, lost, _ in done if r != "0"} == {"[[0]]"}, done
    assert len({d for _, _, d in done}) == 1, f"parameters differ: {done}"


def test_only_ranks_meeting_at_the_launchers_store_count_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RINGLET_LAUNCHER_STORE=1 holds for the store at RINGLET_MASTER only: a process given a
    master of its own (init(master=…)) serves and meets there as under any launcher."""
    from ringlet.rendezvous import resolve
    from ringlet.world import _store_in_launcher

    for name, value in (("RINGLET_RANK", "0"), ("RINGLET_WORLD_SIZE", "4"),
                        ("RINGLET_MASTER", "127.0.0.1:4711"), ("RINGLET_SECRET", "s" * 32),
                        (LAUNCHER_STORE_VARIABLE, "1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    assert _store_in_launcher(resolve())
    assert not _store_in_launcher(resolve(master="127.0.0.1:4712"))
    assert _store_in_launcher(resolve(rank=0, world_size=4, master="127.0.0.1:4711"))
    assert not _store_in_launcher(resolve(rank=0, world_size=1))
    monkeypatch.setenv(LAUNCHER_STORE_VARIABLE, "0")
    assert not _store_in_launcher(resolve())

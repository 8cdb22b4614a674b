"""Training that carries on under DistributedDataParallel: ringlet's own, and torch's own on a
RingletProcessGroup, 4 ranks, a random rank other than 0 SIGKILLed at a random step.

Every survivor must finish every step with byte-identical parameters, recovering once; the time
from the kill to the next completed step is printed. The number of runs is a parameter
(RINGLET_DDP_DRILL_RUNS, default 20 for the drill), since each run pays four torch imports;
RINGLET_DDP_DRILL_SEED draws other victims and steps.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_shrink import (
    TRANSPORTS,
    Kill,
    _batch,
    _env,
    _recovery,
    injector,
    rejoined_at,
    with_replacement,
)

import ringlet
import spmd
from ringlet import survive

KINDS = ["ringlet", "torch"]


def _wrapper(kind: str, model: Any) -> Any:
    """``rebuild(comm)`` for the kind of DDP: a fresh wrapper on every new communicator."""
    from ringlet.torch import DistributedDataParallel

    if kind == "ringlet":
        return lambda c: DistributedDataParallel(model, comm=c)
    return lambda c: survive.torch_ddp(model, c)  # torch's DDP on a RingletProcessGroup


def _model() -> tuple[Any, Any]:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _flat(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _alone(steps: int) -> Any:
    """The parameters one process reaches on the whole batch of each step: what the ranks must
    reach whatever their number (48 rows split evenly over 4 or 3 ranks, gradients averaged)."""
    import torch

    model, opt = _model()
    for step in range(steps):
        x, y = (torch.from_numpy(a).float() for a in _batch(step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return _flat(model)


def _train(job: survive.Elastic, model: Any, opt: Any, steps: int, before: Any = None) -> Any:
    """The steps under ``job``, each on this rank's share of the step's batch; ``before(step)``
    runs first in each step (the fault injector). Digests are of the exact parameter bytes."""
    import torch

    digests: dict[int, str] = {}
    done: dict[int, float] = {}
    for step in job.steps(steps):
        with job.guard():
            if before is not None:
                before(step)
            c = job.comm
            x, y = (torch.from_numpy(a).float() for a in _batch(step))
            opt.zero_grad()
            out = job.model(x.chunk(c.size)[c.rank])
            torch.nn.functional.mse_loss(out, y.chunk(c.size)[c.rank]).backward()
            opt.step()
        if job.step == step + 1:
            digests[step] = _flat(model).tobytes().hex()
            done[step] = time.time()
    return {
        "digests": digests,
        "done": done,
        "members": job.comm.members,
        "shrinks": job.shrinks,
        "grows": job.grows,
        "final": _flat(model).tolist(),
    }


def ddp_drill(comm: ringlet.Communicator, kind: str, kill: Kill, steps: int) -> dict[str, Any]:
    """A torch MLP under DDP and SGD with momentum (optimizer state is rolled back too); ``kill``
    strikes."""
    model, opt = _model()
    job = survive.elastic(comm, [model, opt], _wrapper(kind, model))
    before = injector(comm, job, kill)
    return _train(job, model, opt, steps, before)


def _replacement(env: dict[str, str], kind: str, steps: int, out: str) -> None:
    """A new process for the lost rank: rejoin, receive the model and optimizer, train on."""
    import traceback

    import torch

    os.environ.update(env, RINGLET_RESTART_COUNT="1")
    try:
        comm = survive.init_or_rejoin()
        model, opt = _model()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # the members send theirs
        result = _train(
            survive.elastic(comm, [model, opt], _wrapper(kind, model)), model, opt, steps
        )
        comm.close()
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def _drill(kind: str, transport: str, runs: int, tmp: Path) -> list[float]:
    rng = random.Random(int(os.environ.get("RINGLET_DDP_DRILL_SEED", "1617")))  # victims, steps
    times = []
    for run in range(runs):
        victim, kill_at = rng.randrange(1, 4), rng.randrange(1, 6)
        death = tmp / f"death{run}"
        out = spmd.run(
            ddp_drill,
            4,
            kind,
            Kill(victim, kill_at, death),
            7,
            env=_env(transport),
            timeout=120,
            expect_failure=True,
        )
        times.append(_recovery(out, victim, kill_at, death))
        np.testing.assert_allclose(out[0][1]["final"], _alone(7), rtol=1e-4, atol=1e-6)
    print(
        f"{kind} DDP drill, {len(times)} runs ({transport}): kill -> next completed step median "
        f"{statistics.median(times):.3f} s, max {max(times):.3f} s"
    )
    return times


@pytest.mark.torch
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind", [k if k == "ringlet" else pytest.param(k, marks=pytest.mark.long) for k in KINDS]
)
def test_ddp_training_carries_on(kind: str, tmp_path: Path) -> None:
    """One run over TCP per kind of DDP; by default ringlet's only (the drill runs both kinds on
    both transports, and test_survive_rank0 torch's DDP losing rank 0)."""
    pytest.importorskip("torch")
    assert max(_drill(kind, "tcp", 1, tmp_path)) < 5.0


@pytest.mark.torch
@pytest.mark.drill
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_training_drill(kind: str, transport: str, tmp_path: Path) -> None:
    """RINGLET_DDP_DRILL_RUNS runs (20 by default) per kind of DDP and transport."""
    pytest.importorskip("torch")
    runs = int(os.environ.get("RINGLET_DDP_DRILL_RUNS", "20"))
    assert max(_drill(kind, transport, runs, tmp_path)) < 5.0


@pytest.mark.torch
@pytest.mark.timeout(300)
def test_a_replacement_rejoins_under_torch_ddp(tmp_path: Path) -> None:
    """Rank 2 dies at step 2 of torch's DDP; its replacement (a fresh process with zeroed
    parameters) rejoins, receives model and optimizer state, and all 4 end with identical
    parameters, those of one process training on the whole batch."""
    death = tmp_path / "death"
    args = ("torch", Kill(2, 2, death, True), 7)
    out, back = with_replacement(
        ddp_drill, args, _replacement, ("torch", 7), death, _env("tcp"), 200
    )
    _recovery(out, 2, 2, death)
    rejoined_at(out, back, 2)
    np.testing.assert_allclose(back["final"], _alone(7), rtol=1e-4, atol=1e-6)

"""Train an MLP on 4 ranks while one is SIGKILLed and then replaced (ringlet.elastic, rejoin).

    python examples/survive_mlp.py            # starts 4 ranks itself, kills rank 2 at step 30,
                                              # starts its replacement, checks the result
    ringlet run -n 4 examples/survive_mlp.py  # the same training, nobody killed
    SURVIVE_KILL=1 ringlet run -n 4 --max-restarts 1 examples/survive_mlp.py  # killed, restarted
    SURVIVE_KILL=1 SURVIVE_VICTIM=0 ringlet run -n 4 --max-restarts 1 examples/survive_mlp.py

Each rank trains on its shard of every step's batch and averages the gradients with all_reduce.
When rank 2 dies, the others shrink to 3 ranks, roll back and redo the step it interrupted; the
replacement (started here the way ``ringlet run --max-restarts 1`` does) rejoins at the next
step, receives the step number and the parameters from a member, and the 4 finish together.
SURVIVE_VICTIM picks another victim; rank 0 can be lost only under ``ringlet run``, whose
launcher hosts the rendezvous store (started here, rank 0 hosts it).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import ringlet
from ringlet import survive

STEPS, KILL_AT = 60, 30
VICTIM = int(os.environ.get("SURVIVE_VICTIM", "2"))


def grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of the squared error of a one-hidden-layer tanh MLP, summed over the rows."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    err = h @ p["w2"] + p["b2"] - y
    dh = (err @ p["w2"].T) * (1 - h**2)
    return {"w2": h.T @ err, "b2": err.sum(0), "w1": x.T @ dh, "b1": dh.sum(0)}


def train() -> None:
    # a restarted rank (RINGLET_RESTART_COUNT=1, as ringlet run --max-restarts sets) rejoins
    comm = survive.init_or_rejoin()
    kill = os.environ.get("SURVIVE_KILL") == "1" and os.environ.get("RINGLET_RESTART_COUNT") is None
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((8, 32)) * 0.3,
        "b1": np.zeros(32),
        "w2": rng.standard_normal((32, 1)) * 0.3,
        "b2": np.zeros(1),
    }
    job = ringlet.elastic(comm, params)  # a replacement receives the step and params here
    for step in job.steps(STEPS):
        with job.guard():  # a lost rank: shrink, roll back, and this step comes again
            if kill and step == KILL_AT and comm.rank == VICTIM:
                os.kill(os.getpid(), signal.SIGKILL)
            if kill and step == KILL_AT + 1 and job.comm.rank == 0:
                # a toy trains faster than a process starts: wait for the replacement, unless it
                # was admitted already (then nothing is pending, and waiting would never end)
                while job.comm.size < comm.size and survive.pending(job.comm) == 0:
                    time.sleep(0.01)
            c = job.comm
            batch = np.random.default_rng(step)
            x = batch.standard_normal((48, 8))
            y = np.sin(x.sum(axis=1, keepdims=True))
            mine = slice(c.rank * 48 // c.size, (c.rank + 1) * 48 // c.size)
            g = grads(params, x[mine], y[mine])
            flat = c.all_reduce(np.concatenate([g[k].ravel() for k in sorted(g)])) / 48
            at = 0
            for k in sorted(g):
                params[k] -= 0.1 * flat[at : at + g[k].size].reshape(g[k].shape)
                at += g[k].size
    digest = sum(float(v.sum()) for v in params.values())
    lost = [s["lost"] for s in job.shrinks]
    print(
        f"global rank {comm.world.rank}: {STEPS} steps on ranks {job.comm.members}, lost {lost},"
        f" parameters digest {digest!r}",
        flush=True,
    )
    job.comm.close()
    comm.close()


def launch() -> int:
    """Start 4 ranks, the victim told to die; start its replacement when it does; compare."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {
        **os.environ,
        "RINGLET_WORLD_SIZE": "4",
        "RINGLET_MASTER": f"127.0.0.1:{port}",
        "RINGLET_SECRET": secrets.token_hex(16),
        "SURVIVE_KILL": "1",
    }

    def start(rank: int, **extra: str) -> subprocess.Popen[str]:
        env = {**base, "RINGLET_RANK": str(rank), **extra}
        return subprocess.Popen(
            [sys.executable, __file__], env=env, stdout=subprocess.PIPE, text=True
        )

    ranks = [start(r) for r in range(4)]
    ranks[VICTIM].wait()
    print(f"rank {VICTIM} exited with {ranks[VICTIM].returncode}; starting its replacement")
    ranks[VICTIM] = start(VICTIM, RINGLET_RESTART_COUNT="1")
    lines = [p.communicate(timeout=120)[0].strip() for p in ranks]
    print("\n".join(lines))
    digests = {line.rsplit(" ", 1)[-1] for line in lines}
    ok = all(p.returncode == 0 for p in ranks) and len(digests) == 1
    print("identical parameters on all 4 ranks" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if "RINGLET_RANK" in os.environ or "RANK" in os.environ:
        train()
    else:
        sys.exit(launch())

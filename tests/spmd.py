"""Run a test body on N real ranks (spawned processes, real store, real transports).

``run(fn, n, *args)`` starts n processes, each calling ``ringlet.init()`` from the environment a
launcher would give it and then ``fn(comm, *args)``; it returns the n results in rank order. On any
failure it raises one AssertionError reporting every rank: "ok", its traceback, "timed out" with a
stack dump, or "killed by signal N" — not just the first.

Ranks are forked from one fork server per test session that has NumPy, ml_dtypes and ringlet
imported already (``context()``): a rank then starts in milliseconds, not after the ~1.4 s of CPU
those imports cost a fresh interpreter (ml_dtypes alone ~0.9 s), which on a 2-core machine was
most of the time of a small job. The fork server itself only imports; it never opens a
communicator, so every rank starts clean.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

WORLD_SIZES = [1, 2, 3, 4, 5, 8]

#: What the fork server imports before it forks any rank (a module that is missing is skipped).
PRELOAD = [
    "numpy",
    "ml_dtypes",
    "ringlet",
    "ringlet.world",  # `import ringlet` alone loads no submodule; init() and comm come from here
    "ringlet.comm",
    "ringlet.transport.shm",
    "ringlet.transport.shm_p2p",
    "ringlet.transport.tcp",
    "hypothesis",
    "torch",  # ~1.5 s of CPU per rank that imports it (a torch test's ranks all do)
    "torch.distributed",
    "torch.nn",
]


def context() -> Any:
    """The multiprocessing context every multi-rank test starts its ranks with: "forkserver"
    with PRELOAD imported. The server starts on first use and records ``sys.path`` then, so test
    modules (imported by each rank to find its body) resolve as in the parent."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rank_env(rank: int, size: int, port: int, secret: str, mode: str) -> dict[str, str]:
    """The variables a launcher of kind ``mode`` would set for ``rank``."""
    if mode == "ringlet":
        return {
            "RINGLET_RANK": str(rank),
            "RINGLET_WORLD_SIZE": str(size),
            "RINGLET_MASTER": f"127.0.0.1:{port}",
            "RINGLET_SECRET": secret,
        }
    if mode == "torchrun":
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RINGLET_SECRET": secret,
        }
    if mode == "slurm":
        return {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(size),
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": str(port),
            "RINGLET_SECRET": secret,
        }
    raise ValueError(mode)


_SCRUB = (
    "RINGLET_",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_",
    "SLURM_",
    "OMPI_",
    "PMI_",
    "TORCHELASTIC",
)


def _child(
    fn: Callable[..., Any],
    rank: int,
    env: dict[str, str],
    args: tuple[Any, ...],
    results: Any,
    log: str,
    timeout: float,
) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    faulthandler.dump_traceback_later(max(1.0, timeout - 1.0), exit=False)
    for k in list(os.environ):
        if k.startswith(_SCRUB):
            del os.environ[k]
    os.environ.update(env)
    try:
        import ringlet

        with ringlet.init() as comm:
            out = fn(comm, *args)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


#: What rank 0 raises when the port free_port() gave was taken before its store could listen (by
#: another job on this machine: CI and other test runs share it); the job is then started again.
_PORT_TAKEN = ("the rendezvous store cannot listen on", "Address already in use")


def _port_taken(outcome: dict[int, tuple[str, Any]]) -> bool:
    status, value = outcome.get(0, ("ok", None))
    return status == "error" and all(part in str(value) for part in _PORT_TAKEN)


def _start(
    fn: Callable[..., Any],
    n: int,
    args: tuple[Any, ...],
    timeout: float,
    mode: str,
    env: dict[str, str] | None,
    per_rank_env: Callable[[int], dict[str, str]] | None,
    logdir: Path,
) -> dict[int, tuple[str, Any]]:
    """One attempt at the job: every rank's ("ok" | "error" | "died", value)."""
    ctx = context()
    results = ctx.Queue()
    port, secret = free_port(), secrets.token_hex(16)
    procs = []
    for r in range(n):
        e = (
            rank_env(r, n, port, secret, mode)
            | (env or {})
            | (per_rank_env(r) if per_rank_env else {})
        )
        p = ctx.Process(
            target=_child,
            args=(fn, r, e, args, results, str(logdir / f"r{r}.log"), timeout),
            daemon=True,
        )
        p.start()
        procs.append(p)
    outcome: dict[int, tuple[str, Any]] = {}
    end = time.monotonic() + timeout
    while len(outcome) < n and time.monotonic() < end and not _port_taken(outcome):
        try:
            rank, status, value = results.get(timeout=0.1)
            outcome[rank] = (status, value)
        except Exception:  # queue.Empty
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    if _port_taken(outcome):  # the others wait for a store that is not theirs: start again now
        end = time.monotonic()
    for r, p in enumerate(procs):
        p.join(timeout=max(0.1, min(5.0, end - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
            outcome.setdefault(r, ("died", f"timed out after {timeout} s"))
        elif r not in outcome:
            code = p.exitcode or 0
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
            outcome[r] = ("died", how)
    return outcome


def run(
    fn: Callable[..., Any],
    n: int,
    *args: Any,
    timeout: float = 60.0,
    mode: str = "ringlet",
    env: dict[str, str] | None = None,
    per_rank_env: Callable[[int], dict[str, str]] | None = None,
    expect_failure: bool = False,
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``n`` ranks; return the results, or (with ``expect_failure``) the
    per-rank outcomes as ``("ok", result)`` / ``("error", traceback)`` / ``("died", description)``.
    A job whose store port was taken by another process first is started again on a new port (up
    to three times), since no rank of it ran the body."""
    logdir = Path(tempfile.mkdtemp(prefix="ringlet-test-"))
    try:
        for _ in range(3):
            outcome = _start(fn, n, args, timeout, mode, env, per_rank_env, logdir)
            if not _port_taken(outcome):
                break
        if expect_failure:
            return [outcome[r] for r in range(n)]
        if any(outcome[r][0] != "ok" for r in range(n)):
            report = []
            for r in range(n):
                status, value = outcome[r]
                text = "ok" if status == "ok" else str(value)
                path = logdir / f"r{r}.log"
                log = path.read_text(errors="replace").strip() if path.exists() else ""
                if status != "ok" and log:
                    text += f"\n--- stderr of rank {r} ---\n{log[-4000:]}"
                report.append(f"===== rank {r}: {text}")
            raise AssertionError(f"{fn.__name__} failed on {n} ranks:\n" + "\n".join(report))
        return [outcome[r][1] for r in range(n)]
    finally:
        shutil.rmtree(logdir, ignore_errors=True)  # the report above carries what mattered


def concurrently(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run independent jobs (each a call of ``run``) at the same time and return their results by
    name: for jobs that mostly wait (timeouts, sleeps, a failure to detect), so their waits
    overlap. If any job fails, one AssertionError names every failed job with its report."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    failed = [(name, f.exception()) for name, f in futures.items() if f.exception() is not None]
    if failed:
        raise AssertionError(
            "\n".join(f"===== job {name}: {type(exc).__name__}: {exc}" for name, exc in failed)
        )
    return {name: f.result() for name, f in futures.items()}

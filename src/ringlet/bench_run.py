"""Running `ringlet bench` in the ranks: ringlet itself, then Gloo in the same processes, then
MPI as a separate `mpiexec` job started by rank 0; records go to a sink on rank 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .bench_backends import (
    GLOO_DTYPES,
    Backend,
    GlooBackend,
    MpiBackend,
    RingletBackend,
    master_host,
    measure,
)
from .bench_cases import Case, make_case


def plan(args: argparse.Namespace, ranks: int) -> list[Case]:
    """The cases to run, op by op; sizes that round to the same case run once."""
    cases: dict[tuple[str, int], Case] = {}
    for op in args.op_list:
        for size in args.size_list:
            case = make_case(op, size, args.dtype_obj, ranks)
            cases.setdefault((op, case.nbytes), case)
    return list(cases.values())


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options that tell a rank (or an MPI rank) what to measure."""
    out = ["--ops", ",".join(args.op_list), "--sizes", args.sizes, "--dtype", args.dtype,
           "--iters", str(args.iters), "--warmup", str(args.warmup)]  # fmt: skip
    if args.transport:
        out += ["--transport", args.transport]
    if args.algo:
        out += ["--algo", args.algo]
    return out


def run_cases(backend: Backend, cases: list[Case], args: argparse.Namespace, sink: Any) -> None:
    """Every case on one backend; rank 0 hands the records to `sink`."""
    reason = backend.unsupported(args.dtype_obj)
    if sink is not None:
        sink.add(backend.info())
    if reason is not None:
        if sink is not None:
            sink.add({"kind": "skip", "backend": backend.name, "reason": reason,
                      "cases": len(cases)})  # fmt: skip
        return
    for case in cases:
        record = measure(backend, case, args.iters, args.warmup)
        if sink is not None:
            sink.add(record)


def run_in_ranks(args: argparse.Namespace, sink: Any) -> int:
    """Run in the current job: ringlet (then the comparisons), or one other library alone."""
    if args.backend == "mpi":
        mpi = MpiBackend()
        run_cases(mpi, plan(args, mpi.size), args, sink if mpi.rank == 0 else None)
        return 0
    if args.backend == "gloo":
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        gloo = GlooBackend(None, rank, size, _timeout())
        run_cases(gloo, plan(args, size), args, sink if rank == 0 else None)
        gloo.close()
        return 0
    if args.transport:
        os.environ["RINGLET_TRANSPORT"] = args.transport
    import ringlet

    try:
        comm = ringlet.init()
    except ValueError as error:
        print(
            f"ringlet bench: no job to join ({error}); use -n N to start N local ranks, or "
            "start it with `ringlet run -n N python -m ringlet bench …`",
            file=sys.stderr,
        )
        return 2
    rank, size, single_host = comm.rank, comm.size, comm.local_size == comm.size
    sink = sink if rank == 0 else None
    cases = plan(args, size)
    run_cases(RingletBackend(comm, args.algos), cases, args, sink)
    if "gloo" in args.compare_list:
        _run_gloo(comm, cases, args, sink)
    else:
        comm.close()
    if "mpi" in args.compare_list and rank == 0:
        _run_mpi(size, single_host, len(cases), args, sink)
    return 0


def _timeout() -> float:
    return float(os.environ.get("RINGLET_TIMEOUT") or 300.0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def _run_gloo(comm: Any, cases: list[Case], args: argparse.Namespace, sink: Any) -> None:
    """Gloo in these processes, after ringlet; ringlet's job agrees on its address first."""
    missing = importlib.util.find_spec("torch") is None
    port = comm.broadcast_object(_free_port() if comm.rank == 0 else None)
    any_missing = any(comm.all_gather_object(missing))
    rank, size = comm.rank, comm.size
    comm.close()  # frees its connections and threads before Gloo starts its own
    if any_missing:
        if sink is not None:
            sink.add(
                {
                    "kind": "skip",
                    "backend": "gloo",
                    "cases": len(cases),
                    "reason": "torch is not importable on every rank (pip install torch)",
                }
            )
        return
    gloo = GlooBackend(f"tcp://{master_host()}:{port}", rank, size, _timeout())
    try:
        run_cases(gloo, cases, args, sink)
    finally:
        gloo.close()


def comparison_problems(names: list[str], dtype: Any) -> list[str]:
    """Why each requested comparison cannot run here, checked before anything starts (empty: all
    can). A comparison that fails later, on another rank, is a skip record instead."""
    problems = []
    if "gloo" in names:
        if not _importable("torch"):
            problems.append("--compare gloo needs torch, which is not importable here "
                            "(pip install 'torch==2.13.0')")  # fmt: skip
        elif dtype.name not in GLOO_DTYPES:
            problems.append(f"--compare gloo: torch.distributed's gloo backend does not reduce "
                            f"{dtype.name}")  # fmt: skip
    if "mpi" in names:
        if not _importable("mpi4py"):
            problems.append("--compare mpi needs mpi4py, which is not importable here "
                            "(pip install mpi4py mpich)")  # fmt: skip
        elif mpiexec_path() is None:
            problems.append("--compare mpi needs mpiexec, found neither next to this Python nor "
                            "on PATH (pip install mpich)")  # fmt: skip
    return problems


def _importable(name: str) -> bool:
    """Whether `import name` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def mpiexec_path() -> str | None:
    """mpiexec next to this Python (the mpich wheel installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _run_mpi(
    size: int, single_host: bool, ncases: int, args: argparse.Namespace, sink: Any
) -> None:
    """Rank 0 only: `mpiexec -n size` a `--backend mpi` run and pass its records on."""

    def skip(reason: str) -> None:
        if sink is not None:
            sink.add({"kind": "skip", "backend": "mpi", "reason": reason, "cases": ncases})

    mpiexec = mpiexec_path()
    if not single_host:
        return skip("the MPI comparison starts its ranks on this host only")
    if importlib.util.find_spec("mpi4py") is None:
        return skip("mpi4py is not importable (pip install mpi4py mpich)")
    if mpiexec is None:
        return skip("no mpiexec next to this Python or on PATH (pip install mpich)")
    cmd = [mpiexec, "-n", str(size), sys.executable, "-m", "ringlet.bench", "--backend", "mpi",
           "--results", "-", *worker_args(args)]  # fmt: skip
    # A launcher's variables would make MPI think it runs inside another job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    got = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(line, end="", file=sys.stderr)
                continue
            got += record["kind"] == "result"
            if sink is not None:
                sink.add(record)
    if child.returncode != 0:
        reason = f"mpiexec exited with code {child.returncode} after {got} of {ncases} cases"
        if sink is not None:
            sink.add({"kind": "skip", "backend": "mpi", "reason": reason, "cases": ncases - got})
    return None

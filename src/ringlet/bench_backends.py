"""The libraries `ringlet bench` times — ringlet, torch.distributed's Gloo, mpi4py — and the one loop
that times them all alike.

Each backend turns a Case and its NumPy buffers into a step (one collective call, the same buffers
every time) and offers the barrier and the max over ranks that the loop needs. Everything a
comparison could be unfair about — buffers, check, warmup, barrier, timing, max over ranks — lives in
`measure`, once for every backend.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np

from .bench_cases import ROOT, Case, bandwidths, check_result, format_size, iterations, rank_input

Step = Callable[[], "np.ndarray | None"]


class Backend:
    """One library running on this rank; subclasses fill in the four methods below."""

    name = ""
    rank = 0
    size = 1
    transport = ""  # how it moves data here, for the report
    version = ""

    def unsupported(self, dtype: np.dtype) -> str | None:
        """Why this backend cannot run `dtype`, or None."""
        return None

    def step(self, case: Case, send: np.ndarray | None, recv: np.ndarray) -> Step:
        """One call of `case` on these buffers; returns the array holding this rank's result."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def max_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """Element-wise max of a float64 vector over all ranks (outside any timed region)."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave the job; the backend is unusable afterwards."""

    def info(self) -> dict[str, Any]:
        """The report's record describing this backend."""
        return {
            "kind": "info",
            "backend": self.name,
            "version": self.version,
            "transport": self.transport,
            "ranks": self.size,
            "machine": machine(),
        }


def machine() -> str:
    """This machine for a report or plot title: its CPU model and how many CPUs this process
    may use, e.g. 'AMD EPYC 7B13, 2 CPUs'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{' '.join(model.split())}, {cpus} CPUs"


def measure(backend: Backend, case: Case, iters: int, warmup: int) -> dict[str, Any]:
    """Check one call, warm up, barrier, time `iters` calls; the record of the result.

    Each rank times every call; a call's time is the slowest rank's. Reported: the median of those
    and the mean (the slowest rank's whole loop / iters); bandwidths come from the median.
    """
    rank = backend.rank
    send = rank_input(case, rank)
    recv = np.empty(case.count_out, case.dtype)  # pages of an unused output are never touched
    step = backend.step(case, send, recv)
    backend.barrier()
    problem = check_result(case, rank, step())
    flags = np.zeros(case.ranks)
    if problem is not None:
        flags[rank] = 1.0
        print(
            f"ringlet bench: {backend.name} {case.op} {format_size(case.nbytes)} gave a wrong "
            f"result on rank {rank}: {problem}",
            file=sys.stderr,
            flush=True,
        )
    wrong = [r for r, flag in enumerate(backend.max_over_ranks(flags)) if flag]
    if send is not None:
        send[...] = 0  # in-place reductions of zeros stay finite however many iterations run
    timed, warm = iterations(iters, warmup, case.nbytes)
    for _ in range(warm):
        step()
    backend.barrier()
    times = np.empty(timed + 1)
    start = time.perf_counter()
    for i in range(timed):
        began = time.perf_counter()
        step()
        times[i] = time.perf_counter() - began
    times[timed] = time.perf_counter() - start
    slowest = backend.max_over_ranks(times)
    median = float(np.median(slowest[:timed]))
    algbw, busbw = bandwidths(case.op, case.nbytes, median, case.ranks)
    return {
        "kind": "result", "backend": backend.name, "transport": backend.transport,
        "op": case.op, "bytes": case.nbytes, "count": case.nbytes // case.dtype.itemsize,
        "dtype": case.dtype.name, "ranks": case.ranks, "iters": timed, "warmup": warm,
        "time_us": median * 1e6, "mean_us": float(slowest[timed]) / timed * 1e6,
        "algbw_gbps": algbw, "busbw_gbps": busbw,
        "check": "ok" if not wrong else "WRONG on rank " + ", ".join(map(str, wrong)),
    }  # fmt: skip


class RingletBackend(Backend):
    """ringlet's Communicator; `algos` maps an op to the algorithm forced with `algo=`."""

    name = "ringlet"

    def __init__(self, comm: Any, algos: dict[str, str] | None = None) -> None:
        from ringlet import __version__

        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.algos = algos or {}
        self.version = __version__
        # The shared-memory group is internal; the report only needs to know whether it is used.
        self.transport = comm.transport
        if self.size == 1:
            self.transport = "none"

    def step(self, case: Case, send: np.ndarray | None, recv: np.ndarray) -> Step:
        comm, algo, op = self.comm, self.algos.get(case.op), case.op
        calls: dict[str, Step] = {
            "all_reduce": lambda: comm.all_reduce(send, algo=algo),
            "broadcast": lambda: comm.broadcast(send, root=ROOT, algo=algo),
            "reduce": lambda: comm.reduce(send, root=ROOT, algo=algo),
            "all_gather": lambda: comm.all_gather(send, algo=algo),
            "gather": lambda: comm.gather(send, root=ROOT, algo=algo),
            "scatter": lambda: comm.scatter(send, root=ROOT, algo=algo),
            "reduce_scatter": lambda: comm.reduce_scatter(send, algo=algo),
            "all_to_all": lambda: comm.all_to_all(send, algo=algo),
        }
        return calls[op]

    def barrier(self) -> None:
        self.comm.barrier()

    def max_over_ranks(self, values: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.comm.all_reduce(values.astype(np.float64), op="max")
        return out

    def close(self) -> None:
        self.comm.close()


GLOO_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64",
                "complex64", "complex128"}  # fmt: skip


class GlooBackend(Backend):
    """torch.distributed with the "gloo" backend on CPU tensors sharing memory with NumPy buffers."""

    name = "gloo"
    transport = "tcp"

    def __init__(self, init_method: str | None, rank: int, size: int, timeout: float) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.version = f"torch {torch.__version__}"
        self.rank, self.size = rank, size
        dist.init_process_group(
            "gloo",
            init_method=init_method or "env://",
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout),
        )

    def unsupported(self, dtype: np.dtype) -> str | None:
        if dtype.name not in GLOO_DTYPES:
            return f"torch.distributed's gloo backend does not reduce {dtype.name}"
        return None

    def _tensor(self, arr: np.ndarray) -> Any:
        if arr.dtype.name == "bfloat16":  # torch cannot wrap ml_dtypes' bfloat16 directly
            return self.torch.from_numpy(arr.view(np.int16)).view(self.torch.bfloat16)
        return self.torch.from_numpy(arr)

    def step(self, case: Case, send: np.ndarray | None, recv: np.ndarray) -> Step:
        dist, n, root = self.dist, self.size, self.rank == ROOT
        src = self._tensor(send) if send is not None else None
        out = self._tensor(recv)
        parts = list(src.chunk(n)) if src is not None else None
        slots = list(out.chunk(n)) if root else None
        # torch 2.13 renamed the flat-tensor collectives; older versions have only the old names.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

        def run(call: Callable[[], object], result: np.ndarray | None) -> Step:
            return lambda: (call(), result)[1]

        steps: dict[str, Step] = {
            "all_reduce": run(lambda: dist.all_reduce(src), send),
            "broadcast": run(lambda: dist.broadcast(src, ROOT), send),
            "reduce": run(lambda: dist.reduce(src, ROOT), send if root else None),
            "all_gather": run(lambda: all_gather(out, src), recv),
            "gather": run(lambda: dist.gather(src, slots, dst=ROOT), recv if root else None),
            "scatter": run(lambda: dist.scatter(out, parts if root else None, src=ROOT), recv),
            "reduce_scatter": run(lambda: reduce_scatter(out, src), recv),
            "all_to_all": run(lambda: dist.all_to_all_single(out, src), recv),
        }
        return steps[case.op]

    def barrier(self) -> None:
        self.dist.barrier()

    def max_over_ranks(self, values: np.ndarray) -> np.ndarray:
        tensor = self.torch.from_numpy(values.astype(np.float64))
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)
        out: np.ndarray = tensor.numpy()
        return out

    def close(self) -> None:
        self.dist.destroy_process_group()


class MpiBackend(Backend):
    """mpi4py's buffer (upper-case) collectives on MPI.COMM_WORLD, in place where MPI allows."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        library = MPI.Get_library_version().split("\n")[0].split()
        self.version = " ".join(word for word in library[:3] if word != "Version:")
        self.transport = "mpi"

    def unsupported(self, dtype: np.dtype) -> str | None:
        from mpi4py.util import dtlib

        try:
            dtlib.from_numpy_dtype(dtype)
        except (KeyError, ValueError, TypeError) as error:
            return f"mpi4py has no MPI datatype for {dtype.name} ({error})"
        return None

    def step(self, case: Case, send: np.ndarray | None, recv: np.ndarray) -> Step:
        comm, mpi, root = self.comm, self.mpi, self.rank == ROOT

        def run(call: Callable[[], object], result: np.ndarray | None) -> Step:
            return lambda: (call(), result)[1]

        def reduce() -> None:
            if root:
                comm.Reduce(mpi.IN_PLACE, send, root=ROOT)
            else:
                comm.Reduce(send, None, root=ROOT)

        steps: dict[str, Step] = {
            "all_reduce": run(lambda: comm.Allreduce(mpi.IN_PLACE, send), send),
            "broadcast": run(lambda: comm.Bcast(send, root=ROOT), send),
            "reduce": run(reduce, send if root else None),
            "all_gather": run(lambda: comm.Allgather(send, recv), recv),
            "gather": run(lambda: comm.Gather(send, recv if root else None, root=ROOT),
                          recv if root else None),
            "scatter": run(lambda: comm.Scatter(send, recv, root=ROOT), recv),
            "reduce_scatter": run(lambda: comm.Reduce_scatter_block(send, recv), recv),
            "all_to_all": run(lambda: comm.Alltoall(send, recv), recv),
        }  # fmt: skip
        return steps[case.op]

    def barrier(self) -> None:
        self.comm.Barrier()

    def max_over_ranks(self, values: np.ndarray) -> np.ndarray:
        out = values.astype(np.float64)
        self.comm.Allreduce(self.mpi.IN_PLACE, out, op=self.mpi.MAX)
        return out


def master_host() -> str:
    """The rendezvous host of the current job (where rank 0 listens), from the launcher's variables."""
    if host := os.environ.get("MASTER_ADDR"):
        return host
    master = os.environ.get("RINGLET_MASTER", "127.0.0.1:0")
    return master.rpartition(":")[0].strip("[]") or "127.0.0.1"

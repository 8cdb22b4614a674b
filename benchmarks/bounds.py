"""What bounds each collective on one host: Python calls, waiting, copies and wake-ups per call.

    ringlet run -n 2 python benchmarks/bounds.py [--ops all_reduce,gather] [--sizes 8,64K,1M,16M]
    ringlet run -n 4 python benchmarks/bounds.py --json        # JSON lines instead of the table

For every op and size each rank runs a warm-up, ``--repeat`` plain timed loops (the best is the
time per call: on a shared machine the slower ones time the other jobs), and one loop under
cProfile with counting wrappers installed, from which come the function calls per call
(cProfile's total_calls, Python and builtin, the wrappers' own calls taken out; in brackets those
made from the wait loops, which vary with how long a rank waits), the top three functions by own
time, the shares of the profiled time spent waiting for peers (in shm_wait's Waiter._wait_slow
and shm_p2p's ShmTransport._wait, less the message steps that loop makes) and in the counted
copies and folds, and the futex waits and wakes and sched_yield calls per call (call counts).
Over the plain loops getrusage gives page faults and voluntary (sleeps) and involuntary
(preempted) context switches per call; the flight recorder names the way the last call went.

Bytes are counted, not inferred from the algorithm: wrappers sum the bytes of every NumPy copy
(np.copyto, np.concatenate, a copying np.ascontiguousarray), of every fold through the one reduce
kernel (the ufuncs behind ringlet.ops.binary: the output's bytes), of the schedule's copies (each
Copy of a round the engine runs is one memoryview copy), of every cross-memory read or
write (CrossMemory.read/write), of the slot copies of the shared-memory transport (each message of
ShmTransport.exchange that does not go by cross-memory copy is one memoryview copy on each side)
and of the eager records' and scatter header's byte strings. Each is divided by the call's size
as `ringlet bench` defines it (an all_gather's output, a scatter's input, an all_to_all's whole
buffer). Rank 0 prints its rows and, for rooted ops, those of the other side (root 0: rank 1).

Last, the copy-rate ceiling of this machine, from ringlet.calibrate's own measuring functions:
memcpy (np.copyto) in cache (256 KiB) and out of it (64 MiB), and process_vm_readv at 1 and 64 MiB.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ringlet
from ringlet import blocks, calibrate, eager, engine, ops
from ringlet.bench_cases import OPS, format_size, make_case, parse_sizes, rank_input
from ringlet.transport import cma as cma_module
from ringlet.transport import shm_mailboxes, shm_p2p, shm_wait

ROOTED = ("broadcast", "reduce", "gather", "scatter")
DEFAULT_SIZES = "8,64K,1M,16M"
#: Bytes a plain (or profiled) loop moves at most before its iteration count is scaled down.
PLAIN_BUDGET, PROFILE_BUDGET = 128 << 20, 64 << 20
KINDS = ("copy", "fold", "cma", "slot", "sched", "bytes")


class Tally:
    """Bytes counted by the wrappers while :attr:`on`, and how often a wrapper ran."""

    def __init__(self) -> None:
        self.on = False
        self.bytes = dict.fromkeys(KINDS, 0)
        self.wrapper_calls = 0

    def add(self, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` of ``kind`` (one wrapper call) when counting is on."""
        if self.on:
            self.bytes[kind] += int(nbytes)
            self.wrapper_calls += 1

    def reset(self) -> None:
        """Forget what was counted (before a profiled loop)."""
        self.bytes = dict.fromkeys(KINDS, 0)
        self.wrapper_calls = 0


TALLY = Tally()
#: pstats keys of the wrappers around a copy or fold: their cumulative time is copy time.
COPIERS: set[tuple[str, int, str]] = set()


def _wrap_numpy() -> None:
    """np.copyto, np.concatenate, np.ascontiguousarray: ringlet calls them as ``np.<name>``."""
    copyto, concatenate, contiguous = np.copyto, np.concatenate, np.ascontiguousarray

    def counted_copyto(dst: Any, src: Any, *args: Any, **kw: Any) -> None:
        TALLY.add("copy", np.asarray(dst).nbytes)
        copyto(dst, src, *args, **kw)

    def counted_concatenate(arrays: Any, *args: Any, **kw: Any) -> Any:
        out = concatenate(arrays, *args, **kw)
        TALLY.add("copy", out.nbytes)
        return out

    def counted_contiguous(a: Any, *args: Any, **kw: Any) -> Any:
        out = contiguous(a, *args, **kw)
        if not (isinstance(a, np.ndarray) and np.shares_memory(a, out)):
            TALLY.add("copy", out.nbytes)
        return out

    COPIERS.update(_key(f) for f in (counted_copyto, counted_concatenate, counted_contiguous))
    np.copyto = counted_copyto  # type: ignore[assignment]
    np.concatenate = counted_concatenate  # type: ignore[assignment]
    np.ascontiguousarray = counted_contiguous  # type: ignore[assignment]


def _wrap_folds() -> None:
    """The ufuncs behind ops.binary, the one reduce kernel (before any kernel is built)."""

    def counted(ufunc: Any) -> Callable[..., Any]:
        def fold(a: Any, b: Any, out: Any = None, **kw: Any) -> Any:
            TALLY.add("fold", out.nbytes)
            return ufunc(a, b, out=out, **kw)

        return fold

    for op, ufunc in list(ops._UFUNCS.items()):
        ops._UFUNCS[op] = counted(ufunc)  # type: ignore[assignment]
        COPIERS.add(_key(ops._UFUNCS[op]))
    ops.binary.cache_clear()


def _wrap_cross_memory() -> None:
    """CrossMemory.read / write: one kernel copy of the buffer's bytes each."""
    read, write = cma_module.CrossMemory.read, cma_module.CrossMemory.write

    def counted_read(self: Any, peer: int, address: int, into: np.ndarray) -> None:
        TALLY.add("cma", into.nbytes)
        read(self, peer, address, into)

    def counted_write(self: Any, peer: int, address: int, data: np.ndarray) -> None:
        TALLY.add("cma", data.nbytes)
        write(self, peer, address, data)

    cma_module.CrossMemory.read = counted_read  # type: ignore[method-assign]
    cma_module.CrossMemory.write = counted_write  # type: ignore[method-assign]
    COPIERS.update((_key(counted_read), _key(counted_write)))


def _wrap_slots() -> None:
    """ShmTransport.exchange: a message that does not go by cross-memory copy is copied into a
    slot by its sender and out of it by its receiver (memoryview slices, which cannot be hooked);
    the direct ones are counted by the CrossMemory wrapper."""
    exchange = shm_p2p.ShmTransport.exchange

    def counted(self: Any, sends: Any, recvs: Any, tag: Any, deadline: float) -> None:
        direct = self._cma is not None
        n = sum(d.nbytes for _, d in (*sends, *recvs)
                if not (direct and d.nbytes >= shm_mailboxes.DIRECT_MIN_BYTES))  # fmt: skip
        TALLY.add("slot", n)
        exchange(self, sends, recvs, tag, deadline)

    shm_p2p.ShmTransport.exchange = counted  # type: ignore[method-assign]


def _wrap_eager() -> None:
    """The byte-string copies of the eager records (eager.py) and scatter's eager tail (blocks.py):
    tobytes() and bytearray slices, counted from the sizes those functions copy."""
    records_init, gathered = eager.Records.__init__, eager.Records.gathered
    describe, take = blocks.ScatterHeader.describe.__func__, blocks.ScatterHeader.take

    def counted_init(self: Any, arr: np.ndarray, size: int, forced: str | None = None) -> None:
        records_init(self, arr, size, forced)
        if self.bufs["in"][1]:  # it fits: tobytes() and a slice into the record
            TALLY.add("bytes", 2 * arr.nbytes)

    def counted_gathered(self: Any) -> np.ndarray:
        out = gathered(self)
        TALLY.add("bytes", self.table.nbytes + out.nbytes)  # tobytes() of the table, the joins
        return out

    def counted_describe(cls: Any, x: Any, size: int, forced: str | None = None) -> Any:
        header, src = describe(cls, x, size, forced)
        if header.data[cls._EAGER]:  # tobytes() of the parts, a slice into the tail
            TALLY.add(
                "bytes", 2 * sum(np.asarray(p).nbytes for p in (x if isinstance(x, list) else [x]))
            )
        return header, src

    def counted_take(self: Any, out: np.ndarray, rank: int, recorder: Any) -> None:
        if self.data[self._EAGER]:
            TALLY.add("bytes", out.nbytes)
        take(self, out, rank, recorder)

    eager.Records.__init__ = counted_init  # type: ignore[method-assign]
    eager.Records.gathered = counted_gathered  # type: ignore[method-assign]
    blocks.ScatterHeader.describe = classmethod(counted_describe)  # type: ignore[method-assign, assignment]
    blocks.ScatterHeader.take = counted_take  # type: ignore[method-assign]


def _wrap_schedule_copies() -> None:
    """Engine.run: each Copy of the schedule's rounds is one memoryview copy of its bytes."""
    run = engine.Engine.run

    def counted(self: Any, sched: Any, bufs: dict[str, np.ndarray], *args: Any) -> None:
        isz = next(iter(bufs.values())).itemsize
        TALLY.add("sched", isz * sum(c.count for rnd in sched.rounds for c in rnd.copies))
        run(self, sched, bufs, *args)

    engine.Engine.run = counted  # type: ignore[method-assign]


def install() -> None:
    """Every counting wrapper; before ringlet.init(), so every cached kernel is a counted one."""
    _wrap_numpy()
    _wrap_folds()
    _wrap_cross_memory()
    _wrap_slots()
    _wrap_schedule_copies()
    _wrap_eager()


def _key(fn: Any) -> tuple[str, int, str]:
    code = fn.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


WAIT_LOOPS = (_key(shm_wait.Waiter._wait_slow), _key(shm_p2p.ShmTransport._wait))
STEP = _key(shm_p2p.ShmTransport._step)
#: The one caller of ShmTransport._step outside the wait loop (whose steps run in comprehensions).
EXCHANGE = _key(shm_p2p.ShmTransport.exchange)
FUTEX_WAIT, FUTEX_WAKE = _key(shm_wait.Futex.wait), _key(shm_wait.Futex.wake)
YIELD = ("~", 0, "<built-in method posix.sched_yield>")
#: The wait loops and what only they call: the calls made from these are waiting's, which
#: varies with how long a rank waits (the message steps of the p2p loop are left out).
WAITING = {
    _key(f)
    for f in (shm_wait.Waiter._wait_slow, shm_wait.Waiter._sleep, shm_wait.Waiter._check_alive,
              shm_wait.Futex.wait, shm_wait.PeerWatch.dead, shm_wait.process_start_time,
              shm_p2p.ShmTransport._wait, shm_p2p.ShmTransport._sleep,
              shm_p2p.ShmTransport._check_health)
}  # fmt: skip


def waiting_calls(stats: dict[Any, Any]) -> int:
    """Calls made from the wait loops (and the loops' own entries), less their message steps."""
    calls = 0
    for key, (_, _, _, _, callers) in stats.items():
        if key == STEP:
            continue
        calls += sum(edge[1] for c, edge in callers.items() if c in WAITING or key in WAIT_LOOPS)
    return calls


def call_of(
    comm: Any, op: str, x: np.ndarray | None, root: int
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The bound method and arguments of one call of ``op`` on ``x``."""
    if op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        return getattr(comm, op), (x,)
    return getattr(comm, op), (x, root)


def iterations(nbytes: int, budget: int, most: int) -> int:
    """Calls of a loop: ``most`` for small sizes, fewer (at least 3) as ``budget`` runs out."""
    return max(3, min(most, budget // max(1, nbytes)))


def plain_time(comm: Any, fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> float:
    """Seconds per call of ``fn(*args)`` over ``n`` calls, the ranks started together."""
    comm.barrier()
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t) / n


def profiled(comm: Any, fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> dict[str, Any]:
    """Profile and count ``n`` calls; the figures per call (see the module docstring)."""
    comm.barrier()
    TALLY.reset()
    prof = cProfile.Profile()
    TALLY.on = True
    t = time.perf_counter()
    prof.enable()
    for _ in range(n):
        fn(*args)
    prof.disable()
    elapsed = time.perf_counter() - t
    TALLY.on = False
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    calls = sum(nc for _, nc, _, _, _ in stats.values()) - 1 - TALLY.wrapper_calls  # less disable()
    wait = sum(stats[k][3] for k in WAIT_LOOPS if k in stats)
    if STEP in stats:  # the p2p wait loop moves messages too: that part is work
        wait -= sum(t[3] for c, t in stats[STEP][4].items() if c != EXCHANGE)
    copying = sum(stats[k][3] for k in COPIERS if k in stats)
    # the fold wrapper's own time is the ufunc's (cProfile does not see ufunc calls); the other
    # wrappers' is their own overhead, left out
    mine = {k for k in stats if k[0] == __file__ and k[2] != "fold"}
    own = sorted((v[2], k) for k, v in stats.items() if k not in mine)[::-1][:3]
    count = {k: (stats[k][1] / n if k in stats else 0.0) for k in (FUTEX_WAIT, FUTEX_WAKE, YIELD)}
    return {
        "py_calls": calls / n,
        "py_calls_waiting": waiting_calls(stats) / n,
        "profiled_us": elapsed / n * 1e6,
        "wait_share": max(0.0, wait) / elapsed if elapsed else 0.0,
        "copy_share": copying / elapsed if elapsed else 0.0,
        "top": [f"{_name(k)} {tt / n * 1e6:.1f}us" for tt, k in own],
        "futex_waits": count[FUTEX_WAIT],
        "futex_wakes": count[FUTEX_WAKE],
        "yields": count[YIELD],
        "bytes": dict(TALLY.bytes),
    }


def _qualnames() -> dict[tuple[str, int, str], str]:
    """pstats key -> qualified name of every function and method of ringlet's loaded modules."""
    found = {}
    for mod in [m for k, m in sys.modules.items() if k.startswith("ringlet")]:
        for obj in vars(mod).values():
            members = vars(obj).values() if isinstance(obj, type) else [obj]
            for fn in members:
                fn = getattr(fn, "__func__", fn)
                if hasattr(fn, "__code__") and hasattr(fn, "__qualname__"):
                    found[_key(fn)] = fn.__qualname__
    return found


def _name(key: tuple[str, int, str]) -> str:
    """``module.py:Class.function`` (or the builtin's name) of a pstats key."""
    path, _, name = key
    if path == __file__:
        return "ufunc fold (ops.binary)"
    if path == "~":
        return name.removeprefix("<built-in method ").removeprefix("<method ").rstrip(">")
    if not QUALNAMES:
        QUALNAMES.update(_qualnames())
    return f"{os.path.basename(path)}:{QUALNAMES.get(key, name)}"


QUALNAMES: dict[tuple[str, int, str], str] = {}


def measure(comm: Any, op: str, nbytes: int, root: int, repeat: int = 3) -> dict[str, Any]:
    """One row of this rank: time per call, then the profiled and counted figures."""
    case = make_case(op, nbytes, np.dtype(np.float32), comm.size)
    x = rank_input(case, comm.rank)
    if op == "scatter":  # rank_input gives the whole input to rank 0, bench's root
        x = rank_input(case, 0) if comm.rank == root else None
    fn, args = call_of(comm, op, x, root)
    for _ in range(iterations(case.nbytes, PLAIN_BUDGET // 4, 20)):
        fn(*args)
    loops = iterations(case.nbytes, PLAIN_BUDGET, 300)
    before = resource.getrusage(resource.RUSAGE_SELF)
    # the best of ``repeat`` loops: on a shared machine the slowest ones time the other jobs
    plain = min(plain_time(comm, fn, args, loops) for _ in range(repeat))
    after = resource.getrusage(resource.RUSAGE_SELF)
    calls = loops * repeat  # the barrier before each loop is counted too: one small call
    usage = {"page_faults": (after.ru_minflt - before.ru_minflt) / calls,
             "sleeps": (after.ru_nvcsw - before.ru_nvcsw) / calls,
             "preempted": (after.ru_nivcsw - before.ru_nivcsw) / calls}  # fmt: skip
    n = iterations(case.nbytes, PROFILE_BUDGET, 100)
    prof = profiled(comm, fn, args, n)
    moved = {k: v / n / case.nbytes for k, v in prof.pop("bytes").items()}
    last = comm._recorder.current  # the flight recorder's entry of the last call: its way
    way = f"{last.algorithm} ({last.transport})" if last is not None else ""
    role = "root" if op in ROOTED and comm.rank == root else ("non-root" if op in ROOTED else "")
    # Python's part of the plain time, by the profile's shares (an estimate: cProfile slows
    # Python calls more than copies and waits)
    python_us = plain * 1e6 * max(0.0, 1.0 - prof["wait_share"] - prof["copy_share"])
    return {"kind": "bounds", "op": op, "bytes": case.nbytes, "ranks": comm.size,
            "rank": comm.rank, "role": role, "way": way, "time_us": plain * 1e6,
            "python_us": python_us, **prof, **usage,
            "copies_per_byte": sum(moved.values()), "per_byte": moved}  # fmt: skip


def ceiling() -> dict[str, Any]:
    """This machine's copy rates (GB/s) from ringlet.calibrate's own measuring functions."""
    hot = calibrate.local_rates(calibrate.HOT, 20)[1]
    cold = calibrate.local_rates(calibrate.COLD, 3)[1]
    cma_1m = calibrate.direct_rate()
    cma_64m = calibrate.direct_rate(calibrate.COLD, 3)
    gbs = lambda spb: None if spb is None else 1 / spb / 1e9  # noqa: E731
    return {"kind": "ceiling", "memcpy_256k_gbs": gbs(hot), "memcpy_64m_gbs": gbs(cold),
            "cma_1m_gbs": gbs(cma_1m), "cma_64m_gbs": gbs(cma_64m)}  # fmt: skip


HEADER = ("| op | size | rank | way | µs/call | µs profiled | wait | copy | ≈µs Python | "
          "Python calls (in waits) | copies/B | (copy, fold, cma, slot, sched, bytes) | "
          "futex waits | wakes | yields | faults | sleeps | preempted | "
          "top 3 own time (µs/call) |")  # fmt: skip


def table_row(r: dict[str, Any]) -> str:
    """One Markdown row of a ``bounds`` record."""
    pb = r["per_byte"]
    parts = ", ".join(f"{pb[k]:.2g}" for k in KINDS)
    who = f"{r['rank']} {r['role']}".strip()
    calls = f"{r['py_calls']:.0f} ({r['py_calls_waiting']:.0f})"
    return (f"| {r['op']} | {format_size(r['bytes'])} | {who} | {r['way']} | "
            f"{r['time_us']:.1f} | "
            f"{r['profiled_us']:.1f} | {r['wait_share']:.0%} | {r['copy_share']:.0%} | "
            f"{r['python_us']:.1f} | {calls} | "
            f"{r['copies_per_byte']:.2f} | {parts} | {r['futex_waits']:.2f} | "
            f"{r['futex_wakes']:.2f} | {r['yields']:.1f} | {r['page_faults']:.1f} | "
            f"{r['sleeps']:.2f} | {r['preempted']:.2f} | {'; '.join(r['top'])} |")  # fmt: skip


def report(rows: list[dict[str, Any]], ceil: dict[str, Any], as_json: bool) -> None:
    """Print the rows and the ceiling: one Markdown table, or JSON lines."""
    if as_json:
        for r in [*rows, ceil]:
            print(json.dumps(r), flush=True)
        return
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    for r in rows:
        print(table_row(r))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f} GB/s"  # noqa: E731
    print(f"\ncopy ceiling: memcpy {fmt(ceil['memcpy_256k_gbs'])} in cache (256 KiB), "
          f"{fmt(ceil['memcpy_64m_gbs'])} out of cache (64 MiB); process_vm_readv "
          f"{fmt(ceil['cma_1m_gbs'])} at 1 MiB, {fmt(ceil['cma_64m_gbs'])} at 64 MiB", flush=True)  # fmt: skip


def main(argv: list[str]) -> int:
    """Measure every op and size on every rank; rank 0 prints the table (or JSON lines)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default all)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="e.g. 8,64K,1M,16M")
    parser.add_argument("--root", type=int, default=0, help="root of the rooted ops")
    parser.add_argument("--repeat", type=int, default=3, help="timed loops; the best is shown")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    if unknown := [o for o in wanted if o not in OPS]:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    install()
    comm = ringlet.init()
    other = args.root if args.root != 0 else 1 % comm.size
    rows = []
    for op in wanted:
        for nbytes in parse_sizes(args.sizes):
            row = measure(comm, op, nbytes, args.root, args.repeat)
            got = comm.all_gather_object(row)
            rows += [got[0]] + ([got[other]] if op in ROOTED and other != 0 else [])
    comm.barrier()
    if comm.rank == 0:
        report(rows, ceiling(), args.json)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

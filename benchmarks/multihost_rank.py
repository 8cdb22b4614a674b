"""One process of benchmarks/multihost.py, run inside a simulated host (a network namespace).

``blast``: one end of the link measurement — send to the peer for a few seconds while receiving
from it, both directions at once, and print what arrived and how fast (JSON).
``bench``: one rank of a collective benchmark. ringlet first, then Gloo in the same processes
(``--backends ringlet,gloo``), or MPI alone under ``mpiexec`` (``--backends mpi``); every library
runs through ringlet's own benchmark loop (``ringlet.bench_backends.measure``: a checked first
call, warm-up, barrier, the slowest rank's median time), so all are timed alike. Rank 0 appends
one JSON record per result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from typing import Any

CHUNK = 4 << 20  # bytes per send/recv call: large, so Python's overhead per byte is negligible


def blast(peer: str, port: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Send to `peer` for `seconds` while receiving from it; the receive rate after `warmup` s.

    Both ends run this at once, so each direction of the link is loaded while the other is: the
    rate a host can send while also receiving, which is what a collective needs.
    """
    listener = socket.create_server(("0.0.0.0", port))
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    acceptor.start()
    deadline = time.monotonic() + 20.0
    while True:
        try:
            out = socket.create_connection((peer, port), timeout=1.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    acceptor.join()
    inbound = accepted[0]
    got: dict[str, float] = {}

    def receive() -> None:
        buf, total, began, marked = bytearray(CHUNK), 0, 0.0, 0
        view = memoryview(buf)
        mark_at = 0.0
        while n := inbound.recv_into(view):
            now = time.perf_counter()
            if not total:
                began, mark_at = now, now + warmup
            total += n
            if not marked and now >= mark_at:
                marked, got["mark_time"], got["mark_bytes"] = 1, now, total
            got["end_time"], got["end_bytes"] = now, total
        got["began"] = began

    receiver = threading.Thread(target=receive)
    receiver.start()
    payload = memoryview(bytearray(os.urandom(1 << 16)) * (CHUNK >> 16))
    out.settimeout(None)
    stop, sent = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        out.sendall(payload)
        sent += len(payload)
    out.shutdown(socket.SHUT_WR)
    receiver.join()
    out.close()
    inbound.close()
    listener.close()
    span = got["end_time"] - got["mark_time"]
    rate = (got["end_bytes"] - got["mark_bytes"]) / span if span > 0 else 0.0
    return {"sent_bytes": sent, "recv_bytes": got["end_bytes"], "window_s": span, "recv_Bps": rate}


def bench(args: argparse.Namespace) -> None:
    """Every (op, size) on each backend named in --backends, in this job's ranks."""
    from ringlet.bench_backends import GlooBackend, MpiBackend, RingletBackend, measure
    from ringlet.bench_cases import make_case, parse_dtype

    dtype = parse_dtype(args.dtype)
    sink = None

    def run(backend: Any) -> None:
        nonlocal sink
        if backend.rank == 0 and sink is None:
            sink = open(args.out, "a")  # noqa: SIM115  (closed at the end of bench)
        info = backend.info() | {"layout": args.layout, "cap": args.cap}
        if sink is not None:
            sink.write(json.dumps(info) + "\n")
        for op in args.ops.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                case = make_case(op, size, dtype, backend.size)
                record = measure(backend, case, args.iters, args.warmup)
                if sink is not None:
                    sink.write(json.dumps(record | {"layout": args.layout, "cap": args.cap}) + "\n")
                    sink.flush()

    names = args.backends.split(",")
    if names == ["mpi"]:
        run(MpiBackend())
    else:
        import ringlet

        comm = ringlet.init()
        rank, size = comm.rank, comm.size
        if "ringlet" in names:
            run(RingletBackend(comm))
        comm.close()  # frees its sockets and threads before Gloo starts its own
        if "gloo" in names:
            gloo = GlooBackend(os.environ["MULTIHOST_GLOO"], rank, size, 300.0)
            try:
                run(gloo)
            finally:
                gloo.close()
    if sink is not None:
        sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("blast")
    b.add_argument("--peer", required=True)
    b.add_argument("--port", type=int, default=5201)
    b.add_argument("--seconds", type=float, default=3.0)
    b.add_argument("--warmup", type=float, default=0.5)
    c = sub.add_parser("bench")
    c.add_argument("--backends", default="ringlet,gloo")
    c.add_argument("--ops", required=True)
    c.add_argument("--sizes", required=True, help="bytes, comma-separated")
    c.add_argument("--dtype", default="float32")
    c.add_argument("--iters", type=int, default=20)
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--layout", default="")
    c.add_argument("--cap", default="")
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mode == "blast":
        print(json.dumps(blast(args.peer, args.port, args.seconds, args.warmup)), flush=True)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

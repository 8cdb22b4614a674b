"""`ringlet plan calibrate`: measure this machine's model parameters and save them as JSON.

Local rates (folding float32 arrays, copying bytes) are timed in this process. Per transport
(shared memory, loopback TCP), two ranks time a one-round broadcast and a two-round ring
all_reduce at a few sizes with `ringlet bench`; a least-squares fit of those times to the
model's own round and byte counts for the same schedules gives the per-call cost (dispatch and
wake-up), alpha (seconds per round) and beta (seconds per byte). Takes well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .plan import model_time
from .plan_params import LINKS, Link, Params

#: Where `ringlet plan` looks for a calibration when --calibration is not given.
DEFAULT_PATH = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "ringlet"
DEFAULT_FILE = DEFAULT_PATH / "calibration.json"
#: (op, forced algorithm) timed at 2 ranks: one round without folding, two rounds with it.
CASES = (("broadcast", "linear"), ("all_reduce", "ring"))
SIZES = (8, 64 << 10, 1 << 20, 4 << 20)
TRANSPORTS = ("shm", "tcp")


def local_rates(nbytes: int = 16 << 20, repeat: int = 5) -> tuple[float, float]:
    """(seconds per byte folded, seconds per byte copied): the best of ``repeat`` runs of a
    float32 add and a copy over ``nbytes``."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones_like(a)
    fold, copy = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        np.add(a, b, out=a)
        fold.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
    return min(fold) / nbytes, min(copy) / nbytes


def measure(
    transport: str, sizes: tuple[int, ...] = SIZES, iters: int = 10
) -> list[dict[str, Any]]:
    """`ringlet bench` records of :data:`CASES` at 2 ranks over ``transport``."""
    found = []
    for op, algo in CASES:
        cmd = [sys.executable, "-m", "ringlet", "bench", "-n", "2", "--transport", transport,
               "--ops", op, "--algo", algo, "--sizes", ",".join(map(str, sizes)),
               "--iters", str(iters), "--warmup", "3", "--json", "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("kind") == "result":
                    found.append({**rec, "algo": algo})
    return found


def fit(records: list[dict[str, Any]], reduce: float, copy: float) -> tuple[Link, float]:
    """(link, per-call seconds) that best explain ``records`` (2 ranks on one host) once the
    model's folding and copying times are taken out."""
    unit = Params(Link(0.0, 0.0), Link(0.0, 0.0), 0.0, 0.0, 0.0, 0.0)
    rows, times = [], []
    for rec in records:
        args = (rec["op"], rec["algo"], rec["bytes"], 1, 2)
        rounds = model_time(*args, replace(unit, local=Link(1.0, 0.0)))[0]
        nbytes = model_time(*args, replace(unit, local=Link(0.0, 1.0)))[0]
        local = model_time(*args, replace(unit, reduce=reduce, copy=copy))[0]
        measured = rec["time_us"] * 1e-6
        # Relative errors: an 8-byte call counts as much as a 4 MiB one (alpha lives there).
        rows.append([1.0 / measured, rounds / measured, nbytes / measured])
        times.append((measured - local) / measured)
    sol, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    call, alpha, beta = (max(float(x), 0.0) for x in sol)
    return Link(alpha, max(beta, 1e-12)), call


def calibrate(quick: bool = False) -> dict[str, Any]:
    """Measure everything; the JSON object :func:`ringlet.plan.params_for` reads."""
    reduce, copy = local_rates()
    links: dict[str, Any] = {}
    calls: dict[str, float] = {}
    samples = []
    for transport in TRANSPORTS:
        records = measure(transport, iters=5 if quick else 10)
        link, call = fit(records, reduce, copy)
        links[transport] = {"alpha": link.alpha, "beta": link.beta}
        calls[transport] = call
        samples += [
            {k: r[k] for k in ("transport", "op", "algo", "bytes", "time_us")} for r in records
        ]
    host = platform.node()
    return {
        "version": 1,
        "source": f"calibrated on {host} at {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
        "cores": os.cpu_count() or 0,
        "links": links,
        "call_by_link": calls,
        "call": calls["shm"],
        "reduce": reduce,
        "copy": copy,
        "samples": samples,
    }


def load(path: str | Path | None = None) -> dict[str, Any] | None:
    """The calibration at ``path`` (default :data:`DEFAULT_FILE`, if it exists), or None."""
    target = Path(path) if path else DEFAULT_FILE
    if not target.exists():
        if path:
            raise FileNotFoundError(f"no calibration at {target}; run ringlet plan calibrate")
        return None
    data: dict[str, Any] = json.loads(target.read_text(encoding="utf-8"))
    return data


def main(argv: list[str]) -> int:
    """`ringlet plan calibrate [--out PATH] [--quick]`."""
    parser = argparse.ArgumentParser(
        prog="ringlet plan calibrate",
        description="Measure this machine's round latency, bandwidth, fold and copy rates and "
        f"per-call cost for shm and TCP; write them as JSON (default {DEFAULT_FILE}).",
    )
    parser.add_argument("--out", default=str(DEFAULT_FILE), help="where to write the JSON")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = parser.parse_args(argv)
    data = calibrate(args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for name, link in data["links"].items():
        print(
            f"{name}: {link['alpha'] * 1e6:.1f} µs a round, {1 / link['beta'] / 1e9:.2f} GB/s, "
            f"{data['call_by_link'][name] * 1e6:.1f} µs a call"
        )
    print(f"fold {1 / data['reduce'] / 1e9:.2f} GB/s, copy {1 / data['copy'] / 1e9:.2f} GB/s")
    print(f"defaults it replaces: {', '.join(k for k in data['links'] if k in LINKS)}")
    print(f"wrote {out}")
    return 0

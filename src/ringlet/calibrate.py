"""`ringlet plan calibrate`: measure this machine's model parameters and save them as JSON.

Timed in this process: fold and copy rates in and out of cache (and the vector size where they
change), and one cross-memory copy (what shm does for large messages). Per transport (shared
memory, loopback TCP), two ranks time a one-round Bruck all_gather and a two-round ring
all_reduce at a few sizes with `ringlet bench`; a least-squares fit of those times to the
model's own round and byte counts for the same schedules (the measured parts taken out) gives
the per-call cost, alpha (seconds per round) and beta (seconds per byte). On a machine with
fewer than 4 cores, 2 x cores ranks time them at 8 bytes too: what is left over per round is
the wake-up of a rank that had to wait for a core. Takes about a minute.
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
from .plan_params import LINKS, Link, Params, params_for

#: Where `ringlet plan` looks for a calibration when --calibration is not given.
DEFAULT_PATH = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "ringlet"
DEFAULT_FILE = DEFAULT_PATH / "calibration.json"
#: (op, forced algorithm) timed at 2 ranks: one round without folding, two rounds with it;
#: both wait for the peer every round (a rooted op timed back to back would hide the latency).
CASES = (("all_gather", "bruck"), ("all_reduce", "ring"))
SIZES = (8, 64 << 10, 1 << 20, 4 << 20)
#: Vector sizes of the in-cache and out-of-cache rates.
HOT, COLD = 256 << 10, 64 << 20
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


def cache_rates() -> dict[str, float]:
    """Fold and copy rates in cache (256 KiB) and out of it (64 MiB), and the cache: the largest
    vector (doubling from 256 KiB) that copies at least halfway to the warm rate from the cold."""
    (fold, copy), (fold_cold, copy_cold) = local_rates(HOT, 20), local_rates(COLD, 3)
    cache, size = HOT, HOT
    while size < COLD:
        size *= 2
        if local_rates(size, 3)[1] < (copy + copy_cold) / 2:
            cache = size
    return {"reduce": fold, "copy": copy, "reduce_cold": fold_cold, "copy_cold": copy_cold,
            "cache": cache}  # fmt: skip


def direct_rate(nbytes: int = 1 << 20, repeat: int = 20) -> float | None:
    """Seconds per byte of one cross-memory copy (process_vm_readv of this process's own memory,
    what shm does for large messages); None where the kernel refuses it."""
    from .transport.cma import CrossMemory

    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    try:
        cma = CrossMemory(0, [os.getpid()])
        best = []
        for _ in range(repeat):
            t = time.perf_counter()
            cma.read(0, src.ctypes.data, dst)
            best.append(time.perf_counter() - t)
    except OSError:
        return None
    return min(best) / nbytes


def measure(
    transport: str, sizes: tuple[int, ...] = SIZES, iters: int = 10, ranks: int = 2
) -> list[dict[str, Any]]:
    """`ringlet bench` records of :data:`CASES` at ``ranks`` ranks over ``transport``."""
    found = []
    for op, algo in CASES:
        cmd = [sys.executable, "-m", "ringlet", "bench", "-n", str(ranks), "--transport",
               transport, "--ops", op, "--algo", algo, "--sizes", ",".join(map(str, sizes)),
               "--iters", str(iters), "--warmup", "3", "--json", "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("kind") == "result":
                    found.append({**rec, "algo": algo})
    return found


def _zero(p: Params, **kw: Any) -> Params:
    """``p`` with every cost zero but those in ``kw`` (the engine's cuts kept)."""
    none = {"call": 0.0, "gap": 0.0, "reduce": 0.0, "copy": 0.0, "reduce_cold": 0.0,
            "copy_cold": 0.0, "wake": 0.0, "local": Link(0.0, 0.0), "net": Link(0.0, 0.0),
            "direct": Link(0.0, 0.0) if p.direct else None}  # fmt: skip
    return replace(p, **{**none, **kw})


def fit(
    records: list[dict[str, Any]], cal: dict[str, Any], transport: str = "shm"
) -> tuple[Link, float]:
    """(link, per-call seconds) that best explain ``records`` (2 ranks on one host) once the
    model's measured parts (folds, copies, cross-memory copies) are taken out: a least-squares
    fit to the model's own round and byte counts for the same schedules."""
    base = params_for(
        "25gbit", transport, {k: v for k, v in cal.items() if k != "links"}, one_host=True
    )
    one = Link(1.0, 0.0)
    rows, times = [], []
    for rec in records:
        args = (rec["op"], rec["algo"], rec["bytes"], 1, rec.get("ranks", 2))
        rounds = model_time(*args, _zero(base, local=one, direct=one if base.direct else None))[0]
        nbytes = model_time(*args, _zero(base, local=Link(0.0, 1.0), cache=0))[0]
        keep = {k: getattr(base, k) for k in ("reduce", "copy", "reduce_cold", "copy_cold")}
        direct = Link(0.0, base.direct.beta) if base.direct else None
        local = model_time(*args, _zero(base, direct=direct, **keep))[0]
        measured = rec["time_us"] * 1e-6
        # Relative errors: an 8-byte call counts as much as a 4 MiB one (alpha lives there).
        rows.append([1.0 / measured, rounds / measured, nbytes / measured])
        times.append((measured - local) / measured)
    sol, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    call, alpha, beta = (max(float(x), 0.0) for x in sol)
    return Link(alpha, max(beta, 1e-12)), call


def wake(records: list[dict[str, Any]], cal: dict[str, Any], transport: str) -> float:
    """Seconds a round costs on top of the model when ranks outnumber cores: the mean excess
    of ``records`` (small messages at more ranks than cores) per round on the critical path."""
    params = replace(params_for("25gbit", transport, cal, one_host=True), wake=0.0)
    excess = []
    for rec in records:
        args = (rec["op"], rec["algo"], rec["bytes"], 1, rec["ranks"], params)
        t, steps, _, _ = model_time(*args, back_to_back=True)
        if steps:
            excess.append((rec["time_us"] * 1e-6 - t) / steps)
    return max(0.0, float(np.mean(excess))) if excess else 0.0


def calibrate(quick: bool = False) -> dict[str, Any]:
    """Measure everything; the JSON object :func:`ringlet.plan.params_for` reads."""
    cores = os.cpu_count() or 0
    cal: dict[str, Any] = {"version": 2, "cores": cores, **cache_rates()}
    if (direct := direct_rate()) is not None:
        cal["direct"] = {"alpha": 0.0, "beta": direct}
    links: dict[str, Any] = {}
    calls: dict[str, float] = {}
    wakes: dict[str, float] = {}
    samples = []
    for transport in TRANSPORTS:
        records = measure(transport, iters=5 if quick else 10)
        link, call = fit(records, cal, transport)
        links[transport] = {"alpha": link.alpha, "beta": link.beta}
        calls[transport] = call
        if transport == "shm" and "direct" in cal:  # a direct message's handshake: a round
            cal["direct"]["alpha"] = link.alpha
        crowd = []
        if 0 < cores < 4:  # more ranks than cores: what each round's wake-up adds
            crowd = measure(transport, (8,), 5 if quick else 10, ranks=2 * cores)
            mine = {**cal, "links": {transport: links[transport]}, "call_by_link": calls}
            wakes[transport] = wake(crowd, mine, transport)
        samples += [
            {k: r[k] for k in ("transport", "ranks", "op", "algo", "bytes", "time_us")}
            for r in records + crowd
        ]
    host = platform.node()
    return {
        **cal,
        "source": f"calibrated on {host} at {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
        "links": links,
        "call_by_link": calls,
        "call": calls["shm"],
        "wake_by_link": wakes,
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
    print(f"fold {1 / data['reduce'] / 1e9:.2f} GB/s, copy {1 / data['copy'] / 1e9:.2f} GB/s in "
          f"cache; {1 / data['reduce_cold'] / 1e9:.2f} / {1 / data['copy_cold'] / 1e9:.2f} GB/s "
          f"above {data['cache'] >> 10} KiB")  # fmt: skip
    if "direct" in data:
        print(f"cross-memory copy {1 / data['direct']['beta'] / 1e9:.2f} GB/s")
    for name, w in data["wake_by_link"].items():
        print(f"{name}: {w * 1e6:.1f} µs a round's wake-up at {2 * data['cores']} ranks")
    print(f"defaults it replaces: {', '.join(k for k in data['links'] if k in LINKS)}")
    print(f"wrote {out}")
    return 0

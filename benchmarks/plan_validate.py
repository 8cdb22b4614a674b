"""Predicted vs measured: `ringlet plan`'s model against `ringlet bench` on this host.

For each transport and rank count, times every algorithm of every op (`ringlet bench --algo
op=name,...`: a forced algorithm runs as the schedule the model prices, over shm too, where the
unforced path would take the shm group's own protocols), ``--repeat`` times in alternating
order, keeping each cell's best. Prints, as Markdown, measured / predicted µs and the error for
the algorithm select picks, and every cell where select's pick, the model's best and the
measured best disagree, with the measured times. Parameters: --calibration FILE (from `ringlet
plan calibrate`), or --fit: the rates timed in this process, alpha, beta and the per-call cost
fitted to the 2-rank Bruck all_gather and ring all_reduce cells and the wake-up to their
crowded 8-byte cells (as calibrate does), so every other cell is a test.

    python benchmarks/plan_validate.py --ranks 2,4 --transports shm,tcp --fit --save out.jsonl
    python benchmarks/plan_validate.py --load out.jsonl --fit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ringlet.bench_cases import format_size
from ringlet.calibrate import CASES, cache_rates, direct_rate, fit, wake
from ringlet.calibrate import load as load_calibration
from ringlet.plan import model_time
from ringlet.plan_params import params_for
from ringlet.schedules.select import ALGORITHMS, RANK_ORDER, TOPOLOGICAL, select

OPS = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "reduce", "gather", "scatter",
       "all_to_all")  # fmt: skip


def flat(op: str) -> list[str]:
    """The algorithms of ``op`` on one host outside deterministic mode."""
    return [a for a in ALGORITHMS[op] if a not in TOPOLOGICAL and a not in RANK_ORDER.get(op, ())]


def bench(transport: str, ranks: int, sizes: str, iters: int, j: int) -> list[dict[str, Any]]:
    """Result records of the j-th algorithm of every op that has one, forced."""
    forced = {op: flat(op)[j] for op in OPS if len(flat(op)) > j}
    cmd = [sys.executable, "-m", "ringlet", "bench", "-n", str(ranks), "--transport", transport,
           "--ops", ",".join(forced), "--algo", ",".join(f"{o}={a}" for o, a in forced.items()),
           "--sizes", sizes, "--iters", str(iters), "--json", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    keep = [r for r in found if r.get("kind") == "result" and r.get("backend") == "ringlet"]
    return [{**r, "algo": forced[r["op"]], "load": os.getloadavg()[0]} for r in keep]


def from_algorithms(path: str) -> list[dict[str, Any]]:
    """Records from the output of benchmarks/algorithms.py saved as ``path`` (named
    ``...-<transport>-...``): every algorithm timed in the same run, interleaved per size."""
    transport = "shm" if "shm" in Path(path).name else "tcp"
    found = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        head = re.search(r"n=(\d+) (\w+)\s+(\d+) B\s+(.*?)\s+best=", line)
        if head is None:
            continue
        ranks, op, nbytes, cells = int(head[1]), head[2], int(head[3]), head[4]
        for algo, us in re.findall(r"(\w+)=\s*([\d.]+)", cells):
            if algo in flat(op):  # each call after a barrier: one call's latency
                found.append({"transport": transport, "ranks": ranks, "op": op, "algo": algo,
                              "bytes": nbytes, "time_us": float(us), "latency": True})  # fmt: skip
    return found


def best_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (transport, ranks, op, algorithm, size): the fastest record."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (r["transport"], r["ranks"], r["op"], r["algo"], r["bytes"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    return list(best.values())


def fitted(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A calibration from this process's rates and the data's calibrate-like cells."""
    cal: dict[str, Any] = {"cores": os.cpu_count() or 0, **cache_rates(), "links": {},
                           "call_by_link": {}, "wake_by_link": {}}  # fmt: skip
    if (direct := direct_rate()) is not None:
        cal["direct"] = {"alpha": 0.0, "beta": direct}
    cases = set(CASES)
    for transport in sorted({r["transport"] for r in records}):
        mine = [r for r in records if r["transport"] == transport and (r["op"], r["algo"]) in cases]
        use = [r for r in mine if r["ranks"] == 2]
        if len(use) < 3:
            continue
        link, call = fit(use, cal, transport)
        cal["links"][transport] = {"alpha": link.alpha, "beta": link.beta}
        cal["call_by_link"][transport] = call
        if transport == "shm" and "direct" in cal:
            cal["direct"]["alpha"] = link.alpha
        crowd = [r for r in mine if r["ranks"] > cal["cores"] and r["bytes"] <= 8]
        if crowd:
            cal["wake_by_link"][transport] = wake(crowd, cal, transport)
    cal["source"] = "fitted to the 2-rank Bruck all_gather / ring all_reduce cells"
    return cal


def _predict(cal: dict[str, Any] | None, r: dict[str, Any]) -> float:
    params = params_for("25gbit", r["transport"], cal, one_host=True)
    args = (r["op"], r["algo"], r["bytes"], 1, r["ranks"], params)
    return model_time(*args, back_to_back=not r.get("latency"))[0] * 1e6


def table(records: list[dict[str, Any]], cal: dict[str, Any] | None) -> list[str]:
    """Markdown: per transport and rank count, select's pick measured / predicted per cell."""
    lines: list[str] = []
    big: list[float] = []
    small: list[float] = []
    for transport, ranks in sorted({(r["transport"], r["ranks"]) for r in records}):
        mine = [r for r in records if (r["transport"], r["ranks"]) == (transport, ranks)]
        sizes = sorted({r["bytes"] for r in mine})
        lines += [f"### {transport}, {ranks} ranks on one host", ""]
        lines += ["| op (select's algorithm) | " + " | ".join(map(format_size, sizes)) + " |"]
        lines += ["|---" * (1 + len(sizes)) + "|"]
        for op in dict.fromkeys(r["op"] for r in mine):
            cells, used = [], []
            for b in sizes:
                algo = select(op, ranks, b)
                rec = next((r for r in mine if (r["op"], r["algo"], r["bytes"]) == (op, algo, b)),
                           None)  # fmt: skip
                if rec is None:
                    cells.append("")
                    continue
                used.append(algo)
                pred = _predict(cal, rec)
                err = pred / rec["time_us"] - 1
                (big if b >= 64 << 10 else small).append(pred / rec["time_us"])
                cells.append(f"{rec['time_us']:.0f} / {pred:.0f} ({err:+.0%})")
            lines.append(f"| {op} ({', '.join(dict.fromkeys(used))}) | " + " | ".join(cells) + " |")
        lines.append("")
    inside = sum(abs(x - 1) <= 0.25 for x in big)
    tiny = sum(0.5 <= x <= 2 for x in small)
    lines.append(f"Cells of 64 KiB and more within 25 %: {inside} of {len(big)}; "
                 f"smaller cells within 2x: {tiny} of {len(small)}.")  # fmt: skip
    return lines


def disagreements(records: list[dict[str, Any]], cal: dict[str, Any] | None) -> list[str]:
    """Markdown: cells where select's pick is not the model's best, with measured times."""
    lines = ["| transport, ranks | op | size | select | model's best | measured best | "
             "measured µs (select / model's / best) |", "|---" * 7 + "|"]  # fmt: skip
    cells = {(r["transport"], r["ranks"], r["op"], r["bytes"]) for r in records}
    count = agree = 0
    for t, n, op, b in sorted(cells):
        got = {r["algo"]: r for r in records
               if (r["transport"], r["ranks"], r["op"], r["bytes"]) == (t, n, op, b)}  # fmt: skip
        chosen = select(op, n, b)
        if len(got) < 2 or chosen not in got:
            continue
        count += 1
        model = min(got, key=lambda a: _predict(cal, got[a]))
        fast = min(got, key=lambda a: got[a]["time_us"])
        agree += model == fast
        if model != chosen:
            us = " / ".join(f"{got[a]['time_us']:.0f}" for a in (chosen, model, fast))
            lines.append(f"| {t}, {n} | {op} | {format_size(b)} | {chosen} | {model} | {fast} "
                         f"| {us} |")  # fmt: skip
    lines += ["", f"The model's best is the measured best in {agree} of {count} cells."]
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--transports", default="shm,tcp")
    parser.add_argument("--sizes", default="8,64K,1M,4M,16M")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell, alternating order")
    parser.add_argument("--load", nargs="*", help="JSON lines of earlier runs (--save)")
    parser.add_argument("--calibration", help="a ringlet plan calibrate file")
    parser.add_argument("--fit", action="store_true", help="fit the parameters from the data")
    parser.add_argument("--save", help="write the measured records here (JSON lines)")
    parser.add_argument("--max-load", type=float, help="keep runs that ended below this load")
    parser.add_argument("--algorithms", nargs="*", help="outputs of benchmarks/algorithms.py "
                        "(file names with shm or tcp) to judge instead of bench records")  # fmt: skip
    args = parser.parse_args(argv)
    raw: list[dict[str, Any]] = []
    for path in args.load or ():
        text = Path(path).read_text(encoding="utf-8")
        raw += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for path in args.algorithms or ():
        raw += from_algorithms(path)
    if not args.load and not args.algorithms:
        width = max(len(flat(op)) for op in OPS)
        for rep in range(args.repeat):
            order = range(width) if rep % 2 == 0 else reversed(range(width))
            for j in order:
                for transport in args.transports.split(","):
                    for ranks in map(int, args.ranks.split(",")):
                        raw += bench(transport, ranks, args.sizes, args.iters, j)
                        if args.save:  # as it goes: a long run that stops keeps what it has
                            with open(args.save, "w", encoding="utf-8") as out:
                                out.writelines(json.dumps(r) + "\n" for r in raw)
    if args.max_load is not None:  # runs taken while the machine was quiet enough
        raw = [r for r in raw if r.get("load", 0.0) <= args.max_load]
    records = best_of(raw)
    cal = fitted(records) if args.fit else load_calibration(args.calibration)
    loads = [r["load"] for r in raw if "load" in r]
    if loads:
        print(f"Load average (1 min) after each run: {min(loads):.1f}-{max(loads):.1f}")
    print(f"Parameters: {cal.get('source', 'file') if cal else 'documented defaults'}")
    if cal:
        for name, link in cal.get("links", {}).items():
            call = cal.get("call_by_link", {}).get(name, cal.get("call", 0.0))
            woken = cal.get("wake_by_link", {}).get(name, 0.0)
            print(f"- {name}: {link['alpha'] * 1e6:.1f} µs a round, "
                  f"{1 / link['beta'] / 1e9:.2f} GB/s, {call * 1e6:.1f} µs a call, "
                  f"{woken * 1e6:.1f} µs a crowded round's wake-up")  # fmt: skip
        if "copy_cold" in cal:
            print(f"- copy {1 / cal['copy'] / 1e9:.1f} / {1 / cal['copy_cold'] / 1e9:.1f} GB/s, "
                  f"fold {1 / cal['reduce'] / 1e9:.1f} / {1 / cal['reduce_cold'] / 1e9:.1f} GB/s "
                  f"(in / out of cache, above {cal['cache'] >> 10} KiB)")  # fmt: skip
        if "direct" in cal:
            print(f"- cross-memory copy {1 / cal['direct']['beta'] / 1e9:.1f} GB/s")
    print("\nEach cell: measured / predicted µs (error of the prediction).\n")
    print("\n".join(table(records, cal)))
    print("\n### Where select's pick is not the model's best\n")
    print("\n".join(disagreements(records, cal)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

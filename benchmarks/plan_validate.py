"""Predicted vs measured: `ringlet plan`'s model against `ringlet bench` on this host.

For each transport and rank count, runs `ringlet bench -n N --transport T --json` (or reads
earlier JSON lines with --load), predicts each (op, size) for the algorithm select picks, and
prints the error per cell as Markdown. Parameters: --calibration FILE (from `ringlet plan
calibrate`), or --fit to fit them from the 2-rank broadcast and all_reduce records of the same
data (then the other cells are the test), else the documented defaults.

    python benchmarks/plan_validate.py --ranks 2,4 --transports shm,tcp --fit
    python benchmarks/plan_validate.py --load benchmarks/results/bench-tcp-2ranks.jsonl ... --fit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ringlet.bench_cases import format_size
from ringlet.calibrate import fit, load, local_rates
from ringlet.plan import model_time
from ringlet.plan_params import params_for
from ringlet.schedules.select import select

RESULTS = Path(__file__).resolve().parent / "results"


def bench(transport: str, ranks: int, sizes: str, iters: int) -> list[dict[str, Any]]:
    """ringlet bench's result records (every op) at ``ranks`` local ranks over ``transport``."""
    cmd = [sys.executable, "-m", "ringlet", "bench", "-n", str(ranks), "--transport", transport,
           "--ops", "all", "--sizes", sizes, "--iters", str(iters), "--json", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def results(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ringlet's result records, each with the algorithm select picks for it on one host."""
    kept = [r for r in records if r.get("kind") == "result" and r.get("backend") == "ringlet"]
    return [{**r, "algo": select(r["op"], r["ranks"], r["bytes"])} for r in kept]


def fitted(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A calibration fitted to the 2-rank broadcast and all_reduce records of each transport."""
    reduce, copy = local_rates()
    cal: dict[str, Any] = {"links": {}, "call_by_link": {}, "reduce": reduce, "copy": copy,
                           "cores": os.cpu_count() or 0}  # fmt: skip
    for transport in sorted({r["transport"] for r in records}):
        use = [r for r in records if r["transport"] == transport and r["ranks"] == 2
               and r["op"] in ("broadcast", "all_reduce")]  # fmt: skip
        if len(use) < 3:
            continue
        link, call = fit(use, reduce, copy)
        cal["links"][transport] = {"alpha": link.alpha, "beta": link.beta}
        cal["call_by_link"][transport] = call
    cal["source"] = "fitted to the 2-rank broadcast/all_reduce cells"
    return cal


def table(records: list[dict[str, Any]], cal: dict[str, Any] | None) -> list[str]:
    """Markdown: per transport and rank count, measured / predicted µs and the error per cell."""
    lines: list[str] = []
    worst: list[float] = []
    for transport, ranks in sorted({(r["transport"], r["ranks"]) for r in records}):
        mine = [r for r in records if (r["transport"], r["ranks"]) == (transport, ranks)]
        sizes = sorted({r["bytes"] for r in mine})
        params = params_for("25gbit", transport, cal)
        lines += [f"### {transport}, {ranks} ranks on one host", ""]
        lines += ["| op (algorithm) | " + " | ".join(format_size(b) for b in sizes) + " |"]
        lines += ["|---" * (1 + len(sizes)) + "|"]
        for op in dict.fromkeys(r["op"] for r in mine):
            cells = []
            for b in sizes:
                rec = next((r for r in mine if r["op"] == op and r["bytes"] == b), None)
                if rec is None:
                    cells.append("")
                    continue
                pred = model_time(op, rec["algo"], b, 1, ranks, params)[0] * 1e6
                err = pred / rec["time_us"] - 1
                if b >= 64 << 10:
                    worst.append(abs(err))
                cells.append(f"{rec['time_us']:.0f} / {pred:.0f} ({err:+.0%})")
            algos = sorted({r["algo"] for r in mine if r["op"] == op})
            lines.append(f"| {op} ({', '.join(algos)}) | " + " | ".join(cells) + " |")
        lines.append("")
    inside = sum(e <= 0.25 for e in worst)
    lines.append(f"Cells of 64 KiB and more within 25 %: {inside} of {len(worst)}.")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--transports", default="shm,tcp")
    parser.add_argument("--sizes", default="8,64K,1M,16M")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--load", nargs="*", help="JSON lines of earlier ringlet bench runs")
    parser.add_argument("--calibration", help="a ringlet plan calibrate file")
    parser.add_argument("--fit", action="store_true", help="fit the parameters from the data")
    parser.add_argument("--save", help="write the measured records here (JSON lines)")
    args = parser.parse_args(argv)
    raw: list[dict[str, Any]] = []
    if args.load:
        for path in args.load:
            text = Path(path).read_text(encoding="utf-8")
            raw += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    else:
        for transport in args.transports.split(","):
            for ranks in map(int, args.ranks.split(",")):
                raw += bench(transport, ranks, args.sizes, args.iters)
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in raw), encoding="utf-8")
    records = results(raw)
    cal = fitted(records) if args.fit else load(args.calibration)
    print(f"Parameters: {cal.get('source', 'file') if cal else 'documented defaults'}")
    if cal:
        for name, link in cal.get("links", {}).items():
            call = cal.get("call_by_link", {}).get(name, cal.get("call", 0.0))
            print(f"- {name}: {link['alpha'] * 1e6:.1f} µs a round, "
                  f"{1 / link['beta'] / 1e9:.2f} GB/s, {call * 1e6:.1f} µs a call")  # fmt: skip
    print("\nEach cell: measured / predicted µs (error of the prediction).\n")
    print("\n".join(table(records, cal)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

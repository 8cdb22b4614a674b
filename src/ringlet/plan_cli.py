"""`ringlet plan`: the model's table, JSON, sweep and plot; `ringlet plan calibrate` measures.

Argument parsing and printing only; the model is :mod:`ringlet.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .bench_cases import format_size, parse_sizes
from .plan import PLAN_OPS, Prediction, predict
from .plan_params import LINKS, Params, params_for

SWEEP_SIZES = "8,64K,1M,16M,256M"
SWEEP_HOSTS = "1,2,8,64"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringlet plan",
        description="Predict a collective from the schedules ringlet would run: time, busbw, "
        "bytes on the slowest link and steps per algorithm, and which one select picks. "
        "`ringlet plan calibrate` measures this machine's parameters first.",
    )
    parser.add_argument("--op", default="all_reduce", choices=PLAN_OPS, help="(all_reduce)")
    parser.add_argument(
        "--bytes", default="100M", help="vector size, e.g. 100M; a list or MIN:MAX with --sweep"
    )
    parser.add_argument("--hosts", default="1", help="hosts (1); a comma list with --sweep")
    parser.add_argument("--ranks-per-host", type=int, default=8, help="ranks on each host (8)")
    parser.add_argument(
        "--link",
        default=None,
        help=f"between hosts: {', '.join(k for k in LINKS if k not in ('shm', 'tcp'))} or "
        "<N>gbit (default 25gbit); with --hosts 1: shm or tcp, the link inside the host (shm)",
    )
    parser.add_argument("--local", default="shm", help="inside a host: shm or tcp (shm)")
    parser.add_argument("--algo", default="", help="only these algorithms (comma list)")
    parser.add_argument(
        "--deterministic", action="store_true", help="list the rank-order folds too"
    )
    parser.add_argument("--dtype-size", type=int, default=4, help="bytes per element (4)")
    parser.add_argument(
        "--calibration",
        help="calibration JSON (default: ~/.config/ringlet/calibration.json if present)",
    )
    parser.add_argument("--defaults", action="store_true", help="ignore any calibration file")
    parser.add_argument("--json", action="store_true", help="one JSON object per algorithm")
    parser.add_argument("--sweep", action="store_true", help="sizes x world sizes: best vs chosen")
    parser.add_argument("--plot", metavar="OUT.png", help="time vs size per algorithm (matplotlib)")
    return parser


def _params(args: argparse.Namespace, hosts: int) -> Params:
    from .calibrate import load

    cal = None if args.defaults else load(args.calibration)
    if hosts == 1:
        local = args.link or args.local
        return params_for("25gbit", local, cal, one_host=True)
    return params_for(args.link or "25gbit", args.local, cal)


def _us(t: float) -> str:
    if t >= 1e6:
        return f"{t / 1e6:.2f} s"
    return f"{t / 1e3:.2f} ms" if t >= 1e3 else f"{t:.1f} µs"


def table(preds: Sequence[Prediction], params: Params, seconds: float) -> str:
    """The plan of one call as text: a row per algorithm and the verdict on select's choice."""
    p = preds[0]
    where = f"{p.hosts} hosts x {p.ranks_per_host} ranks" if p.hosts > 1 else f"{p.ranks} ranks"
    lines = [
        f"{p.op}, {format_size(p.nbytes)}, {where} ({params.source}; "
        f"local {params.local.alpha * 1e6:.1f} µs + {params.local.bandwidth / 1e9:.2f} GB/s"
        + (
            f", NIC {params.net.alpha * 1e6:.1f} µs + {params.net.bandwidth / 1e9:.2f} GB/s)"
            if p.hosts > 1
            else ")"
        ),
        f"{'algorithm':<18}{'time':>12}{'busbw GB/s':>12}{'slowest link':>14}{'steps':>8}",
    ]
    for f in sorted(preds, key=lambda f: f.time_us):
        mark = (" <- select" if f.chosen else "") + (" (best)" if f.best else "")
        lines.append(
            f"{f.algo:<18}{_us(f.time_us):>12}{f.busbw:>12.2f}"
            f"{format_size(f.link_bytes):>14}{f.steps:>8}{mark}"
        )
    lines.append(_verdict(preds))
    lines.append(f"(modeled in {seconds:.2f} s{'' if p.exact else ', representative hosts'})")
    return "\n".join(lines)


def _verdict(preds: Sequence[Prediction]) -> str:
    best = next(f for f in preds if f.best)
    chosen = next((f for f in preds if f.chosen), None)
    if chosen is None:
        return "select: not asked (its own model would build every rank's schedule)"
    if chosen.algo == best.algo:
        return f"select picks {chosen.algo}, the model's best"
    gain = chosen.time_us / best.time_us - 1
    return (
        f"select picks {chosen.algo} ({_us(chosen.time_us)}); the model's best is {best.algo} "
        f"({_us(best.time_us)}, {gain:.0%} faster): a threshold to tune"
    )


def _record(f: Prediction) -> dict[str, object]:
    return {
        "algo": f.algo, "time_us": round(f.time_us, 3), "busbw": round(f.busbw, 4),
        "chosen": f.chosen, "best": f.best, "op": f.op, "bytes": f.nbytes, "hosts": f.hosts,
        "ranks_per_host": f.ranks_per_host, "link_bytes": f.link_bytes, "steps": f.steps,
        "exact": f.exact,
    }  # fmt: skip


def _hosts(text: str) -> list[int]:
    try:
        hosts = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise ValueError(f"--hosts takes whole numbers, got {text!r}") from None
    if not hosts or min(hosts) < 1:
        raise ValueError(f"--hosts must be at least 1, got {text!r}")
    return hosts


def main(argv: list[str]) -> int:
    """Run `ringlet plan`; returns the exit code (2 for bad arguments, as argparse)."""
    if argv[:1] == ["calibrate"]:
        from .calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.bytes)
        hosts = _hosts(args.hosts)
        if args.ranks_per_host < 1:
            raise ValueError("--ranks-per-host must be at least 1")
        algos = [a for a in args.algo.split(",") if a] or None
        if args.sweep or args.plot:
            return _sweep(args, sizes, hosts, algos)
        params = _params(args, hosts[0])
        began = time.perf_counter()
        preds = predict(args.op, sizes[0], hosts[0], args.ranks_per_host, params, algos,
                        args.dtype_size, deterministic=args.deterministic)  # fmt: skip
        seconds = time.perf_counter() - began
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.json:
        for f in preds:
            print(json.dumps(_record(f)))
    else:
        print(table(preds, params, seconds))
    return 0


def _sweep(
    args: argparse.Namespace, sizes: list[int], hosts: list[int], algos: list[str] | None
) -> int:
    """Sizes x world sizes: the model's best and select's choice (``--plot``: time vs size)."""
    if len(sizes) == 1 and args.sweep:
        sizes = parse_sizes(SWEEP_SIZES)
    if len(hosts) == 1 and args.sweep and args.hosts == "1":
        hosts = _hosts(SWEEP_HOSTS)
    rows: list[list[Prediction]] = []
    for h in hosts:
        params = _params(args, h)
        for nbytes in sizes:
            rows.append(predict(args.op, nbytes, h, args.ranks_per_host, params, algos,
                                args.dtype_size, deterministic=args.deterministic))  # fmt: skip
    if args.json:
        for preds in rows:
            for f in preds:
                print(json.dumps(_record(f)))
    elif args.sweep:
        print(f"{args.op}, {args.ranks_per_host} ranks per host")
        print(f"{'hosts':>6}{'bytes':>10}{'best':>18}{'time':>12}{'select':>18}{'time':>12}")
        for preds in rows:
            best = next(f for f in preds if f.best)
            chosen = next((f for f in preds if f.chosen), None)
            mark = "" if chosen is None or chosen.algo == best.algo else "  <- differs"
            print(
                f"{best.hosts:>6}{format_size(best.nbytes):>10}{best.algo:>18}"
                f"{_us(best.time_us):>12}"
                f"{chosen.algo if chosen else '-':>18}"
                f"{_us(chosen.time_us) if chosen else '-':>12}{mark}"
            )
    if args.plot:
        _plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _plot(rows: list[list[Prediction]], path: str) -> None:
    """Modeled time against size, one line per algorithm, one panel per world size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            f"--plot needs matplotlib (pip install 'ringlet[bench]'): {error}"
        ) from None
    worlds = sorted({(r[0].hosts, r[0].ranks_per_host) for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 4), squeeze=False)
    for ax, (h, m) in zip(axes[0], worlds, strict=True):
        mine = [r for r in rows if (r[0].hosts, r[0].ranks_per_host) == (h, m)]
        for algo in [f.algo for f in mine[0]]:
            xs = [f.nbytes for r in mine for f in r if f.algo == algo]
            ys = [f.time_us for r in mine for f in r if f.algo == algo]
            ax.plot(xs, ys, marker="o", label=algo)
        ax.set(xscale="log", yscale="log", xlabel="bytes", ylabel="modeled µs",
               title=f"{mine[0][0].op}, {h} x {m} ranks")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)

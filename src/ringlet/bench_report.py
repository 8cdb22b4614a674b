"""How `ringlet bench` shows its records: nccl-tests style rows, the comparison table with ratios,
Markdown for docs, a busbw plot, and a progress bar while it runs.

A record is a dict with `kind` "info" (a backend and its version), "result" (one backend, op and
size), "skip" (what could not run and why) or "ratio" (ringlet's busbw over another backend's).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import IO, Any

from .bench_cases import OPS, format_size

Record = dict[str, Any]
PRIMARY = "ringlet"

ROW_HEADER = (
    f"# {'backend':<8} {'via':<5} {'op':<15} {'size':>10} {'count':>11} {'iters':>5} "
    f"{'time(us)':>10} {'mean(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11}  check"
)


def format_row(record: Record) -> str:
    """One result (or skip) as a line aligned under ROW_HEADER."""
    if record["kind"] == "skip":
        return f"  {record['backend']:<8} skipped: {record['reason']}"
    return (
        f"  {record['backend']:<8} {record['transport']:<5} {record['op']:<15} "
        f"{format_size(record['bytes']):>10} {record['count']:>11} {record['iters']:>5} "
        f"{record['time_us']:>10.2f} {record['mean_us']:>10.2f} {record['algbw_gbps']:>11.3f} "
        f"{record['busbw_gbps']:>11.3f}  {record['check']}"
    )


def format_header(dtype: str, ranks: int) -> str:
    """The lines above the rows: the setup, how times are taken, and the column names."""
    return (
        f"# ringlet bench: {ranks} ranks, {dtype}, root 0\n"
        "# time: median over iters of the slowest rank's call, after warmup and a barrier; "
        "mean: slowest rank's loop / iters\n"
        "# algbw = size / time; busbw = algbw x nccl-tests' factor (all_reduce 2(n-1)/n; "
        "broadcast, reduce 1; others (n-1)/n)\n" + ROW_HEADER
    )


def format_info(record: Record) -> str:
    """A comment line naming a backend, its version and what it moves data over."""
    return f"# {record['backend']}: {record['version']}, via {record['transport']}"


def _results(records: Iterable[Record]) -> dict[tuple[str, str, int], Record]:
    return {(r["backend"], r["op"], r["bytes"]): r for r in records if r["kind"] == "result"}


def ratios(records: Iterable[Record]) -> list[Record]:
    """ringlet's busbw over each other backend's (= their time / ringlet's), per op and size."""
    results = _results(records)
    out = []
    for (backend, op, nbytes), other in results.items():
        mine = results.get((PRIMARY, op, nbytes))
        if backend == PRIMARY or mine is None or mine["time_us"] <= 0:
            continue
        out.append({"kind": "ratio", "op": op, "bytes": nbytes, "versus": backend,
                    "busbw_ratio": other["time_us"] / mine["time_us"]})  # fmt: skip
    return out


def _ordered(
    results: dict[tuple[str, str, int], Record],
) -> tuple[list[str], list[tuple[str, int]]]:
    """Backends (ringlet first) and (op, size) pairs in the order of OPS, then size."""
    backends = sorted({b for b, _, _ in results}, key=lambda b: (b != PRIMARY, b))
    cases = sorted({(op, n) for _, op, n in results}, key=lambda c: (OPS.index(c[0]), c[1]))
    return backends, cases


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def comparison(records: list[Record]) -> str:
    """Per op and size: each backend's time and busbw, then ringlet's busbw ratio to the others."""
    results = _results(records)
    backends, cases = _ordered(results)
    others = [b for b in backends if b != PRIMARY]
    head = (
        f"# {'op':<15} {'size':>10}"
        + "".join(f" {b + ' us':>12} {b + ' GB/s':>11}" for b in backends)
        + "".join(f" {'vs ' + b:>9}" for b in others)
    )
    lines = [
        "# busbw ratio = ringlet busbw / other busbw (same bytes: = other time / ringlet time); "
        ">1 means ringlet is faster",
        head,
    ]
    for op, nbytes in cases:
        line = f"  {op:<15} {format_size(nbytes):>10}"
        for backend in backends:
            r = results.get((backend, op, nbytes))
            line += (
                f" {r['time_us']:>12.2f} {r['busbw_gbps']:>11.3f}" if r else f" {'-':>12} {'-':>11}"
            )
        for backend in others:
            line += f" {_ratio_text(_ratio(results, backend, op, nbytes)):>9}"
        lines.append(line)
    return "\n".join(lines)


def _ratio(
    results: dict[tuple[str, str, int], Record], other: str, op: str, nbytes: int
) -> float | None:
    mine, theirs = results.get((PRIMARY, op, nbytes)), results.get((other, op, nbytes))
    if mine is None or theirs is None or mine["time_us"] <= 0:
        return None
    return float(theirs["time_us"] / mine["time_us"])


def markdown(records: list[Record]) -> str:
    """The comparison as a Markdown table (µs and GB/s per backend, then busbw ratios)."""
    results = _results(records)
    backends, cases = _ordered(results)
    others = [b for b in backends if b != PRIMARY]
    cols = ["op", "size"]
    for backend in backends:
        cols += [f"{backend} µs", f"{backend} busbw GB/s"]
    cols += [f"ringlet / {b}" for b in others]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] * 2 + ["--:"] * (len(cols) - 2)) + "|",
    ]
    for op, nbytes in cases:
        cells = [op, format_size(nbytes)]
        for backend in backends:
            r = results.get((backend, op, nbytes))
            cells += [_number(r["time_us"]), f"{r['busbw_gbps']:.2f}"] if r else ["-", "-"]
        cells += [_ratio_text(_ratio(results, b, op, nbytes)) for b in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float) -> str:
    """Times with three significant digits, without a needless exponent."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


MARKERS = {"ringlet": "o", "gloo": "s", "mpi": "^"}
COLORS = {"ringlet": "C0", "gloo": "C1", "mpi": "C2"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(
            f"--plot needs matplotlib, which is not importable here ({error}); "
            "install it with `pip install matplotlib` (or `pip install ringlet[bench]`)"
        ) from None
    return plt


def format_time(us: float) -> str:
    """A time in µs for an axis: '800 ns', '10 µs', '2.5 ms', '1 s'."""
    for unit, scale in (("s", 1e6), ("ms", 1e3), ("µs", 1.0)):
        if us >= scale:
            return f"{us / scale:g} {unit}"
    return f"{us * 1e3:g} ns"


def _plain(value: float) -> str:
    """0.00001, 0.5, 20: an axis value without an exponent."""
    return f"{value:.{max(0, -math.floor(math.log10(value)))}f}" if 0 < value < 1 else f"{value:g}"


def plot_title(records: list[Record], op: str) -> str:
    """op, dtype, each library's transport, ranks and machine, from the records of a run."""
    results = [r for r in records if r["kind"] == "result" and r["op"] == op]
    dtypes = sorted({r["dtype"] for r in results})
    via = dict.fromkeys(r["backend"] if r["transport"] == r["backend"] else
                        f"{r['backend']} over {r['transport']}" for r in results)  # fmt: skip
    ranks = sorted({r["ranks"] for r in results})
    machines = dict.fromkeys(r["machine"] for r in records if r["kind"] == "info"
                             and r.get("machine"))  # fmt: skip
    parts = [op, "/".join(dtypes), ", ".join(via), "/".join(map(str, ranks)) + " ranks",
             *machines]  # fmt: skip
    return " · ".join(parts)


def figure(records: list[Record], ops: list[str] | None = None) -> Any:
    """A matplotlib Figure: per op a row of two log-log panels, busbw and time per call against
    size, one line with markers per library, every measured size labelled in B/KiB/MiB."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    results = _results(records)
    backends, cases = _ordered(results)
    ops = ops or list(dict.fromkeys(op for op, _ in cases))
    if not ops:
        raise ValueError("nothing to plot: no results in these records")
    fig = plt.figure(figsize=(12, 4.4 * len(ops)), layout="constrained")
    rows = [fig] if len(ops) == 1 else list(fig.subfigures(len(ops), 1))
    for row, op in zip(rows, ops, strict=True):
        row.suptitle(plot_title(records, op), fontsize="medium")
        bw_axes, time_axes = row.subplots(1, 2)
        sizes = sorted({n for _, o, n in results if o == op})
        for backend in backends:
            points = sorted((n, r) for (b, o, n), r in results.items() if b == backend and o == op)
            if not points:
                continue
            xs = [n for n, _ in points]
            style = {"marker": MARKERS.get(backend, "D"), "color": COLORS.get(backend),
                     "markersize": 5, "linewidth": 1.5, "label": backend}  # fmt: skip
            bw_axes.plot(xs, [r["busbw_gbps"] for _, r in points], **style)
            time_axes.plot(xs, [r["time_us"] for _, r in points], **style)
        for axes, ylabel, fmt in (
            (bw_axes, "busbw (GB/s)", lambda v, _: _plain(v)),
            (time_axes, "time per call (median of the slowest rank)", lambda v, _: format_time(v)),
        ):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.xaxis.set_major_locator(FixedLocator(sizes))
            axes.xaxis.set_minor_locator(NullLocator())
            axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(round(v))))
            axes.yaxis.set_major_formatter(FuncFormatter(fmt))
            axes.tick_params(axis="x", labelrotation=60 if len(sizes) > 8 else 0, labelsize=8)
            axes.set_xlabel("message size (nccl-tests convention)")
            axes.set_ylabel(ylabel)
            axes.grid(True, which="both", alpha=0.3)
            axes.legend(fontsize="small")
        bw_axes.set_title("bus bandwidth (higher is better)", fontsize="small")
        time_axes.set_title("latency (lower is better)", fontsize="small")
    return fig


def plot(records: list[Record], path: str) -> list[str]:
    """Save the plots: one PNG with a row per op, or one PNG per op when `path` contains '{op}'
    (busbw-{op}.png). Returns the paths written (needs matplotlib)."""
    plt = _pyplot()
    ops = list(dict.fromkeys(op for op, _ in _ordered(_results(records))[1]))
    groups = [[op] for op in ops] if "{op}" in path else [ops]
    written = []
    for group in groups:
        fig = figure(records, group)
        out = path.replace("{op}", group[0]) if "{op}" in path else path
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


class Progress:
    """A progress bar on a terminal (rich if importable, else one plain line); silent on a pipe."""

    def __init__(self, total: int, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done = total, 0
        self.enabled = enabled and self.stream.isatty()
        self._rich: Any = None
        self._task: Any = None
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return
        self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              console=Console(file=self.stream), transient=True)  # fmt: skip
        self._task = self._rich.add_task("ringlet bench", total=total)
        self._rich.start()

    def print(self, text: str, out: IO[str] | None = None) -> None:
        """Print a line above the bar (to `out`, stdout by default) without breaking it."""
        out = out or sys.stdout
        if self.enabled and self._rich is None:
            self.stream.write("\r\033[K")
        out.write(text + "\n")
        out.flush()
        if self.enabled and self._rich is None and self.done < self.total:
            self._plain()

    def advance(self, what: str) -> None:
        """One more (backend, op, size) finished; `what` names the one now done."""
        self.done += 1
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=what)
        else:
            self._what = what
            self._plain()

    def _plain(self) -> None:
        self.stream.write(f"\r\033[K[{self.done}/{self.total}] {getattr(self, '_what', '')}")
        self.stream.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

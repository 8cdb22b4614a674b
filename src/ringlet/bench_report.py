"""How `ringlet bench` shows its records: nccl-tests style rows, the comparison table with ratios,
Markdown for docs, a busbw plot, and a progress bar while it runs.

A record is a dict with `kind` "info" (a backend and its version), "result" (one backend, op and
size), "skip" (what could not run and why) or "ratio" (ringlet's busbw over another backend's).
"""

from __future__ import annotations

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


def plot(records: list[Record], path: str) -> None:
    """busbw vs size, one line per backend and op, saved to `path` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(
            f"--plot needs matplotlib, which is not importable here ({error}); "
            "install it with `pip install matplotlib` (or `pip install ringlet[bench]`)"
        ) from None
    results = _results(records)
    backends, cases = _ordered(results)
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for op in dict.fromkeys(op for op, _ in cases):
        for backend in backends:
            points = sorted((n, r["busbw_gbps"]) for (b, o, n), r in results.items()
                            if b == backend and o == op)  # fmt: skip
            if points:
                style = "-" if backend == PRIMARY else "--" if backend == "gloo" else ":"
                sizes, busbws = [n for n, _ in points], [bw for _, bw in points]
                axes.plot(sizes, busbws, style, marker="o", markersize=3, label=f"{backend} {op}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("size (bytes, nccl-tests convention)")
    axes.set_ylabel("busbw (GB/s)")
    ranks = next((r["ranks"] for r in results.values()), "?")
    axes.set_title(f"ringlet bench, {ranks} ranks")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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

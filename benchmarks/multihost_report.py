"""The report of benchmarks/multihost.py: the bound a measured link allows, rows, and tables.

Rows join every backend's record for one (layout, cap, op, size) with the bound and the ratios;
the same rows print as rich tables and as the markdown written to results/ and the README.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ringlet.bench_cases import bus_factor, format_size

BACKENDS = ("ringlet", "gloo", "mpi")
OP_ORDER = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def bound_seconds(op: str, counts: Sequence[int], nbytes: int, rate: float) -> float:
    """The least time `op` of nccl-size `nbytes` can take when each host's link moves `rate` bytes/s
    each way and bytes within a host are free (BOUND_RULES says each in words)."""
    hosts, n = len(counts), sum(counts)
    if op == "all_reduce":  # hosts as nodes: reduce-scatter + all-gather between them is optimal
        return 2 * (hosts - 1) / hosts * nbytes / rate
    if op in ("all_gather", "reduce_scatter"):  # a host's own share must leave, the rest arrive
        return max(max(k, n - k) for k in counts) / n * nbytes / rate
    if op == "broadcast":  # every other host must receive all of it, at least once
        return nbytes / rate
    raise ValueError(f"no bound for {op}")


BOUND_RULES = {
    "all_reduce": "2(H-1)/H · S per host each way (H hosts; 2 hosts: S)",
    "all_gather": "max over hosts of max(k, n-k)/n · S (S = output, k ranks on the host)",
    "reduce_scatter": "max over hosts of max(k, n-k)/n · S (S = input of one rank)",
    "broadcast": "S into every host but the root's",
}


def rows(records: list[dict[str, Any]], links: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (layout, cap, op, size): each backend's time and busbw, the bound, the ratios."""
    table: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for rec in (r for r in records if r.get("kind") == "result"):
        key = (rec["layout"], rec["cap"], rec["op"], rec["bytes"])
        row = table.setdefault(key, {"layout": key[0], "cap_gbit": float(key[1]), "op": key[2],
                                     "bytes": key[3], "ranks": rec["ranks"]})  # fmt: skip
        row[rec["backend"]] = {"time_us": rec["time_us"], "busbw_gbps": rec["busbw_gbps"],
                               "check": rec["check"]}  # fmt: skip
    for (layout, cap, op, nbytes), row in table.items():
        counts = [int(c) for c in layout.split("+")]
        rate = links[cap]["rate_Bps"]
        seconds = bound_seconds(op, counts, nbytes, rate)
        row["bound"] = {"time_us": seconds * 1e6, "rule": BOUND_RULES[op],
                        "busbw_gbps": nbytes / seconds / 1e9 * bus_factor(op, row["ranks"])}  # fmt: skip
        if "ringlet" in row:
            row["ringlet_of_bound"] = seconds * 1e6 / row["ringlet"]["time_us"]
            for other in ("gloo", "mpi"):
                if other in row:
                    row[f"ringlet_vs_{other}"] = row[other]["time_us"] / row["ringlet"]["time_us"]
    order = {op: i for i, op in enumerate(OP_ORDER)}
    return sorted(table.values(),
                  key=lambda r: (r["layout"], r["cap_gbit"], order.get(r["op"], 99), r["bytes"]))  # fmt: skip


COLUMNS = ["op", "size", "ringlet ms", "ringlet busbw", "gloo ms", "gloo busbw", "mpi ms",
           "mpi busbw", "bound busbw", "ringlet / bound", "ringlet / gloo", "ringlet / mpi"]  # fmt: skip


def cells(row: dict[str, Any]) -> list[str]:
    """A row's cells for COLUMNS ('—' where a backend did not run; WRONG marks a failed check)."""
    out = [row["op"], format_size(row["bytes"])]
    for name in BACKENDS:
        got = row.get(name)
        if got is None:
            out += ["—", "—"]
            continue
        mark = "" if got["check"] == "ok" else f" {got['check']}"
        out += [f"{got['time_us'] / 1e3:.2f}{mark}", f"{got['busbw_gbps']:.3f}"]
    out.append(f"{row['bound']['busbw_gbps']:.3f}")
    out.append(f"{row['ringlet_of_bound']:.2f}" if "ringlet_of_bound" in row else "—")
    for other in ("gloo", "mpi"):
        ratio = row.get(f"ringlet_vs_{other}")
        out.append(f"{ratio:.2f}x" if ratio is not None else "—")
    return out


def groups(table: list[dict[str, Any]]) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(layout, cap, rows) in order."""
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in table:
        seen.setdefault((row["layout"], f"{row['cap_gbit']:g}"), []).append(row)
    for (layout, cap), got in seen.items():
        yield layout, cap, got


def title(layout: str, cap: str, links: dict[str, Any]) -> str:
    link = links[cap]
    each = " and ".join(f"{r * 8 / 1e9:.2f}" for r in link["each_way_Bps"])
    hosts = len(layout.split("+"))
    return (f"{hosts} hosts, ranks per host {layout}, links capped at {cap} Gbit/s "
            f"(measured {each} Gbit/s, both ways at once)")  # fmt: skip


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tables as markdown, with what they come from."""
    lines = [f"`{meta['command']}` — ringlet commit {meta['commit']}, {meta['date']}, load average "
             f"{meta['load']} at the start; busbw in GB/s, time is the slowest rank's median.", ""]  # fmt: skip
    for layout, cap, got in groups(table):
        lines += [f"**{title(layout, cap, meta['links'])}**", ""]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in got]
        lines.append("")
    lines += ["Bounds (per host link, each way): " + "; ".join(f"{op}: {rule}" for op, rule in
              BOUND_RULES.items() if any(r["op"] == op for r in table)) + "."]  # fmt: skip
    for name, problem in meta["skipped"].items():
        lines.append(f"\n{name}: {problem.splitlines()[0]}")
    return "\n".join(lines) + "\n"


def show(table: list[dict[str, Any]], links: dict[str, Any]) -> None:
    """The tables on the terminal (rich when installed)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for layout, cap, got in groups(table):
            print(title(layout, cap, links))
            for row in got:
                print("  ".join(cells(row)))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # a log file: keep every column readable
    for layout, cap, got in groups(table):
        view = Table(title=title(layout, cap, links))
        for column in COLUMNS:
            view.add_column(column, justify="left" if column in ("op", "size") else "right")
        for row in got:
            view.add_row(*cells(row))
        console.print(view)

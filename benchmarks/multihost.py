"""ringlet vs Gloo vs MPICH across simulated hosts: network namespaces joined by capped links.

For each link cap (tc tbf on both ends of every host's veth) this makes the hosts
(tests/netns.py), measures the link's real rate with a TCP blast between two hosts in both
directions at once, then for each layout runs ringlet and Gloo (the same processes, one after the
other) and MPICH (mpiexec spanning the namespaces through a launcher that enters them), every op and
size through ringlet's own benchmark loop. It prints a table per layout and cap with time, busbw
(nccl-tests definitions), the bound the measured link allows and the ratios, and writes
benchmarks/results/multihost[-smoke].{json,md} (--full also rewrites the section in
benchmarks/README.md between the multihost markers).

    python benchmarks/multihost.py            # smoke: 2+2 at 2 Gbit/s, all_reduce and all_gather at 1 MiB
    python benchmarks/multihost.py --full     # 2+2 and 2+1+1 at 1, 2 and 5 Gbit/s, 4 ops, 1/16/64 MiB
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import netns  # noqa: E402  (tests/netns.py, shared with tests/multihost)

RANK_SCRIPT = Path(__file__).with_name("multihost_rank.py")
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
MARKERS = ("<!-- multihost:begin", "<!-- multihost:end -->")
FULL = {"layouts": "2+2,2+1+1", "caps": "1,2,5", "ops": "all_reduce,all_gather,reduce_scatter,broadcast",
        "sizes": "1M,16M,64M"}  # fmt: skip
SMOKE = {"layouts": "2+2", "caps": "2", "ops": "all_reduce,all_gather", "sizes": "1M"}
BACKENDS = ("ringlet", "gloo", "mpi")
BLAST_PORT = 5201
_ports = itertools.count(29400, 2)  # a fresh pair (ringlet's store, Gloo's store) per job


# ---------------------------------------------------------------- the bound a link allows


def bound_seconds(op: str, counts: Sequence[int], nbytes: int, rate: float) -> float:
    """The least time `op` of nccl-size `nbytes` can take when each host's link moves `rate` bytes/s
    each way and bytes within a host are free (see bound_rule for the reasoning)."""
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


# ---------------------------------------------------------------- running things on the hosts


def measure_link(hosts: netns.Hosts, seconds: float) -> dict[str, Any]:
    """The rate between hosts 0 and 1 with both directions loaded at once (bytes/s each way)."""
    procs = [
        hosts.popen(h, [sys.executable, str(RANK_SCRIPT), "blast", "--peer", hosts.address(1 - h),
                        "--port", str(BLAST_PORT), "--seconds", str(seconds)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for h in (0, 1)
    ]  # fmt: skip
    got = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"link blast failed: {err}")
        got.append(json.loads(out))
    each_way = [g["recv_Bps"] for g in got]
    return {"rate_Bps": sum(each_way) / 2, "each_way_Bps": each_way, "seconds": seconds}


def bench_args(args: argparse.Namespace, layout: str, cap: str, out: Path) -> list[str]:
    """What every rank of one job is told to measure."""
    return ["bench", "--ops", args.ops, "--sizes", ",".join(str(s) for s in args.size_bytes),
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--layout", layout,
            "--cap", cap, "--out", str(out)]  # fmt: skip


def run_ringlet_gloo(
    hosts: netns.Hosts, where: list[int], argv: list[str], backends: list[str], logdir: Path,
    timeout: float,
) -> str | None:  # fmt: skip
    """One process per rank on its host: ringlet, then Gloo; None or what went wrong."""
    master, secret, port = hosts.address(where[0]), secrets.token_hex(16), next(_ports)
    envs = [
        netns.clean_env({
            "RINGLET_RANK": str(r), "RINGLET_WORLD_SIZE": str(len(where)),
            "RINGLET_MASTER": f"{master}:{port}", "RINGLET_SECRET": secret,
            "MULTIHOST_GLOO": f"tcp://{master}:{port + 1}", "GLOO_SOCKET_IFNAME": "eth0",
            "PYTHONUNBUFFERED": "1",
        })
        for r in range(len(where))
    ]  # fmt: skip
    cmd = [sys.executable, str(RANK_SCRIPT), *argv, "--backends", ",".join(backends)]
    outcomes = netns.Job(hosts, where, cmd, envs, logdir).wait(timeout)
    if all(o.returncode == 0 for o in outcomes):
        return None
    return netns.report(outcomes, tail=30)


def launcher_script(hosts: netns.Hosts, path: Path) -> Path:
    """An ssh stand-in for MPICH's hydra: `script [-opts] HOST CMD` runs CMD inside that host."""
    cases = "\n".join(f"  {h.address}) pid={h.holder.pid} ;;" for h in hosts.hosts)
    path.write_text(
        "#!/bin/sh\n# hydra calls this as it would call ssh: [options] HOST COMMAND\n"
        'while [ "${1#-}" != "$1" ]; do shift; done\nhost=$1; shift\n'
        f'case $host in\n{cases}\n  *) echo "no simulated host $host" >&2; exit 1 ;;\nesac\n'
        'exec nsenter -t "$pid" -n -u -i -m --wd="$PWD" -- sh -c "$*"\n'
    )
    path.chmod(0o755)
    return path


def run_mpi(
    hosts: netns.Hosts, where: list[int], argv: list[str], logdir: Path, timeout: float
) -> str | None:
    """mpiexec on rank 0's host, its proxies started in the other hosts by launcher_script."""
    from ringlet.bench_run import mpiexec_path

    mpiexec = mpiexec_path()
    if mpiexec is None:
        return "no mpiexec next to this Python or on PATH (pip install mpich)"
    counts = [where.count(h) for h in sorted(set(where))]
    spec = ",".join(
        f"{hosts.address(h)}:{k}" for h, k in zip(sorted(set(where)), counts, strict=True)
    )
    cmd = [mpiexec, "-launcher", "ssh", "-launcher-exec", str(launcher_script(hosts, logdir / "enter.sh")),
           "-hosts", spec, "-localhost", hosts.address(where[0]), "-n", str(len(where)),
           sys.executable, str(RANK_SCRIPT), *argv, "--backends", "mpi"]  # fmt: skip
    proc = hosts.popen(where[0], cmd, env=netns.clean_env({"PYTHONUNBUFFERED": "1"}),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return f"mpiexec timed out after {timeout:.0f} s:\n{out[-3000:]}"
    return None if proc.returncode == 0 else f"mpiexec exited {proc.returncode}:\n{out[-3000:]}"


# ---------------------------------------------------------------- the report


def rows(records: list[dict[str, Any]], links: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (layout, cap, op, size): each backend's time and busbw, the bound, the ratios."""
    from ringlet.bench_cases import bus_factor

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
    order = {op: i for i, op in enumerate(FULL["ops"].split(","))}
    return sorted(table.values(),
                  key=lambda r: (r["layout"], r["cap_gbit"], order.get(r["op"], 99), r["bytes"]))  # fmt: skip


def _size(nbytes: int) -> str:
    from ringlet.bench_cases import format_size

    return format_size(nbytes)


COLUMNS = ["op", "size", "ringlet ms", "ringlet busbw", "gloo ms", "gloo busbw", "mpi ms",
           "mpi busbw", "bound busbw", "ringlet / bound", "ringlet / gloo", "ringlet / mpi"]  # fmt: skip


def cells(row: dict[str, Any]) -> list[str]:
    """A row's cells for COLUMNS ('—' where a backend did not run; WRONG marks a failed check)."""
    out = [row["op"], _size(row["bytes"])]
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


def rewrite_readme(text: str) -> None:
    """Put `text` between the multihost markers of benchmarks/README.md."""
    readme = README.read_text()
    begin, end = readme.index(MARKERS[0]), readme.index(MARKERS[1])
    begin = readme.index("\n", begin) + 1
    README.write_text(readme[:begin] + text + readme[end:])


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ringlet.bench_cases import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the whole measurement (about 15 minutes)")
    p.add_argument("--layouts", help=f"ranks per host, e.g. 2+2,2+1+1 (smoke {SMOKE['layouts']})")
    p.add_argument("--caps", help=f"link caps in Gbit/s (smoke {SMOKE['caps']})")
    p.add_argument("--ops", help=f"ops (smoke {SMOKE['ops']})")
    p.add_argument("--sizes", help=f"sizes, nccl-tests meaning (smoke {SMOKE['sizes']})")
    p.add_argument("--backends", default=",".join(BACKENDS), help="ringlet,gloo,mpi")
    p.add_argument("--iters", type=int, default=20, help="timed calls (fewer for big sizes, >= 5)")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed calls first (fewer for big sizes)"
    )
    p.add_argument("--blast-seconds", type=float, default=3.0, help="link measurement length")
    p.add_argument(
        "--out", help="results path without extension (default results/multihost[-smoke])"
    )
    p.add_argument("--job-timeout", type=float, default=1200.0, help="seconds per job")
    args = p.parse_args(argv)
    preset = FULL if args.full else SMOKE
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.size_bytes = [parse_size(s) for s in args.sizes.split(",")]
    args.backend_list = args.backends.split(",")
    name = "multihost" if args.full else "multihost-smoke"
    args.out_path = Path(args.out) if args.out else RESULTS / name
    return args


def command_line(argv: list[str] | None) -> str:
    return " ".join(["python benchmarks/multihost.py", *(sys.argv[1:] if argv is None else argv)])


def git_commit(src: Path) -> str:
    """The commit of the ringlet that ran (the checkout holding `src`), "+dirty" if it is edited."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=src, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+dirty" if git("status", "--porcelain", ".") else ""
    )


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit, so the hosts are removed on the way out."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = netns.unavailable()
    if reason is not None:
        print(f"multihost: cannot make simulated hosts: {reason}", file=sys.stderr)
        return 2
    layouts = args.layouts.split(",")
    wheres = {layout: netns.layout_hosts(layout) for layout in layouts}
    nhosts = max(max(w) + 1 for w in wheres.values())
    records: list[dict[str, Any]] = []
    links: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    started = time.monotonic()
    load = f"{os.getloadavg()[0]:.2f}"
    with terminate_cleanly(), tempfile.TemporaryDirectory(prefix="ringlet-multihost-") as tmp:
        for cap in args.caps.split(","):
            with netns.Hosts(nhosts, rate=f"{cap}gbit") as hosts:
                links[cap] = measure_link(hosts, args.blast_seconds)
                print(f"cap {cap} Gbit/s: link measured at "
                      f"{links[cap]['rate_Bps'] * 8 / 1e9:.2f} Gbit/s each way", flush=True)  # fmt: skip
                for layout in layouts:
                    out = Path(tmp) / f"{layout}-{cap}.jsonl"
                    argv_rank = bench_args(args, layout, cap, out)
                    logdir = Path(tmp) / f"logs-{layout}-{cap}"
                    logdir.mkdir()
                    together = [b for b in args.backend_list if b in ("ringlet", "gloo")]
                    if together:
                        problem = run_ringlet_gloo(hosts, wheres[layout], argv_rank, together,
                                                   logdir, args.job_timeout)  # fmt: skip
                        if problem:
                            skipped[f"ringlet/gloo {layout} {cap}G"] = problem
                            print(problem, file=sys.stderr)
                    if "mpi" in args.backend_list:
                        problem = run_mpi(
                            hosts, wheres[layout], argv_rank, logdir, args.job_timeout
                        )
                        if problem:
                            skipped[f"mpi {layout} {cap}G"] = problem
                            print(problem, file=sys.stderr)
                    if out.exists():
                        records += [json.loads(line) for line in out.read_text().splitlines()]
                    print(f"  {layout}: done after {time.monotonic() - started:.0f} s", flush=True)
    table = rows(records, links)
    import ringlet

    src = Path(ringlet.__file__).parent
    meta = {"command": command_line(argv), "commit": git_commit(src), "date": str(date.today()),
            "ringlet": str(src),
            "load": load, "machine": f"{os.cpu_count()} cores, {platform.platform()}",
            "links": links, "skipped": skipped, "seconds": time.monotonic() - started,
            "bounds": BOUND_RULES}  # fmt: skip
    show(table, links)
    text = markdown(table, meta)
    args.out_path.parent.mkdir(parents=True, exist_ok=True)
    args.out_path.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": table, "records": records}, indent=1) + "\n"
    )
    args.out_path.with_suffix(".md").write_text(text)
    if args.full:
        rewrite_readme(text)
    print(f"wrote {args.out_path}.json and .md in {meta['seconds']:.0f} s")
    wrong = [r for r in records if r.get("kind") == "result" and r["check"] != "ok"]
    return 1 if wrong or skipped else 0


if __name__ == "__main__":
    sys.exit(main())

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
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from multihost_report import BACKENDS, BOUND_RULES, markdown, rows, show  # noqa: E402

import netns  # noqa: E402  (tests/netns.py, shared with tests/multihost)

RANK_SCRIPT = Path(__file__).with_name("multihost_rank.py")
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
MARKERS = ("<!-- multihost:begin", "<!-- multihost:end -->")
FULL = {"layouts": "2+2,2+1+1", "caps": "1,2,5", "ops": "all_reduce,all_gather,reduce_scatter,broadcast",
        "sizes": "1M,16M,64M"}  # fmt: skip
SMOKE = {"layouts": "2+2", "caps": "2", "ops": "all_reduce,all_gather", "sizes": "1M"}
BLAST_PORT = 5201
_ports = itertools.count(29400, 2)  # a fresh pair (ringlet's store, Gloo's store) per job


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


def rewrite_readme(text: str) -> None:
    """Put `text` between the multihost markers of benchmarks/README.md."""
    readme = README.read_text()
    begin, end = readme.index(MARKERS[0]), readme.index(MARKERS[1])
    begin = readme.index("\n", begin) + 1
    README.write_text(readme[:begin] + text + readme[end:])


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

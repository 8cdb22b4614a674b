"""`ringlet bench`: nccl-tests style time, algbw and busbw per collective and size, optionally
against torch.distributed's Gloo and MPI (mpi4py) in the same run.

Three ways it runs:
- `ringlet bench -n N …` launches itself on N local ranks (ringlet.launch) and shows the results,
  with a progress bar, as the ranks write them to a file;
- without -n it runs in the ranks it was started in (`ringlet run -n N python -m ringlet bench …`)
  and rank 0 prints; `--compare gloo` then runs Gloo in the same processes after ringlet,
  `--compare mpi` has rank 0 start `mpiexec -n N python -m ringlet.bench --backend mpi …`;
- `--backend mpi|gloo` is one library alone (how the MPI run above is started).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from . import bench_report as report
from .bench_cases import OPS, format_size, parse_dtype, parse_sizes
from .bench_run import comparison_problems, plan, run_in_ranks, worker_args

BACKENDS = ("ringlet", "gloo", "mpi")
Record = dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringlet bench",
        description="Time collectives nccl-tests style: time (µs), algbw and busbw (GB/s) per op "
        "and size. Sizes follow nccl-tests: all_gather/gather count their output, "
        "reduce_scatter/scatter their input, all_to_all one rank's buffer.",
    )
    parser.add_argument(
        "-n",
        "--nproc-per-node",
        dest="nproc",
        type=int,
        metavar="N",
        help="start N ranks on this node, as `ringlet run -n N` does (one node: N ranks in all); "
        "without it, run in the ranks of the job it was started in",
    )
    parser.add_argument("--nproc", dest="old_nproc", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated collectives, or 'all' (default: {','.join(OPS)})",
    )
    parser.add_argument(
        "--sizes",
        default="8:256M",
        help="MIN:MAX doubling (MIN:MAX:FACTOR), or a list like 8,1M,16M (8:256M)",
    )
    parser.add_argument("--dtype", default="float32", help="element type (float32)")
    parser.add_argument(
        "--iters", type=int, default=20, help="timed calls per op and size, fewer above 16 MiB (20)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before them (5)")
    parser.add_argument(
        "--compare",
        default="",
        help="also time these in the same run: gloo (torch.distributed), mpi (mpi4py)",
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "shm"),
        help="force ringlet's transport (sets RINGLET_TRANSPORT)",
    )
    parser.add_argument(
        "--algo",
        default="",
        help="force ringlet's algorithm: NAME for every op, or op=NAME,op=NAME",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument(
        "--markdown", action="store_true", help="end with the comparison as a Markdown table"
    )
    parser.add_argument(
        "--plot",
        metavar="OUT.png",
        help="save busbw and latency vs size, a row per op (OUT-{op}.png: one file per op; "
        "needs matplotlib)",
    )
    parser.add_argument(
        "--load",
        metavar="FILE",
        help="show the JSON lines of an earlier --json run instead of running",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="ringlet",
        help="the library to time (ringlet); gloo and mpi are for --compare",
    )
    parser.add_argument("--results", help=argparse.SUPPRESS)  # where ranks write records for -n
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; argument errors exit with status 2 and a message, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.op_list = list(OPS) if args.ops.strip() == "all" else _names(args.ops, OPS, "--ops")
        args.size_list = parse_sizes(args.sizes)
        args.dtype_obj = parse_dtype(args.dtype)
        args.compare_list = _names(args.compare, BACKENDS[1:], "--compare") if args.compare else []
        args.algos = parse_algos(args.algo, args.op_list)
    except ValueError as error:
        parser.error(str(error))
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.old_nproc is not None:  # the spelling before -n meant what it means for ringlet run
        print("ringlet bench: --nproc is deprecated; use -n / --nproc-per-node N (ranks on this "
              "node, as for ringlet run)", file=sys.stderr)  # fmt: skip
        args.nproc = args.nproc if args.nproc is not None else args.old_nproc
    if args.nproc is not None and args.nproc < 1:
        parser.error("-n must be >= 1")
    if args.compare_list and args.backend != "ringlet":
        parser.error("--compare compares other libraries with ringlet; drop --backend")
    return args


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(
            f"{flag}: unknown {', '.join(unknown) or 'empty list'}; "
            f"choose from {', '.join(allowed)}"
        )
    return list(dict.fromkeys(names))


def parse_algos(text: str, ops: list[str]) -> dict[str, str]:
    """'ring' → that algorithm for every op; 'all_reduce=ring,broadcast=tree' → per op."""
    if not text.strip():
        return {}
    if "=" not in text:
        return {op: text.strip() for op in ops}
    algos = {}
    for item in text.split(","):
        op, sep, name = item.partition("=")
        if not sep or op.strip() not in OPS or not name.strip():
            raise ValueError(f"--algo: bad item {item!r}; write NAME or op=NAME,op=NAME")
        algos[op.strip()] = name.strip()
    return algos


# -- where records go ---------------------------------------------------------------------------
class JsonSink:
    """Records as JSON lines to a file or stdout, flushed one by one (read by the launcher)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def add(self, record: Record) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class Display:
    """Shows records as they come (rows or JSON lines) and the comparison at the end."""

    def __init__(self, args: argparse.Namespace, cases: int, *, rows: bool = True) -> None:
        """`cases` per backend, for the progress bar (0: no bar); `rows`: show each record."""
        self.args, self.rows = args, rows
        self.records: list[Record] = []
        backends = 1 + len(args.compare_list)
        enabled = cases > 0 and not args.no_progress
        self.progress = report.Progress(cases * backends, enabled=enabled)
        self.header_done = False
        self.lock = threading.Lock()

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)
            kind = record["kind"]
            if not self.rows:
                pass
            elif self.args.json:
                self.progress.print(json.dumps(record))
            elif kind == "info":
                if not self.header_done:
                    self.progress.print(report.format_header(self.args.dtype, record["ranks"]))
                    self.header_done = True
                self.progress.print(report.format_info(record))
            else:
                self.progress.print(report.format_row(record))
            if kind == "result":
                label = f"{record['backend']} {record['op']} {format_size(record['bytes'])}"
                self.progress.advance(label)
            elif kind == "skip":
                for _ in range(record.get("cases", 0)):
                    self.progress.advance(f"{record['backend']} skipped")

    def finish(self) -> int:
        """Comparison, plot; 1 when a backend gave a wrong result, else 0."""
        self.progress.close()
        return show_summary(self.args, self.records)


def show_summary(args: argparse.Namespace, records: list[Record]) -> int:
    """Comparison table, plot, errors; the exit code: 1 for a wrong result, else 2 when a backend
    asked for skipped its cases, else 0."""
    ratios = report.ratios(records)
    if args.markdown:
        print(report.markdown(records))
    elif args.json:
        for ratio in ratios:
            print(json.dumps(ratio))
    elif ratios:
        print(report.comparison(records))
    if args.plot and any(r["kind"] == "result" for r in records):
        for path in report.plot(records, args.plot):
            print(f"# plot saved to {path}", file=sys.stderr)
    wrong = [r for r in records if r["kind"] == "result" and r["check"] != "ok"]
    for record in wrong:
        print(
            f"ringlet bench: {record['backend']} {record['op']} {format_size(record['bytes'])}: "
            f"result {record['check']}",
            file=sys.stderr,
        )
    skipped = [r for r in records if r["kind"] == "skip"]
    for record in skipped:  # a comparison (or ringlet) asked for that did not run all its cases
        print(
            f"ringlet bench: {record['backend']} did not run: {record['reason']}", file=sys.stderr
        )
    return 1 if wrong else 2 if skipped else 0


def launch_ranks(args: argparse.Namespace) -> int:
    """`-n N`: run the ranks through ringlet.launch; show their records as they appear."""
    from .launch import launch

    display = Display(args, len(plan(args, args.nproc)))
    with tempfile.TemporaryDirectory(prefix="ringlet-bench-") as tmp:
        results = Path(tmp) / "records.jsonl"
        results.touch()
        cmd = [sys.executable, "-m", "ringlet.bench", *worker_args(args), "--results", str(results)]
        if args.compare_list:
            cmd += ["--compare", ",".join(args.compare_list)]
        stop = threading.Event()
        tail = threading.Thread(target=_tail, args=(results, display, stop), daemon=True)
        tail.start()
        try:
            code = launch(cmd, args.nproc, transport=args.transport)
        finally:
            stop.set()
            tail.join()
    summary = display.finish()
    if code != 0:
        print(f"ringlet bench: the benchmark ranks failed (exit code {code})", file=sys.stderr)
        return code
    return summary


def _tail(path: Path, display: Display, stop: threading.Event) -> None:
    """Pass each complete line appended to `path` to the display until `stop`, then the rest."""
    with path.open() as stream:
        pending = ""
        while True:
            finished = stop.is_set()  # read once more after the ranks ended: nothing is lost
            pending += stream.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    display.add(json.loads(line))
            if finished:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def _results_sink(target: str | None, args: argparse.Namespace) -> Iterator[Any]:
    """The records' destination in the ranks: a file or stdout (as JSON) or, alone, the display."""
    if target == "-":
        yield JsonSink(sys.stdout)
    elif target:
        with open(target, "a") as stream:
            yield JsonSink(stream)
    else:
        yield Display(args, 0)  # no bar: a rank's output is a pipe to its launcher


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ringlet bench` / `python -m ringlet.bench`; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before the run
        print(
            "ringlet bench: --plot needs matplotlib, which is not importable here; "
            "pip install matplotlib (or ringlet[bench])",
            file=sys.stderr,
        )
        return 2
    if args.load:
        return show_saved(args)
    problems = comparison_problems(args.compare_list, args.dtype_obj)
    for problem in problems:  # before any rank starts: a comparison asked for must run
        print(f"ringlet bench: {problem}", file=sys.stderr)
    if problems:
        return 2
    if args.nproc is not None:
        return launch_ranks(args)
    with _results_sink(args.results, args) as sink:
        code = run_in_ranks(args, sink)
        if isinstance(sink, Display) and sink.records and code == 0:  # rank 0 shows, others not
            code = sink.finish()
    return code


def show_saved(args: argparse.Namespace) -> int:
    """`--load FILE`: show an earlier run's JSON lines as if it ran now (only the table with
    --markdown)."""
    display = Display(args, 0, rows=not args.markdown)
    with open(args.load) as stream:
        for line in stream:
            if line.strip().startswith("{"):
                record = json.loads(line)
                if record["kind"] != "ratio":  # recomputed from the results
                    display.add(record)
    return display.finish()


if __name__ == "__main__":
    sys.exit(main())

"""The `ringlet` command line: `ringlet run`, `ringlet bench`, `ringlet plan`, `ringlet version`.

Only argument parsing lives here; each subcommand's work is in its own module.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Any


def _version() -> str:
    return f"ringlet {metadata.version('ringlet')}"


class _VersionAction(argparse.Action):
    """--version: the installed version, looked up only when asked (it scans site-packages)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print ringlet's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; `bench` passes its arguments on untouched."""
    parser = argparse.ArgumentParser(
        prog="ringlet", description="Collective communication for Python processes."
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="subcommand", metavar="{run,bench,plan,version}")
    commands.required = True

    run = commands.add_parser(
        "run",
        help="start N ranks of a script or command on this node",
        description="Start N ranks of a script (script.py args…) or any command on this node. "
        "One rank failing ends the job and exits non-zero.",
        usage="ringlet run [options] -n N (script.py | command) [args …]",
    )
    from ringlet.launch import add_arguments

    add_arguments(run)

    commands.add_parser(
        "bench", add_help=False, help="measure collective bandwidth (see ringlet bench --help)"
    )
    commands.add_parser(
        "plan",
        add_help=False,
        help="predict a collective's time per algorithm (see ringlet plan --help)",
    )
    commands.add_parser("version", help="print ringlet's version")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `ringlet` command line; returns the process exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.subcommand == "bench":
        try:
            from ringlet.bench import main as bench_main
        except ImportError as error:
            print(f"ringlet bench is not available in this installation ({error})", file=sys.stderr)
            return 2
        return int(bench_main(rest))
    if args.subcommand == "plan":
        from ringlet.plan_cli import main as plan_main

        return plan_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.subcommand == "version":
        print(_version())
        return 0
    from ringlet.launch import run_main

    return run_main(args)

"""`ringlet bench`'s command line as a user meets it: a comparison that cannot run exits non-zero
with the reason (checked before any rank starts, and after a run that skipped one), and `-n` means
what it means for `ringlet run` (ranks on this node), with the old `--nproc` still accepted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet import cli
from ringlet.bench import build_parser, parse_args, show_summary

TIMEOUT = 120
QUICK = ["--ops", "all_reduce", "--sizes", "8", "--iters", "1", "--warmup", "0", "--json"]
# Installed by sitecustomize before anything runs: `import torch` / `import mpi4py` then fail as
# they do where the package is not installed (find_spec raises ModuleNotFoundError).
HIDE = """
import sys
class _Hide:
    hidden = {hidden!r}
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""


def _bench(*argv: str, hide: tuple[str, ...] = (), tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    if hide:
        (tmp / "sitecustomize.py").write_text(HIDE.format(hidden=set(hide)))
        env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")]).rstrip(":")
    cmd = [sys.executable, "-m", "ringlet", "bench", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.mark.timeout(TIMEOUT)
def test_a_comparison_whose_library_is_missing_exits_2_before_any_rank_starts(
    tmp_path: Path,
) -> None:
    done = _bench(
        "-n", "2", *QUICK, "--compare", "gloo,mpi", hide=("torch", "mpi4py"), tmp=tmp_path
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    for says in ("--compare gloo needs torch, which is not importable here",
                 "--compare mpi needs mpi4py, which is not importable here"):  # fmt: skip
        assert says in done.stderr, done.stderr
    assert done.stdout == "", "no rank should have run: " + done.stdout


@pytest.mark.timeout(TIMEOUT)
def test_a_dtype_gloo_cannot_reduce_exits_2_naming_it(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not importable here: nothing to check the dtype against")
    done = _bench("-n", "2", *QUICK, "--dtype", "int16", "--compare", "gloo", tmp=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "gloo backend does not reduce int16" in done.stderr, done.stderr


def test_a_comparison_skipped_during_the_run_makes_the_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A peer that could not run on some rank (a skip record, as the ranks send it)."""
    args = parse_args(["--json", "--compare", "gloo"])
    ok = {"kind": "result", "backend": "ringlet", "op": "all_reduce", "bytes": 8, "check": "ok",
          "time_us": 10.0, "busbw_gbps": 0.0, "ranks": 2}  # fmt: skip
    skip = {"kind": "skip", "backend": "gloo", "cases": 1,
            "reason": "torch is not importable on every rank (pip install torch)"}  # fmt: skip
    assert show_summary(args, [ok]) == 0
    assert show_summary(args, [ok, skip]) == 2
    assert "gloo did not run: torch is not importable on every rank" in capsys.readouterr().err


@pytest.mark.timeout(TIMEOUT)
def test_n_means_ranks_on_this_node_as_for_ringlet_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both commands spell it -n N / --nproc-per-node N; the old --nproc still starts N ranks,
    with a deprecation message (the -n path itself runs in test_bench_cli)."""
    assert "-n N, --nproc-per-node N" in build_parser().format_help()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "-h"])
    assert "-n N, --nproc-per-node N" in capsys.readouterr().out
    assert parse_args(["--nproc-per-node", "3"]).nproc == parse_args(["-n", "3"]).nproc == 3
    done = _bench("--nproc", "2", *QUICK, tmp=tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    info = [json.loads(line) for line in done.stdout.splitlines() if '"info"' in line]
    assert [r["ranks"] for r in info] == [2], done.stdout
    assert "--nproc is deprecated; use -n / --nproc-per-node" in done.stderr, done.stderr

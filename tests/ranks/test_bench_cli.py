"""`ringlet bench` end to end: real ranks launched by the command line, JSON lines checked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringlet.bench_cases import bandwidths
from ringlet.bench_run import mpiexec_path

TIMEOUT = 240
QUICK = ["--ops", "all_reduce", "--sizes", "8,64K", "--iters", "3", "--warmup", "1", "--json"]


def _bench(*argv: str, launcher: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the command, require exit 0, return its JSON lines (other lines must be comments)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    cmd = [*(launcher or [sys.executable, "-m", "ringlet"]), "bench", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), done.stdout
    return [json.loads(line) for line in lines]


def _results(records: list[dict[str, Any]], backend: str) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["op"], r["bytes"]): r for r in records
            if r["kind"] == "result" and r["backend"] == backend}  # fmt: skip


def _check_result_lines(records: list[dict[str, Any]], backend: str, ranks: int) -> None:
    results = _results(records, backend)
    assert set(results) == {("all_reduce", 8), ("all_reduce", 65536)}
    for (op, nbytes), r in results.items():
        assert r["check"] == "ok" and r["ranks"] == ranks and r["dtype"] == "float32"
        assert r["count"] == nbytes // 4 and r["iters"] == 3 and r["warmup"] == 1
        assert 0 < r["time_us"] < 10e6 and r["mean_us"] > 0
        algbw, busbw = bandwidths(op, nbytes, r["time_us"] / 1e6, ranks)
        assert r["algbw_gbps"] == pytest.approx(algbw) and r["busbw_gbps"] == pytest.approx(busbw)
    info = [r for r in records if r["kind"] == "info" and r["backend"] == backend]
    assert len(info) == 1 and info[0]["ranks"] == ranks


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    """One quick run on two ranks, read by the tests that need no other options."""
    return _bench("-n", "2", *QUICK)


@pytest.mark.timeout(TIMEOUT)
def test_bench_launches_two_ranks_and_prints_json_lines(two_ranks: list[dict[str, Any]]) -> None:
    records = two_ranks
    _check_result_lines(records, "ringlet", 2)
    assert {r["kind"] for r in records} == {"info", "result"}  # nothing to compare with


@pytest.mark.timeout(TIMEOUT)
def test_bench_over_forced_tcp_says_so() -> None:
    records = _bench("-n", "2", *QUICK, "--transport", "tcp")
    _check_result_lines(records, "ringlet", 2)
    assert {r["transport"] for r in _results(records, "ringlet").values()} == {"tcp"}


@pytest.mark.timeout(TIMEOUT)
def test_bench_checks_every_op_on_three_ranks() -> None:
    records = _bench("-n", "3", "--ops", "all", "--sizes", "8,4K", "--iters", "1",
                     "--warmup", "0", "--json")  # fmt: skip
    results = _results(records, "ringlet")
    assert len(results) == 16
    assert {r["check"] for r in results.values()} == {"ok"}
    assert results[("all_gather", 12)]["count"] == 3  # 8 B rounds up to one float per rank


@pytest.mark.timeout(TIMEOUT)
def test_bench_compares_with_gloo() -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not importable here; the Gloo comparison needs it")
    records = _bench("-n", "2", *QUICK, "--compare", "gloo")
    _check_result_lines(records, "ringlet", 2)
    _check_result_lines(records, "gloo", 2)
    ratios = {(r["op"], r["bytes"], r["versus"]): r["busbw_ratio"]
              for r in records if r["kind"] == "ratio"}  # fmt: skip
    assert set(ratios) == {("all_reduce", 8, "gloo"), ("all_reduce", 65536, "gloo")}
    mine, gloo = _results(records, "ringlet"), _results(records, "gloo")
    for (op, nbytes, _), ratio in ratios.items():
        assert ratio == pytest.approx(gloo[op, nbytes]["time_us"] / mine[op, nbytes]["time_us"])


@pytest.mark.timeout(TIMEOUT)
def test_bench_compares_with_mpi() -> None:
    if importlib.util.find_spec("mpi4py") is None or mpiexec_path() is None:
        pytest.skip("mpi4py or mpiexec is missing here; the MPI comparison needs both")
    records = _bench("-n", "2", *QUICK, "--compare", "mpi")
    _check_result_lines(records, "mpi", 2)
    assert {r["versus"] for r in records if r["kind"] == "ratio"} == {"mpi"}


@pytest.mark.timeout(TIMEOUT)
def test_bench_runs_inside_ringlet_run_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "busbw.png"
    launcher = [sys.executable, "-m", "ringlet", "run", "--no-prefix", "-n", "2",
                sys.executable, "-m", "ringlet"]  # fmt: skip
    records = _bench(*QUICK, "--plot", str(png), launcher=launcher)
    _check_result_lines(records, "ringlet", 2)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(TIMEOUT)
def test_bench_reloads_its_json_as_markdown(
    two_ranks: list[dict[str, Any]], tmp_path: Path
) -> None:
    saved = tmp_path / "run.jsonl"
    records = two_ranks
    saved.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run([sys.executable, "-m", "ringlet", "bench", "--load", str(saved),
                           "--markdown"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "| op | size | ringlet µs | ringlet busbw GB/s |"
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| all_reduce", "8 B"],
                                                             ["| all_reduce", "64 KiB"]]  # fmt: skip

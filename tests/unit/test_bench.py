"""`ringlet bench` without processes: formulas, sizes, cases, result checks, the timing loop, output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from ringlet.bench import parse_algos, parse_args, show_summary
from ringlet.bench_backends import Backend, Step, measure
from ringlet.bench_cases import (
    OPS,
    Case,
    bandwidths,
    bus_factor,
    check_result,
    format_size,
    iterations,
    make_case,
    parse_dtype,
    parse_size,
    parse_sizes,
    rank_input,
)
from ringlet.bench_report import Progress, comparison, format_row, markdown, plot, ratios
from ringlet.bench_run import plan, worker_args

F32 = np.dtype(np.float32)


# -- formulas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_bus_factors_are_nccl_tests(n: int) -> None:
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("broadcast", "reduce"):
        assert bus_factor(op, n) == 1.0
    for op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        assert bus_factor(op, n) == pytest.approx((n - 1) / n)


def test_bandwidths_are_bytes_over_seconds_in_gb() -> None:
    algbw, busbw = bandwidths("all_reduce", 1_000_000_000, 0.5, 4)
    assert algbw == pytest.approx(2.0)
    assert busbw == pytest.approx(2.0 * 1.5)
    assert bandwidths("all_gather", 64 << 20, 0.01, 2) == pytest.approx(
        ((64 << 20) / 0.01 / 1e9, (64 << 20) / 0.01 / 1e9 / 2)
    )
    assert bandwidths("broadcast", 8, 0.0, 2) == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown op"):
        bus_factor("allreduce", 2)


# -- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("8", 8), ("64K", 65536), ("1M", 1 << 20), ("1MiB", 1 << 20), ("16mb", 16 << 20),
     ("2G", 2 << 30), (" 3 K ", 3072)],
)  # fmt: skip
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "1T", "-8", "1.5M", "M", "eight"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_sizes_ranges_and_lists() -> None:
    assert parse_sizes("8:256M") == [8 << k for k in range(26)]
    assert parse_sizes("8,1M,16M") == [8, 1 << 20, 16 << 20]
    assert parse_sizes("1K:64K:4") == [1024, 4096, 16384, 65536]
    assert parse_sizes("16M,8,8:32") == [8, 16, 32, 16 << 20]  # mixed, sorted, unique
    assert parse_sizes("8:100") == [8, 16, 32, 64]  # MAX need not be reached exactly
    for bad in ("1M:8", "8:1M:1", "8:1M:x", "8,,16", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_format_size() -> None:
    assert [format_size(n) for n in (8, 1023, 1024, 1536, 1 << 20, 64 << 20, 3 << 30)] == [
        "8 B", "1023 B", "1 KiB", "1.5 KiB", "1 MiB", "64 MiB", "3 GiB"
    ]  # fmt: skip


def test_parse_dtype() -> None:
    assert parse_dtype("float32") == F32
    assert parse_dtype("bfloat16").name == "bfloat16"
    with pytest.raises(ValueError, match="float32"):
        parse_dtype("bool")
    with pytest.raises(ValueError, match="unsupported"):
        parse_dtype("float8")


# -- cases ------------------------------------------------------------------------------------
def test_case_sizes_follow_nccl_tests() -> None:
    mib = 1 << 20
    ag = make_case("all_gather", mib, F32, 4)  # size = output
    assert (ag.count_in, ag.count_out, ag.nbytes) == (mib // 16, mib // 4, mib)
    rs = make_case("reduce_scatter", mib, F32, 4)  # size = input
    assert (rs.count_in, rs.count_out, rs.nbytes) == (mib // 4, mib // 16, mib)
    a2a = make_case("all_to_all", mib, F32, 4)  # size = one rank's buffer
    assert (a2a.count_in, a2a.count_out) == (mib // 4, mib // 4)
    sc = make_case("scatter", mib, F32, 4)
    assert (sc.count_in, sc.count_out) == (mib // 4, mib // 16)
    ar = make_case("all_reduce", mib, F32, 4)
    assert (ar.count_in, ar.count_out, ar.nbytes) == (mib // 4, mib // 4, mib)


def test_tiny_and_uneven_sizes_round_to_whole_elements() -> None:
    assert make_case("all_reduce", 8, F32, 4).nbytes == 8
    assert make_case("all_reduce", 2, F32, 4).nbytes == 4  # at least one element
    ag = make_case("all_gather", 8, F32, 4)  # two elements cannot be split 4 ways
    assert (ag.count_in, ag.count_out, ag.nbytes) == (1, 4, 16)
    assert make_case("reduce_scatter", 100, F32, 3).nbytes == 96  # 25 elements → 24
    with pytest.raises(ValueError, match="unknown op"):
        make_case("alltoall", 8, F32, 2)


def test_iterations_scale_down_for_big_sizes() -> None:
    assert iterations(20, 5, 8) == (20, 5)
    assert iterations(20, 5, 16 << 20) == (16, 4)
    assert iterations(20, 5, 256 << 20) == (5, 1)
    assert iterations(3, 0, 256 << 20) == (3, 0)  # never more than asked


def _reference(case: Case, rank: int) -> np.ndarray | None:
    """What rank holds after `case`, from NumPy on every rank's input (independent of the checker)."""
    n = case.ranks
    inputs = [rank_input(case, r) for r in range(n)]
    if case.op in ("all_reduce", "reduce"):
        total = np.sum([x.astype(np.float64) for x in inputs], axis=0).astype(case.dtype)
        return total if case.op == "all_reduce" or rank == 0 else None
    if case.op == "broadcast":
        return inputs[0].copy()
    if case.op in ("all_gather", "gather"):
        return np.concatenate(inputs) if case.op == "all_gather" or rank == 0 else None
    if case.op == "reduce_scatter":
        total = np.sum([x.astype(np.float64) for x in inputs], axis=0).astype(case.dtype)
        return np.split(total, n)[rank]
    if case.op == "scatter":
        return np.split(inputs[0], n)[rank]
    return np.concatenate([np.split(x, n)[rank] for x in inputs])  # all_to_all


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "float64"])
def test_check_accepts_the_right_result_and_catches_a_wrong_one(op: str, dtype: str) -> None:
    case = make_case(op, 4096 + 24, parse_dtype(dtype), 3)
    for rank in range(3):
        good = _reference(case, rank)
        assert check_result(case, rank, good) is None
        if good is None:
            continue
        bad = good.copy()
        bad[-1] = bad[-1] + 1
        assert check_result(case, rank, bad) == (
            f"element {bad.size - 1} is {bad[-1]}, expected {good[-1]}"
        )
        assert "expected" in (check_result(case, rank, good[:-1]) or "")
        assert check_result(case, rank, None) == "no result was returned"


def test_inputs_differ_between_ranks_so_misplaced_blocks_are_caught() -> None:
    case = make_case("all_gather", 3 * 4 * 11, F32, 3)
    good = _reference(case, 0)
    assert good is not None
    swapped = np.concatenate(np.split(good, 3)[::-1])
    assert check_result(case, 0, swapped) is not None


# -- the timing loop --------------------------------------------------------------------------
class LocalBackend(Backend):
    """One rank, collectives done by NumPy; `wrong` makes every result off by one."""

    name = "local"
    transport = "none"

    def __init__(self, wrong: bool = False) -> None:
        self.wrong, self.calls, self.barriers = wrong, 0, 0

    def step(self, case: Case, send: np.ndarray | None, recv: np.ndarray) -> Step:
        def run() -> np.ndarray:
            self.calls += 1
            assert send is not None
            recv[...] = send + 1 if self.wrong else send
            return recv

        return run

    def barrier(self) -> None:
        self.barriers += 1

    def max_over_ranks(self, values: np.ndarray) -> np.ndarray:
        return values.copy()


def test_measure_times_checks_and_reports() -> None:
    backend = LocalBackend()
    case = make_case("all_reduce", 1 << 16, F32, 1)
    record = measure(backend, case, iters=7, warmup=2)
    assert backend.calls == 1 + 2 + 7  # the checked call, warmup, timed
    assert backend.barriers == 2  # before the check, before the timed loop
    assert record["check"] == "ok"
    assert (record["iters"], record["warmup"], record["bytes"], record["count"]) == (
        7,
        2,
        65536,
        16384,
    )
    assert record["time_us"] > 0 and record["mean_us"] > 0
    algbw, busbw = bandwidths("all_reduce", 65536, record["time_us"] / 1e6, 1)
    assert record["algbw_gbps"] == pytest.approx(algbw) and record["busbw_gbps"] == busbw == 0.0
    json.dumps(record)  # every record is one JSON line


def test_measure_flags_a_wrong_result(capsys: pytest.CaptureFixture[str]) -> None:
    record = measure(LocalBackend(wrong=True), make_case("broadcast", 64, F32, 1), 3, 0)
    assert record["check"] == "WRONG on rank 0"
    assert (
        "local broadcast 64 B gave a wrong result on rank 0: element 0" in capsys.readouterr().err
    )


# -- command line and output ------------------------------------------------------------------
def _result(backend: str, op: str, nbytes: int, time_us: float) -> dict[str, object]:
    algbw, busbw = bandwidths(op, nbytes, time_us / 1e6, 2)
    return {"kind": "result", "backend": backend, "transport": "tcp", "op": op, "bytes": nbytes,
            "count": nbytes // 4, "dtype": "float32", "ranks": 2, "iters": 5, "warmup": 1,
            "time_us": time_us, "mean_us": time_us, "algbw_gbps": algbw, "busbw_gbps": busbw,
            "check": "ok"}  # fmt: skip


RECORDS = [
    _result("ringlet", "all_reduce", 1 << 20, 100.0),
    _result("gloo", "all_reduce", 1 << 20, 400.0),
    _result("mpi", "all_reduce", 1 << 20, 50.0),
    _result("ringlet", "all_reduce", 8, 5.0),
    _result("gloo", "all_reduce", 8, 200.0),
    _result("ringlet", "broadcast", 8, 4.0),
]


def test_ratios_are_ringlet_busbw_over_others() -> None:
    found = {(r["op"], r["bytes"], r["versus"]): r["busbw_ratio"] for r in ratios(RECORDS)}
    assert found == {("all_reduce", 1 << 20, "gloo"): 4.0, ("all_reduce", 1 << 20, "mpi"): 0.5,
                     ("all_reduce", 8, "gloo"): 40.0}  # fmt: skip
    by_busbw = RECORDS[0]["busbw_gbps"] / RECORDS[1]["busbw_gbps"]  # type: ignore[operator]
    assert by_busbw == pytest.approx(4.0)


def test_row_and_comparison_text() -> None:
    row = format_row(RECORDS[0])
    assert row.split() == ["ringlet", "tcp", "all_reduce", "1", "MiB", "262144", "5", "100.00",
                           "100.00", "10.486", "10.486", "ok"]  # fmt: skip
    skip = format_row({"kind": "skip", "backend": "mpi", "reason": "no mpiexec", "cases": 3})
    assert skip == "  mpi      skipped: no mpiexec"
    lines = comparison(RECORDS).splitlines()
    assert lines[1].split()[-2:] == ["vs", "mpi"]
    body = [line.split() for line in lines[2:]]
    assert [b[:3] for b in body] == [["all_reduce", "8", "B"], ["all_reduce", "1", "MiB"],
                                     ["broadcast", "8", "B"]]  # fmt: skip
    assert body[1][-2:] == ["4.00x", "0.50x"]
    assert body[0][-2:] == ["40.00x", "-"] and body[2][-2:] == ["-", "-"]


def test_markdown_table() -> None:
    lines = markdown(RECORDS).splitlines()
    assert lines[0] == ("| op | size | ringlet µs | ringlet busbw GB/s | gloo µs | gloo busbw GB/s "
                        "| mpi µs | mpi busbw GB/s | ringlet / gloo | ringlet / mpi |")  # fmt: skip
    assert len(lines) == 2 + 3
    assert (
        lines[3] == "| all_reduce | 1 MiB | 100 | 10.49 | 400 | 2.62 | 50 | 20.97 | 4.00x | 0.50x |"
    )


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "busbw.png"
    plot(RECORDS, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_exit_code_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--json"])
    assert show_summary(args, RECORDS) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["kind"] for line in lines} == {"ratio"} and len(lines) == 3
    wrong = [*RECORDS, {**RECORDS[0], "op": "gather", "check": "WRONG on rank 1"}]
    assert show_summary(args, wrong) == 1
    assert "ringlet gather 1 MiB: result WRONG on rank 1" in capsys.readouterr().err


def test_progress_is_silent_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(3, stream=stream)
    progress.advance("a")
    progress.close()
    assert stream.getvalue() == ""


def test_parse_args_and_worker_args_round_trip() -> None:
    args = parse_args(["-n", "2", "--ops", "all_reduce, broadcast", "--sizes", "8,1M",
                       "--dtype", "float16", "--iters", "3", "--warmup", "0", "--transport", "tcp",
                       "--algo", "all_reduce=ring", "--compare", "gloo,mpi,gloo"])  # fmt: skip
    assert args.op_list == ["all_reduce", "broadcast"] and args.size_list == [8, 1 << 20]
    assert args.compare_list == ["gloo", "mpi"] and args.algos == {"all_reduce": "ring"}
    again = parse_args(worker_args(args))
    for name in ("op_list", "size_list", "dtype_obj", "iters", "warmup", "transport", "algos"):
        assert getattr(again, name) == getattr(args, name)
    assert again.nproc is None and again.compare_list == []
    assert parse_args(["--ops", "all"]).op_list == list(OPS)


@pytest.mark.parametrize(
    "argv",
    [["--ops", "allreduce"], ["--compare", "nccl"], ["--sizes", "1M:8"], ["--dtype", "bool"],
     ["--iters", "0"], ["-n", "0"], ["--backend", "mpi", "--compare", "gloo"],
     ["--algo", "all_reduce=ring,tree"], ["--transport", "ib"]],
)  # fmt: skip
def test_parse_args_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "ringlet bench: error:" in capsys.readouterr().err


def test_parse_algos() -> None:
    assert parse_algos("", ["all_reduce"]) == {}
    assert parse_algos("ring", ["all_reduce", "all_gather"]) == {
        "all_reduce": "ring",
        "all_gather": "ring",
    }
    assert parse_algos("broadcast=tree, all_reduce=doubling", []) == {
        "broadcast": "tree", "all_reduce": "doubling"
    }  # fmt: skip


def test_plan_runs_each_distinct_case_once() -> None:
    args = parse_args(["--ops", "all_gather,all_reduce", "--sizes", "4,8,16"])
    cases = plan(args, 4)
    assert [(c.op, c.nbytes) for c in cases] == [("all_gather", 16), ("all_reduce", 4),
                                                 ("all_reduce", 8), ("all_reduce", 16)]  # fmt: skip

"""The checks the schedule tests rely on catch broken schedules, and selection / costs hold up."""

from __future__ import annotations

import ast
import runpy
from pathlib import Path

import numpy as np
import pytest

from ringlet.schedules.base import (
    Copy,
    Recv,
    Round,
    Schedule,
    Send,
    check_aligned,
    check_hazards,
    extent,
    timeline,
    validate,
)
from ringlet.schedules.cost import cost, even_args, modeled_time, render_markdown
from ringlet.schedules.select import ALGORITHMS, PARAMS, TOPOLOGICAL, build, select
from ringlet.schedules.simulate import Deadlock, run

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ROOT / "src" / "ringlet" / "schedules"


def sched(*rounds: Round) -> Schedule:
    return Schedule(tuple(rounds))


def buffers(n: int, size: int) -> list[dict[str, np.ndarray]]:
    return [
        {"in": np.arange(n) + 100 * r, "out": np.zeros(n, np.int64), "tmp": np.zeros(n, np.int64)}
        for r in range(size)
    ]


# -- the simulator ----------------------------------------------------------------------------


def test_run_moves_data_and_reduces() -> None:
    a = sched(Round(sends=(Send(1, 0, 2, "in", fold=True),)), Round(recvs=(Recv(1, 0, 2),)))
    b = sched(
        Round(recvs=(Recv(0, 0, 2, reduce=True),), copies=(Copy(0, 0, 2, "in", "out"),)),
        Round(sends=(Send(0, 0, 2),)),
    )
    bufs = buffers(2, 2)
    run([a, b], bufs, np.add)
    assert bufs[0]["out"].tolist() == [100, 102] == bufs[1]["out"].tolist()


def test_run_detects_both_ranks_waiting_to_receive() -> None:
    a = sched(Round(recvs=(Recv(1, 0, 1),)), Round(sends=(Send(1, 0, 1),)))
    b = sched(Round(recvs=(Recv(0, 0, 1),)), Round(sends=(Send(0, 0, 1),)))
    validate([a, b])  # the pairing is fine; only the order deadlocks
    with pytest.raises(Deadlock, match="rank 0 in round 0: recv #0 from 1"):
        run([a, b], buffers(1, 2), np.add)


def test_run_detects_sends_that_need_buffering() -> None:
    # Both send first and receive a round later: fine with unbounded buffers, a hang without.
    a = sched(Round(sends=(Send(1, 0, 1),)), Round(recvs=(Recv(1, 0, 1),)))
    b = sched(Round(sends=(Send(0, 0, 1),)), Round(recvs=(Recv(0, 0, 1),)))
    with pytest.raises(Deadlock):
        run([a, b], buffers(1, 2), np.add)


def test_run_refuses_ranges_outside_a_buffer() -> None:
    a = sched(Round(sends=(Send(1, 0, 5, "in"),)))
    b = sched(Round(recvs=(Recv(0, 0, 5),)))
    with pytest.raises(AssertionError, match="outside a buffer of 2"):
        run([a, b], buffers(2, 2), np.add)


# -- the vocabulary's checks ------------------------------------------------------------------


def test_validate_catches_a_length_mismatch() -> None:
    with pytest.raises(AssertionError, match="do not pair up"):
        validate([sched(Round(sends=(Send(1, 0, 2),))), sched(Round(recvs=(Recv(0, 0, 3),)))])


@pytest.mark.parametrize("fold", [False, True])
def test_validate_catches_a_folded_message_the_sender_does_not_mark(fold: bool) -> None:
    """Both ends must agree that a message is folded: the engine cuts only those in segments."""
    with pytest.raises(AssertionError, match="do not pair up"):
        validate(
            [
                sched(Round(sends=(Send(1, 0, 2, fold=fold),))),
                sched(Round(recvs=(Recv(0, 0, 2, reduce=not fold),))),
            ]
        )


@pytest.mark.parametrize(
    "rnd",
    [
        Round((Send(1, 0, 4),), (Recv(1, 2, 6),)),  # receives into what it sends
        Round((), (Recv(1, 0, 4), Recv(2, 3, 5, reduce=True))),  # two receives into one range
        Round((), (Recv(1, 0, 4, buf="in"),)),  # the caller's input is read-only
        Round(copies=(Copy(0, 0, 4, "out", "tmp"), Copy(2, 2, 4, "tmp", "out"))),  # order matters
        Round(copies=(Copy(0, 0, 4, "out", "in"),)),
        # folds onto what another receive of the round writes
        Round((), (Recv(1, 0, 4, reduce=True, onto=("tmp", 2)), Recv(2, 0, 4, buf="tmp"))),
        # onto in a rank-order round, which folds every landed range with its own value
        Round((), (Recv(1, 0, 4, reduce=True, onto=("in", 0)),), ordered=True),
    ],
)
def test_check_hazards_catches(rnd: Round) -> None:
    with pytest.raises(AssertionError):
        check_hazards(sched(rnd), 0)


def test_check_hazards_allows_disjoint_ranges_and_repeated_sends() -> None:
    rnd = Round((Send(1, 0, 4), Send(2, 0, 4)), (Recv(1, 4, 6), Recv(2, 0, 4, buf="tmp")))
    check_hazards(sched(rnd), 0)


def test_check_aligned_catches_a_message_received_a_round_late() -> None:
    a = sched(Round(sends=(Send(1, 0, 1),)))
    b = sched(Round(), Round(recvs=(Recv(0, 0, 1),)))
    validate([a, b])
    with pytest.raises(AssertionError, match="round"):
        check_aligned([a, b])


def test_timeline_keeps_interior_empty_rounds() -> None:
    s = timeline([Round(sends=(Send(1, 0, 0),)), Round(recvs=(Recv(1, 0, 1),)), Round()])
    assert s.rounds == (Round(), Round(recvs=(Recv(1, 0, 1),)))


# -- selection and building -------------------------------------------------------------------


@pytest.mark.parametrize("op", list(ALGORITHMS))
def test_select_picks_an_algorithm_of_the_op(op: str) -> None:
    for size in (1, 2, 3, 8, 64):
        for nbytes in (0, 1, 1000, 1 << 16, 1 << 20, 1 << 30):
            assert select(op, size, nbytes) in ALGORITHMS[op]


def test_select_small_is_latency_bound_and_large_is_ring() -> None:
    assert select("all_reduce", 8, 8) == "doubling"
    assert select("all_reduce", 8, 1 << 30) == "halving_doubling"  # a power of two: no fold
    assert select("all_reduce", 2, 1 << 20) == "halving_doubling"  # halves, not the whole vector
    assert select("all_reduce", 2, 16 << 10) == "doubling"
    assert select("all_reduce", 6, 1 << 30) == "ring"
    assert select("all_reduce", 6, 64 << 10) == "halving_doubling"
    assert select("broadcast", 8, 8) == "tree"
    assert select("all_gather", 16, 1 << 30) == "ring"
    assert select("reduce_scatter", 16, 1 << 30) == "ring"


@pytest.mark.parametrize(("op", "algo"), [(op, a) for op in ALGORITHMS for a in ALGORITHMS[op]])
def test_select_honours_a_valid_override(op: str, algo: str) -> None:
    assert select(op, 8, 1 << 30, override=algo) == algo


def test_select_sends_one_host_defaults_to_the_shm_group_and_forcing_past_it() -> None:
    from ringlet.schedules.select import GROUP, GROUP_OPS

    for op in ALGORITHMS:
        chosen = select(op, 4, 1 << 20, group=True)
        assert chosen == (GROUP if op in GROUP_OPS else select(op, 4, 1 << 20)), op
        forced = next(iter(ALGORITHMS[op]))
        assert select(op, 4, 1 << 20, override=forced, group=True) == forced  # a schedule
        assert select(op, 4, 1 << 20, group=False) in ALGORITHMS[op]
    with pytest.raises(ValueError, match="no algorithm named 'shm_group'"):
        select("all_reduce", 4, 8, override=GROUP, group=True)  # never forced by name


def test_select_takes_large_one_host_calls_out_of_the_group_only_crowded_with_single_copy() -> None:
    from ringlet.schedules.select import GROUP, GROUP_LEAVES, GROUP_OPS

    assert set(GROUP_LEAVES) <= GROUP_OPS
    for op, (limit, algo) in GROUP_LEAVES.items():
        assert algo in ALGORITHMS[op], op
        assert select(op, 4, limit - 1, group=True, crowded_copy=True) == GROUP
        assert select(op, 4, limit, group=True, crowded_copy=True) == algo
        assert select(op, 4, 1 << 30, group=True, crowded_copy=False) == GROUP
    assert select("all_reduce", 4, 1 << 30, group=True, crowded_copy=True) == GROUP


def test_select_rejects_an_unknown_override_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="doubling, halving_doubling, hier, ordered, ring"):
        select("all_reduce", 8, 100, override="tree")
    with pytest.raises(ValueError, match="no collective named"):
        select("allreduce", 8, 100)


@pytest.mark.parametrize(
    ("op", "kw", "match"),
    [
        ("all_reduce", {"count": 4, "root": 0}, "takes count"),
        ("all_reduce", {"count": -1}, "negative count"),
        ("broadcast", {"count": 4, "root": 4}, "root 4"),
        ("gather", {"counts": [1, 2, 3], "root": 0}, "4 non-negative"),
        ("all_gather", {"counts": [1, 2, -3, 4]}, "4 non-negative"),
        ("all_to_all", {"send_counts": [1] * 4, "recv_counts": [1, 2, 1, 1]}, "must be equal"),
    ],
)
def test_build_rejects_bad_arguments(op: str, kw: dict[str, object], match: str) -> None:
    algo = next(iter(ALGORITHMS[op]))
    with pytest.raises(ValueError, match=match):
        build(op, algo, 1, 4, **kw)


def test_params_match_the_schedule_functions() -> None:
    import inspect

    for op, algos in ALGORITHMS.items():
        for algo, fn in algos.items():
            topology = ("hosts",) if algo in TOPOLOGICAL else ()
            assert tuple(inspect.signature(fn).parameters)[2:] == PARAMS[op] + topology, algo


# -- costs and docs ---------------------------------------------------------------------------


def test_costs_match_the_textbook_formulas() -> None:
    n = 8 * 1000
    ring = cost("all_reduce", "ring", 8, count=n)
    assert (ring.steps, ring.sent) == (14, 2 * 7 * n // 8)
    rd = cost("all_reduce", "doubling", 8, count=n)
    assert (rd.steps, rd.sent) == (3, 3 * n)
    hd = cost("all_reduce", "halving_doubling", 8, count=n)
    assert (hd.steps, hd.sent) == (6, 2 * 7 * n // 8)
    assert cost("all_reduce", "doubling", 5, count=n).steps == 4  # fold in, 2 core steps, fold out
    for p in (2, 5, 8, 16):
        for op, algo in (
            ("broadcast", "tree"),
            ("all_gather", "bruck"),
            ("barrier", "dissemination"),
        ):
            assert cost(op, algo, p, **even_args(op, p, 64)).steps == (p - 1).bit_length()
    assert cost("broadcast", "linear", 8, count=n, root=3).sent == 7 * n


def test_modeled_time_grows_with_bytes_and_steps() -> None:
    small = [build("all_reduce", "ring", r, 8, count=8) for r in range(8)]
    large = [build("all_reduce", "ring", r, 8, count=8 << 20) for r in range(8)]
    assert modeled_time(small, 1.0, 0.0) == 14
    assert modeled_time(large, 1e-5, 1e-9) > modeled_time(small, 1e-5, 1e-9)


def test_docs_are_generated_from_the_cost_model() -> None:
    doc = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    assert doc == render_markdown(), "run python benchmarks/gen_algorithms_doc.py"


def test_doc_script_checks_freshness(capsys: pytest.CaptureFixture[str]) -> None:
    """The script's --check, run in this process (its main() is what the command line calls)."""
    script = runpy.run_path(str(ROOT / "benchmarks" / "gen_algorithms_doc.py"))
    assert script["main"](["--check"]) == 0, capsys.readouterr().out


# -- budgets ----------------------------------------------------------------------------------


def test_schedule_modules_stay_small_and_import_only_the_vocabulary() -> None:
    for path in SCHEDULES.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, path.name
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno is not None
                assert node.end_lineno - node.lineno < 35, f"{path.name}: {node.name} is too long"
        if path.stem in ("ring", "tree", "doubling", "linear", "pairwise", "select"):
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    assert node.module in (
                        "__future__",
                        "collections.abc",
                        "functools",
                        "itertools",
                        "typing",
                    )
                assert not isinstance(node, ast.Import), f"{path.name} imports a module"


# -- memory the engine must provide -----------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_scratch_stays_within_what_each_algorithm_needs(size: int) -> None:
    counts = [3 + r for r in range(size)]
    for r in range(size):
        flat = build("gather", "linear", r, size, counts=counts, root=0)
        assert r == 0 or (extent(flat, "out"), extent(flat, "tmp")) == (0, 0)
        for op, algo in [
            (o, a) for o in ("all_reduce", "broadcast", "reduce") for a in ALGORITHMS[o]
        ]:
            s = build(op, algo, r, size, **even_args(op, size, 100))
            assert extent(s, "out") <= 100, (op, algo)  # in place: never beyond the vector
            assert extent(s, "in") == 0, (op, algo)  # the engine's input lives in out
        assert extent(build("all_gather", "bruck", 0, size, counts=counts), "tmp") == 0
        tree = build("gather", "tree", r, size, counts=counts, root=size - 1)
        assert extent(tree, "tmp") <= sum(counts)

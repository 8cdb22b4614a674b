"""The model at scale: declared phase lengths equal building every member, and large layouts
are answered by the representative-host path."""

from __future__ import annotations

import pytest

from ringlet.plan import model_time
from ringlet.plan_params import params_for
from ringlet.schedules import doubling, ring
from ringlet.schedules.groups import SPANS, built_span, span


def _count_cases(size: int) -> list[dict[str, object]]:
    return [{"count": c} for c in (0, 1, size - 1, size, 3 * size + 1, 3 << 17)]


def _blocks_cases(size: int) -> list[dict[str, object]]:
    shapes = [(0,) * size, (1,) * size, tuple(range(size)), tuple(reversed(range(size)))]
    shapes += [tuple(1 if i == j else 0 for i in range(size)) for j in range(size)]
    return [{"counts": c} for c in shapes]


CASES = {
    ring.ring_all_reduce: _count_cases,
    ring.ring_all_gather: _blocks_cases,
    ring.ring_reduce_scatter: _blocks_cases,
    ring.chain_broadcast: lambda p: [
        {**kw, "root": r} for kw in _count_cases(p) for r in {0, p - 1}
    ],
    ring.chain_reduce: lambda p: [{**kw, "root": r} for kw in _count_cases(p) for r in {0, p - 1}],
    doubling.recursive_doubling_all_reduce: _count_cases,
    doubling.halving_doubling_all_reduce: _count_cases,
}
DOUBLING = (doubling.recursive_doubling_all_reduce, doubling.halving_doubling_all_reduce)
#: world sizes past the small ones, where the doubling steps' parity and the folds change
WIDE = (15, 16, 17, 31, 32, 33, 64, 100, 128)


def test_every_declared_span_is_covered() -> None:
    assert set(SPANS) == set(CASES)


@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_declared_span_equals_building_every_member(fn: object) -> None:
    for size in (*range(1, 10), *(WIDE if fn in DOUBLING else ())):
        for kw in CASES[fn](size):  # type: ignore[operator]
            key = tuple(sorted(kw.items()))
            assert span(fn, size, key) == built_span(fn, size, key), (fn, size, kw)  # type: ignore[arg-type]


def test_span_falls_back_to_building() -> None:
    def odd(i: int, size: int, count: int) -> list[object]:
        return [None] * (i * count)

    assert span(odd, 5, (("count", 2),)) == 8  # type: ignore[arg-type]


SPARSE = [
    ("all_reduce", "ring", lambda p: 2 * (p - 1)),
    ("reduce", "ring", lambda p: p),
    ("broadcast", "scatter_ring", lambda p: p),
    ("broadcast", "chain", lambda p: p - 1),
    ("reduce", "chain", lambda p: p - 1),
]


@pytest.mark.parametrize(("op", "algo", "rounds"), SPARSE)
def test_sparse_ring_keeps_every_round(op: str, algo: str, rounds: object) -> None:
    """A ring passing fewer elements than ranks: every round is on the critical path, on the
    representative path as when every rank is simulated."""
    params = params_for("25gbit")
    exact = model_time(op, algo, 8, 16, 8, params, exact=True)
    reps = model_time(op, algo, 8, 16, 8, params, exact=False)
    assert exact[1] == reps[1] == rounds(128)  # type: ignore[operator]
    assert reps[0] == pytest.approx(exact[0], rel=0.3)  # 18 % (all_reduce), 29 % (reduce)
    wide = model_time(op, algo, 8, 512, 8, params)
    assert wide[1] == rounds(4096) and not wide[3]  # type: ignore[operator]

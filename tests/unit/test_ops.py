"""Reduce ops against references computed element by element with Python numbers."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ringlet.errors import ProtocolError
from ringlet.ops import (
    SUPPORTED_DTYPES,
    ReduceOp,
    check_dtype,
    check_op_dtype,
    combine,
    dtype_code,
    dtype_from_code,
    finish_mean,
    op_code,
    op_from_code,
    parse_op,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
OPS = [ReduceOp(name) for name in ("sum", "mean", "max", "min", "prod", "band", "bor", "bxor")]
BITWISE = {ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR}


def valid(op: ReduceOp, dt: np.dtype) -> bool:
    """The rule, restated independently of ringlet.ops."""
    if op in BITWISE:
        return dt.kind in "biu"
    if op in (ReduceOp.MAX, ReduceOp.MIN):
        return dt.kind != "c"
    if op is ReduceOp.MEAN:
        return dt.kind != "b"
    return True


# ---------------------------------------------------------------- the Python reference


def round_to(dt: np.dtype, value: Any) -> Any:
    """A Python number rounded (floats) or wrapped (integers) into dtype ``dt``."""
    if dt.kind == "b":
        return bool(value)
    if dt.kind in "iu":
        bits = dt.itemsize * 8
        low = -(1 << (bits - 1)) if dt.kind == "i" else 0
        return (int(value) - low) % (1 << bits) + low
    if dt.kind == "c":
        return complex(np.array(value, np.complex128).astype(dt))
    # One rounding from float64 is exact enough: float64 has over 2p+2 bits for every p here.
    return float(np.array(value, np.float64).astype(dt))


STEP: dict[ReduceOp, Callable[[Any, Any], Any]] = {
    ReduceOp.SUM: operator.add,
    ReduceOp.MEAN: operator.add,
    ReduceOp.PROD: operator.mul,
    ReduceOp.MAX: max,
    ReduceOp.MIN: min,
    ReduceOp.BAND: operator.and_,
    ReduceOp.BOR: operator.or_,
    ReduceOp.BXOR: operator.xor,
}


def reference(op: ReduceOp, dt: np.dtype, ranks: list[np.ndarray]) -> list[Any]:
    """Fold the ranks' values element by element, rounding into ``dt`` after every step."""
    out = []
    for column in zip(*(r.tolist() for r in ranks), strict=True):
        acc = round_to(dt, column[0])
        for value in column[1:]:
            acc = round_to(dt, STEP[op](acc, value))
        if op is ReduceOp.MEAN:
            n = len(ranks)
            if dt.kind in "iu":
                acc = acc // n  # Python's // floors, as promised
            elif dt.kind == "c":
                part = np.finfo(dt).dtype  # float32 for complex64: each part divides on its own
                acc = complex(round_to(part, acc.real / n), round_to(part, acc.imag / n))
            else:
                acc = round_to(dt, acc / n)
        out.append(acc)
    return out


def rank_data(
    op: ReduceOp, dt: np.dtype, nranks: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-rank arrays: full-range integers (so sums and products wrap), rounding-prone floats."""
    n = 48
    if dt.kind == "b":
        return [rng.random(n) < 0.5 for _ in range(nranks)]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return [rng.integers(info.min, info.max, n, dtype=dt, endpoint=True) for _ in range(nranks)]
    if dt.kind == "c":
        # Quarter-integers: complex products stay exact, so any formula gives the same answer.
        parts = [rng.integers(-12, 13, (2, n)) / 4 for _ in range(nranks)]
        return [(p[0] + 1j * p[1]).astype(dt) for p in parts]
    scale = 3.0 if op is ReduceOp.PROD else 1000.0
    return [rng.uniform(-scale, scale, n).astype(dt) for _ in range(nranks)]


def fold(op: ReduceOp, ranks: list[np.ndarray]) -> np.ndarray:
    """What an engine does: combine every incoming array into one accumulator, then finish."""
    acc = ranks[0].copy()
    for incoming in ranks[1:]:
        combine(op, acc, incoming)
    if op is ReduceOp.MEAN:
        finish_mean(acc, len(ranks))
    return acc


def same(got: np.ndarray, want: list[Any]) -> bool:
    return all(g == w or (g != g and w != w) for g, w in zip(got.tolist(), want, strict=True))


# ---------------------------------------------------------------- every op x every dtype


VALID_PAIRS = [
    pytest.param(op, dt, id=f"{op}-{dt.name}")
    for op in OPS
    for dt in SUPPORTED_DTYPES
    if valid(op, dt)  # the rejected pairs are test_check_op_dtype_matrix's
]


@pytest.mark.parametrize(("op", "dt"), VALID_PAIRS)
@pytest.mark.parametrize("nranks", [1, 2, 5])
def test_combine_matches_reference(op: ReduceOp, dt: np.dtype, nranks: int) -> None:
    rng = np.random.default_rng([OPS.index(op), SUPPORTED_DTYPES.index(dt), nranks])
    ranks = rank_data(op, dt, nranks, rng)
    originals = [r.copy() for r in ranks]
    got = fold(op, ranks)
    assert got.dtype == dt
    want = reference(op, dt, originals)
    assert same(got, want), f"{op} {dt}: got {got.tolist()[:6]} want {want[:6]}"
    for r, o in zip(ranks[1:], originals[1:], strict=True):
        assert np.array_equal(r, o)  # incoming arrays are only read


def test_combine_writes_in_place() -> None:
    acc = np.arange(6, dtype=np.float32)
    buffer = acc.__array_interface__["data"][0]
    combine(ReduceOp.SUM, acc, np.ones(6, np.float32))
    assert acc.__array_interface__["data"][0] == buffer
    assert acc.tolist() == [1, 2, 3, 4, 5, 6]
    part = acc[2:4]  # views into a larger buffer work too
    combine(ReduceOp.MAX, part, np.full(2, 100, np.float32))
    assert acc.tolist() == [1, 2, 100, 100, 5, 6]


def test_combine_refuses_mixed_dtypes() -> None:
    with pytest.raises(TypeError):
        combine(ReduceOp.SUM, np.zeros(3, np.float32), np.zeros(3, np.float64))


# ---------------------------------------------------------------- the documented rules


def test_bool_semantics() -> None:
    a = np.array([False, False, True, True])
    b = np.array([False, True, False, True])
    expected = {
        ReduceOp.SUM: [False, True, True, True],  # or
        ReduceOp.MAX: [False, True, True, True],
        ReduceOp.BOR: [False, True, True, True],
        ReduceOp.PROD: [False, False, False, True],  # and
        ReduceOp.MIN: [False, False, False, True],
        ReduceOp.BAND: [False, False, False, True],
        ReduceOp.BXOR: [False, True, True, False],  # xor
    }
    for op, want in expected.items():
        assert fold(op, [a, b]).tolist() == want, op
    assert fold(ReduceOp.SUM, [a, b, b]).dtype == np.bool_


def test_integer_overflow_wraps() -> None:
    assert fold(ReduceOp.SUM, [np.array([127], np.int8), np.array([1], np.int8)]).item() == -128
    assert fold(ReduceOp.SUM, [np.array([255], np.uint8), np.array([2], np.uint8)]).item() == 1
    big = np.iinfo(np.int64).max
    assert fold(ReduceOp.SUM, [np.array([big]), np.array([1])]).item() == -big - 1
    assert fold(ReduceOp.PROD, [np.array([1 << 20], np.int32)] * 2).item() == 0
    assert (
        fold(ReduceOp.PROD, [np.array([3], np.uint64), np.array([1 << 63], np.uint64)]).item()
        == 1 << 63
    )


@pytest.mark.parametrize(("dt", "big"), [(np.dtype(np.float16), 2048.0), (BF16, 256.0)])
def test_half_precision_accumulates_in_its_own_dtype(dt: np.dtype, big: float) -> None:
    # big + 1 is a tie in this precision and rounds back to big, every time.
    ranks = [np.array([big], dt), np.array([1.0], dt), np.array([1.0], dt)]
    assert fold(ReduceOp.SUM, ranks).item() == big
    assert fold(ReduceOp.SUM, ranks[::-1]).item() == big + 2  # order matters, as documented


@pytest.mark.parametrize(
    ("values", "mean"),
    [([-3, 0], -2), ([-7, 0, 0], -3), ([7, 0, 0], 2), ([-1, 0, 0, 0], -1), ([-4, 0], -2)],
)
@pytest.mark.parametrize("dt", [np.int8, np.int16, np.int32, np.int64])
def test_integer_mean_floors(values: list[int], mean: int, dt: type) -> None:
    ranks = [np.array([v], dt) for v in values]
    assert fold(ReduceOp.MEAN, ranks).item() == mean


def test_integer_mean_with_more_ranks_than_the_dtype_can_count() -> None:
    acc = np.array([-5, 5, 0, -128, 127], np.int8)
    finish_mean(acc, 200)
    assert acc.tolist() == [-1, 0, 0, -1, 0]
    unsigned = np.array([5, 255], np.uint8)
    finish_mean(unsigned, 300)
    assert unsigned.tolist() == [0, 0]
    wide = np.array([np.iinfo(np.uint64).max], np.uint64)
    finish_mean(wide, 3)
    assert wide.item() == (2**64 - 1) // 3


def test_mean_divides_once() -> None:
    acc = np.array([1.0, 2.0, 10.0], np.float32)
    finish_mean(acc, 3)
    assert acc.tolist() == [float(np.float32(v / 3)) for v in (1.0, 2.0, 10.0)]
    z = np.array([1 + 2j, -3 - 1j], np.complex64)
    finish_mean(z, 3)
    assert z.tolist() == [
        complex(np.float32(1 / 3), np.float32(2 / 3)),
        complex(np.float32(-1.0), np.float32(-1 / 3)),
    ]
    with pytest.raises(ValueError, match="at least 1"):
        finish_mean(acc, 0)


@pytest.mark.parametrize("dt", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_max_min_propagate_nan_quietly(dt: type) -> None:
    a = np.array([1.0, np.nan, 2.0, np.nan], dt)
    b = np.array([np.nan, 1.0, 3.0, np.nan], dt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_max, got_min = fold(ReduceOp.MAX, [a, b]), fold(ReduceOp.MIN, [a, b])
    assert np.isnan(got_max.astype(np.float64)).tolist() == [True, True, False, True]
    assert got_max[2] == 3 and got_min[2] == 2
    assert np.isnan(got_min.astype(np.float64)).tolist() == [True, True, False, True]


@pytest.mark.parametrize("dt", SUPPORTED_DTYPES, ids=lambda d: d.name)
def test_zero_d_and_empty_arrays(dt: np.dtype) -> None:
    op = ReduceOp.SUM if dt.kind == "b" else ReduceOp.MEAN
    scalar = np.array(1, dt)
    combine(op, scalar, np.array(1, dt))
    empty = np.zeros(0, dt)
    combine(op, empty, np.zeros(0, dt))
    if op is ReduceOp.MEAN:
        finish_mean(scalar, 2)
        finish_mean(empty, 2)
    assert scalar.shape == () and scalar.item() == 1
    assert empty.shape == (0,)


# ---------------------------------------------------------------- names, checks and codes


def test_parse_op() -> None:
    assert parse_op("sum") is ReduceOp.SUM
    assert parse_op(" MAX ") is ReduceOp.MAX
    assert parse_op("avg") is ReduceOp.MEAN
    assert parse_op(ReduceOp.AVG) is ReduceOp.MEAN
    assert ReduceOp.AVG is ReduceOp.MEAN
    for op in OPS:
        assert parse_op(op.value) is op
        assert parse_op(op) is op
        assert op == op.value and str(op) == op.value
    assert len(ReduceOp) == 8


def test_parse_op_errors() -> None:
    with pytest.raises(ValueError, match=r"all_reduce: unknown reduce op 'summ'.*bxor") as info:
        parse_op("summ", call="all_reduce")
    assert "avg" in str(info.value)
    with pytest.raises(TypeError, match="int"):
        parse_op(3)  # type: ignore[arg-type]


def test_check_dtype_accepts_the_supported_list() -> None:
    names = [dt.name for dt in SUPPORTED_DTYPES]
    assert names == [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
    for dt in SUPPORTED_DTYPES:
        assert check_dtype(dt) == dt
    assert check_dtype(np.float32) == np.dtype(np.float32)  # dtype-likes too
    assert check_dtype(ml_dtypes.bfloat16) == BF16


@pytest.mark.parametrize(
    "bad",
    [
        object,
        "U5",
        "S3",
        "datetime64[ns]",
        "timedelta64[s]",
        [("x", "f4"), ("y", "i4")],
        "(2,)f4",
        "V8",
        ml_dtypes.float8_e4m3fn,
        np.longdouble,
    ],
    ids=str,
)
def test_check_dtype_rejects(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"gather: unsupported dtype .*supported dtypes: bool"):
        check_dtype(bad, call="gather")


def test_check_dtype_rejects_foreign_byte_order_with_a_fix() -> None:
    swapped = np.dtype(np.float32).newbyteorder("S")
    with pytest.raises(TypeError, match="byte order"):
        check_dtype(swapped)
    with pytest.raises(TypeError, match="not a dtype"):
        check_dtype("no-such-type")  # type: ignore[arg-type]


@pytest.mark.parametrize("dt", SUPPORTED_DTYPES, ids=lambda d: d.name)
def test_check_op_dtype_matrix(dt: np.dtype) -> None:
    for op in OPS:
        if valid(op, dt):
            check_op_dtype(op, dt)
        else:
            with pytest.raises(TypeError, match=rf"reduce: .*{op.value}.*{dt.name}"):
                check_op_dtype(op, dt, call="reduce")


def test_check_op_dtype_rejects_unsupported_dtypes() -> None:
    with pytest.raises(TypeError, match="unsupported dtype"):
        check_op_dtype(ReduceOp.SUM, np.dtype(object))


def test_dtype_codes_are_pinned() -> None:
    # These numbers are on the wire: changing one breaks ranks running another version.
    codes = [dtype_code(dt) for dt in SUPPORTED_DTYPES]
    assert codes == list(range(1, 16))
    for dt in SUPPORTED_DTYPES:
        assert dtype_from_code(dtype_code(dt)) == dt
    assert dtype_code(np.dtype("float32")) == 12
    with pytest.raises(TypeError):
        dtype_code(np.dtype(object))
    for code in (0, 16, -1, 255):
        with pytest.raises(ProtocolError, match="dtype code"):
            dtype_from_code(code)


def test_op_codes_are_pinned() -> None:
    assert [op_code(op) for op in OPS] == [1, 2, 3, 4, 5, 6, 7, 8]
    for op in OPS:
        assert op_from_code(op_code(op)) is op
    with pytest.raises(ProtocolError, match="op code"):
        op_from_code(0)

"""Reduce ops and the dtypes ringlet moves: parsing, checks, wire codes and the in-place combine.

Semantics, chosen to match what Gloo and MPI do on the same data:

- Every op is applied element by element, folding one incoming array into an accumulator of
  the same dtype. ``mean`` folds as ``sum`` and is divided once, by :func:`finish_mean`.
- Sums and products accumulate in the array's own dtype: float16 and bfloat16 round after
  every combine (no wider accumulator), and integers wrap around on overflow (two's complement,
  like C), silently. Floating overflow gives ``inf`` (NumPy may warn about it).
- ``max`` / ``min`` on floats propagate NaN: if any rank holds NaN at an element, the result
  is NaN there. They are rejected for complex numbers, which have no order.
- bool: ``sum``, ``max`` and ``bor`` are logical or; ``prod``, ``min`` and ``band`` are logical
  and; ``bxor`` is logical xor (these are NumPy's add / multiply / maximum … on bool).
  ``mean`` of bool is rejected: there is no bool to hold a fraction.
- ``band`` / ``bor`` / ``bxor`` need integer or bool dtypes.
- ``mean`` of integers rounds toward minus infinity (floor division, NumPy's ``//``):
  the mean of -3 and 0 over 2 ranks is -2, not -1. The sum wraps before it is divided.
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ringlet.errors import ProtocolError

__all__ = [
    "SUPPORTED_DTYPES",
    "ReduceOp",
    "check_dtype",
    "check_op_dtype",
    "combine",
    "dtype_code",
    "dtype_from_code",
    "finish_mean",
    "op_code",
    "op_from_code",
    "parse_op",
]


class ReduceOp(str, enum.Enum):
    """The element-wise reductions; members compare equal to their lower-case names."""

    SUM = "sum"
    MEAN = "mean"
    AVG = "mean"  # alias: ReduceOp.AVG is ReduceOp.MEAN, the name torch.distributed uses
    MAX = "max"
    MIN = "min"
    PROD = "prod"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"

    def __str__(self) -> str:
        return self.value


_OP_NAMES: dict[str, ReduceOp] = {op.value: op for op in ReduceOp} | {"avg": ReduceOp.MEAN}
_CHOICES = "sum, mean (alias avg), max, min, prod, band, bor, bxor"


def _prefix(call: str) -> str:
    return f"{call}: " if call else ""


def parse_op(op: str | ReduceOp, *, call: str = "") -> ReduceOp:
    """Turn ``"sum"``, ``"AVG"`` or a :class:`ReduceOp` into a :class:`ReduceOp`.

    ``call`` prefixes error messages (for example ``"all_reduce on rank 3"``).
    Raises ValueError for an unknown name and TypeError for something that is not a name.
    """
    if isinstance(op, ReduceOp):
        return op
    if not isinstance(op, str):
        raise TypeError(
            f"{_prefix(call)}op must be a string or ringlet.ReduceOp, got {type(op).__name__} "
            f"{op!r}; choose one of {_CHOICES}"
        )
    found = _OP_NAMES.get(op.strip().lower())
    if found is None:
        raise ValueError(f"{_prefix(call)}unknown reduce op {op!r}; choose one of {_CHOICES}")
    return found


# Wire codes are part of the protocol: append new entries, never renumber.
_OP_CODES: dict[ReduceOp, int] = {
    ReduceOp.SUM: 1,
    ReduceOp.MEAN: 2,
    ReduceOp.MAX: 3,
    ReduceOp.MIN: 4,
    ReduceOp.PROD: 5,
    ReduceOp.BAND: 6,
    ReduceOp.BOR: 7,
    ReduceOp.BXOR: 8,
}
_OPS_BY_CODE: dict[int, ReduceOp] = {code: op for op, code in _OP_CODES.items()}


def op_code(op: ReduceOp) -> int:
    """The op's stable small integer for call signatures on the wire."""
    return _OP_CODES[op]


def op_from_code(code: int) -> ReduceOp:
    """The op behind a wire code; raises ProtocolError for a code no ringlet version sends."""
    try:
        return _OPS_BY_CODE[code]
    except KeyError:
        raise ProtocolError(
            f"unknown reduce op code {code} in a peer's message; are all ranks running "
            "the same ringlet version?"
        ) from None


# bfloat16 comes from ml_dtypes, whose import costs ~1 s: it is loaded only when a bfloat16 array
# exists (ml_dtypes already imported) or bfloat16 is named, so the dict lookup of dtype_code stays
# the hot path and `import ringlet` does not pay for it. BFLOAT16 and SUPPORTED_DTYPES are module
# attributes that load it (__getattr__ below).
_BFLOAT16_CODE = 11
# Order fixes the wire codes (index + 1): append new dtypes, never reorder; None is bfloat16.
_BY_CODE: list[np.dtype | None] = [
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.int16),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.uint8),
    np.dtype(np.uint16),
    np.dtype(np.uint32),
    np.dtype(np.uint64),
    np.dtype(np.float16),
    None,
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
]
_DTYPE_CODES: dict[np.dtype, int] = {dt: i + 1 for i, dt in enumerate(_BY_CODE) if dt is not None}
_DTYPE_NAMES = ", ".join(dt.name if dt is not None else "bfloat16" for dt in _BY_CODE)


def _bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported on first use and entered in the dtype tables."""
    dt = _BY_CODE[_BFLOAT16_CODE - 1]
    if dt is None:
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16)
        _DTYPE_CODES[dt] = _BFLOAT16_CODE
        _BY_CODE[_BFLOAT16_CODE - 1] = dt
    return dt


if TYPE_CHECKING:
    BFLOAT16: np.dtype
    SUPPORTED_DTYPES: tuple[np.dtype, ...]


def __getattr__(name: str) -> Any:
    """BFLOAT16 and SUPPORTED_DTYPES (every dtype in wire-code order), loading ml_dtypes."""
    if name == "BFLOAT16":
        return _bfloat16()
    if name == "SUPPORTED_DTYPES":
        _bfloat16()
        return tuple(dt for dt in _BY_CODE if dt is not None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_dtype(dtype: np.dtype, *, call: str = "") -> np.dtype:
    """Return ``dtype`` as an np.dtype if ringlet can move it; TypeError naming it otherwise.

    Object, string, structured, datetime and non-native byte-order dtypes are rejected.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        if not (isinstance(dtype, str) and dtype.strip().lower() == "bfloat16"):
            raise TypeError(
                f"{_prefix(call)}{dtype!r} is not a dtype; supported dtypes: {_DTYPE_NAMES}"
            ) from None
        dt = _bfloat16()  # the name is known once ml_dtypes is loaded
    if dt in _DTYPE_CODES:
        return dt
    loaded = "ml_dtypes" in sys.modules  # an ml_dtypes array exists only once it is
    if loaded and _BY_CODE[_BFLOAT16_CODE - 1] is None and _bfloat16() == dt:
        return dt
    if dt.byteorder not in "=|" and dt.newbyteorder("=") in _DTYPE_CODES:
        raise TypeError(
            f"{_prefix(call)}dtype {dt.str} has non-native byte order; convert first with "
            "a.astype(a.dtype.newbyteorder('='))"
        )
    raise TypeError(f"{_prefix(call)}unsupported dtype {dt}; supported dtypes: {_DTYPE_NAMES}")


def check_op_dtype(op: ReduceOp, dtype: np.dtype, *, call: str = "") -> None:
    """Raise TypeError when ``op`` has no meaning on ``dtype`` (see the module docstring)."""
    dt = check_dtype(dtype, call=call)
    if op in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR) and dt.kind not in "biu":
        raise TypeError(f"{_prefix(call)}bitwise op {op} needs an integer or bool dtype, got {dt}")
    if op in (ReduceOp.MAX, ReduceOp.MIN) and dt.kind == "c":
        raise TypeError(
            f"{_prefix(call)}op {op} is undefined for complex dtype {dt}: complex numbers "
            "have no order; reduce abs() or the real part instead"
        )
    if op is ReduceOp.MEAN and dt.kind == "b":
        raise TypeError(
            f"{_prefix(call)}op mean is undefined for bool; cast to a number first "
            "(mean of 0/1 values) or use max (any) / min (all)"
        )


def dtype_code(dtype: np.dtype) -> int:
    """The dtype's stable small integer for wire call signatures (TypeError if unsupported)."""
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        code = _DTYPE_CODES[check_dtype(dtype)]
    return code


def dtype_from_code(code: int) -> np.dtype:
    """The dtype behind a wire code; raises ProtocolError for a code no ringlet version sends."""
    if 1 <= code <= len(_BY_CODE):
        dt = _BY_CODE[code - 1]
        return dt if dt is not None else _bfloat16()
    raise ProtocolError(
        f"unknown dtype code {code} in a peer's message; are all ranks running "
        "the same ringlet version?"
    )


# One ufunc per op, looked up once: combine runs for every chunk of every reduction.
_UFUNCS: dict[ReduceOp, np.ufunc] = {
    ReduceOp.SUM: np.add,
    ReduceOp.MEAN: np.add,  # mean folds as a sum; finish_mean divides once at the end
    ReduceOp.MAX: np.maximum,
    ReduceOp.MIN: np.minimum,
    ReduceOp.PROD: np.multiply,
    ReduceOp.BAND: np.bitwise_and,
    ReduceOp.BOR: np.bitwise_or,
    ReduceOp.BXOR: np.bitwise_xor,
}


#: What travels instead of an op (a dict lookup: enum attribute access is slow on the fast path).
_WIRE: dict[ReduceOp, ReduceOp] = {ReduceOp.MEAN: ReduceOp.SUM}


def wire_op(op: ReduceOp) -> ReduceOp:
    """What travels for ``op``: mean moves as a sum, divided once at the end by :func:`finish_mean`."""
    return _WIRE.get(op, op)


#: The reduce kernel's signature: ``f(a, b, out)`` computes ``out = op(a, b)`` element-wise.
Binary = Callable[[np.ndarray, np.ndarray, np.ndarray], object]

# Overflow to inf and NaN propagation are the data's business (as in MPI and Gloo), not a warning
# to print on every rank; ml_dtypes also flags NaN in bfloat16 max/min as "invalid". np.errstate
# costs ~2.5 µs a call, a third of a small all_reduce, so where NumPy keeps its error state in a
# context variable (NumPy 2) the kernel sets that variable to a quiet state directly (~0.1 µs).
try:
    from numpy._core import _ufunc_config

    _STATE: Any = _ufunc_config._extobj_contextvar  # type: ignore[attr-defined]
    with np.errstate(over="ignore", invalid="ignore"):
        _QUIET = _STATE.get()
except (ImportError, AttributeError):
    _STATE = None


def _quiet(ufunc: np.ufunc) -> Binary:
    """``ufunc`` with overflow and invalid-value warnings off for the call."""
    if _STATE is None:

        def apply(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> object:
            with np.errstate(over="ignore", invalid="ignore"):
                return ufunc(a, b, out=out, casting="no")

        return apply
    state, quiet = _STATE, _QUIET

    def apply_fast(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> object:
        token = state.set(quiet)
        try:
            return ufunc(a, b, out=out, casting="no")
        finally:
            state.reset(token)

    return apply_fast


@functools.lru_cache(maxsize=256)
def binary(op: ReduceOp, dtype: np.dtype) -> Binary:
    """The one reduce kernel, for every transport and algorithm: ``f(a, b, out)``, ``out`` may
    alias ``a`` or ``b``; operands of other dtypes are an error, never a silent conversion."""
    ufunc = _UFUNCS[op]
    if dtype.kind in "iub":  # integer ufuncs wrap silently and never warn
        return functools.partial(_exact, ufunc)
    return _quiet(ufunc)


def _exact(ufunc: np.ufunc, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> object:
    return ufunc(a, b, out=out, casting="no")


def combine(op: ReduceOp, acc: np.ndarray, incoming: np.ndarray) -> None:
    """Fold ``incoming`` into ``acc`` in place: ``acc[...] = op(acc, incoming)``, no temporaries.

    Both arrays must have the same dtype and shape. Call :func:`check_op_dtype` once beforehand.
    """
    binary(op, acc.dtype)(acc, incoming, acc)


def fold(f: Binary, sources: list[np.ndarray], out: np.ndarray) -> None:
    """``out = op(...op(op(s0, s1), s2)..., s_last)``: rank order, the same on every rank.

    ``out`` may alias ``sources[0]`` or ``sources[1]`` but no later source.
    """
    if len(sources) == 1:
        if sources[0] is not out:
            np.copyto(out, sources[0])
        return
    f(sources[0], sources[1], out)
    for src in sources[2:]:
        f(out, src, out)


def finish_mean(acc: np.ndarray, size: int) -> None:
    """Turn a summed ``acc`` into the mean over ``size`` ranks, in place.

    Floats and complex: one division in the array's dtype, so the result is exactly
    ``sum / size`` rounded once (complex divides its real and imaginary parts). Integers:
    floor division, ``sum // size`` as NumPy and Python define it (rounds toward minus infinity).
    """
    if size < 1:
        raise ValueError(f"finish_mean: size must be at least 1, got {size}")
    kind = acc.dtype.kind
    if kind == "c":
        # Dividing by a complex divisor (size + 0j) may round differently from per-part division.
        np.true_divide(acc.real, size, out=acc.real)
        np.true_divide(acc.imag, size, out=acc.imag)
    elif kind in "iu":
        if size <= np.iinfo(acc.dtype).max:
            np.floor_divide(acc, size, out=acc)
        else:
            # size does not fit the dtype (say int8 over 200 ranks): divide in 64 bits.
            wide = np.int64 if kind == "i" else np.uint64
            np.floor_divide(acc, np.array(size, dtype=wide), out=acc, casting="unsafe")
    elif kind == "b":
        raise TypeError("finish_mean: mean of bool is undefined (check_op_dtype rejects it)")
    else:
        np.true_divide(acc, size, out=acc)

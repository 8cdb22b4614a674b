"""What `ringlet bench` measures, without any process: sizes, per-op counts, bandwidth formulas, checks.

Sizes and bus bandwidth follow nccl-tests (doc/PERFORMANCE.md there), so numbers compare with theirs:
the size of an all_gather or gather is its output, of a reduce_scatter or scatter its input, of an
all_to_all one rank's whole buffer. algbw = size / time; busbw = algbw x a factor of the op that
makes it comparable to the link's bandwidth whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np

from . import ops

OPS = (
    "all_reduce",
    "all_gather",
    "broadcast",
    "reduce_scatter",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
)
#: Ops whose result is one array per rank split along axis 0; their sizes are rounded to N elements.
SPLIT_OPS = frozenset({"all_gather", "reduce_scatter", "gather", "scatter", "all_to_all"})
ROOT = 0
#: Bytes a timed loop may move per (op, size) before its iteration count is scaled down.
ITER_BUDGET = 256 << 20
WARMUP_BUDGET = 64 << 20
MIN_ITERS = 5
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_PERIOD = 11  # inputs repeat with this period: exact in every dtype, cheap to check at any size
_CHECK_CHUNK = _PERIOD << 16


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests' busbw / algbw: 2(n-1)/n for all_reduce, 1 for broadcast/reduce, else (n-1)/n."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if op == "all_reduce":
        return 2.0 * (ranks - 1) / ranks
    if op in ("broadcast", "reduce"):
        return 1.0
    return (ranks - 1) / ranks


def bandwidths(op: str, nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (10^9 bytes per second, as nccl-tests) for one call of `seconds`."""
    if seconds <= 0:
        return 0.0, 0.0
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, ranks)


def parse_size(text: str) -> int:
    """'8', '64K', '1M', '1MiB', '2G' → bytes (K/M/G are powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"bad size {text!r}: write a byte count like 8, 64K, 1M or 2G")
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value <= 0:
        raise ValueError(f"bad size {text!r}: sizes must be at least 1 byte")
    return value


def parse_sizes(spec: str) -> list[int]:
    """Sizes from 'MIN:MAX' (doubling; 'MIN:MAX:F' multiplies by F), '8,1M,16M', or both mixed."""
    sizes: set[int] = set()
    for item in spec.split(","):
        if not item.strip():
            raise ValueError(f"bad --sizes {spec!r}: empty item")
        parts = item.split(":")
        if len(parts) == 1:
            sizes.add(parse_size(parts[0]))
            continue
        if len(parts) > 3:
            raise ValueError(f"bad --sizes item {item!r}: use MIN:MAX or MIN:MAX:FACTOR")
        low, high = parse_size(parts[0]), parse_size(parts[1])
        factor = int(parts[2]) if len(parts) == 3 and parts[2].strip().isdigit() else 2
        if len(parts) == 3 and (not parts[2].strip().isdigit() or factor < 2):
            raise ValueError(f"bad --sizes item {item!r}: FACTOR must be an integer >= 2")
        if low > high:
            raise ValueError(f"bad --sizes item {item!r}: MIN is larger than MAX")
        size = low
        while size <= high:
            sizes.add(size)
            size *= factor
    return sorted(sizes)


def format_size(nbytes: int) -> str:
    """A byte count for people: '8 B', '64 KiB', '1 MiB', '1.5 GiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{nbytes} B"


def parse_dtype(name: str) -> np.dtype:
    """A dtype ringlet supports by name ('float32', 'bfloat16', …); bool is not benchmarked.

    Only 'bfloat16' imports ml_dtypes (~1 s in every rank of a benchmark)."""
    wanted = name.strip().lower()
    with contextlib.suppress(TypeError):
        dtype = ops.check_dtype(wanted)  # type: ignore[arg-type]
        if dtype.name == wanted and dtype.kind != "b":
            return dtype
    names = ", ".join(dt.name for dt in ops.SUPPORTED_DTYPES if dt.kind != "b")
    raise ValueError(f"unsupported --dtype {name!r}; choose one of {names}")


@dataclass(frozen=True)
class Case:
    """One collective at one size on `ranks` ranks; counts are elements per rank.

    `count_in` is what each rank passes (scatter: what the root passes), `count_out` what each rank
    gets (gather: what the root gets); `nbytes` the nccl-tests size after rounding.
    """

    op: str
    nbytes: int
    count_in: int
    count_out: int
    dtype: np.dtype
    ranks: int

    @property
    def block(self) -> int:
        """Elements per rank of a split op (the part each rank sends or gets)."""
        if self.op in ("reduce_scatter", "scatter", "all_to_all"):
            return self.count_in // self.ranks
        return self.count_in


def make_case(op: str, nbytes: int, dtype: np.dtype, ranks: int) -> Case:
    """The counts behind a requested size: at least one element (per rank for split ops)."""
    bus_factor(op, ranks)  # validates op
    items = max(1, nbytes // dtype.itemsize)
    if op not in SPLIT_OPS:
        return Case(op, items * dtype.itemsize, items, items, dtype, ranks)
    total = max(ranks, items // ranks * ranks)
    per_rank = total // ranks
    count_in, count_out = {
        "all_gather": (per_rank, total),
        "gather": (per_rank, total),
        "reduce_scatter": (total, per_rank),
        "scatter": (total, per_rank),
        "all_to_all": (total, total),
    }[op]
    return Case(op, total * dtype.itemsize, count_in, count_out, dtype, ranks)


def iterations(iters: int, warmup: int, nbytes: int) -> tuple[int, int]:
    """(timed, warmup) iterations at `nbytes`: fewer for big sizes, so a run stays short."""
    timed = min(iters, max(MIN_ITERS, ITER_BUDGET // max(1, nbytes)))
    warm = min(warmup, max(1, WARMUP_BUDGET // max(1, nbytes)))
    return timed, warm


def _base(rank: int, dtype: np.dtype) -> np.ndarray:
    """One period of rank's input: small integers, exact when summed over up to 23 ranks."""
    return ((np.arange(_PERIOD) + 3 * rank) % _PERIOD).astype(dtype)


def rank_input(case: Case, rank: int) -> np.ndarray | None:
    """The array `rank` passes in `case` (None for a non-root rank of scatter)."""
    if case.op == "scatter" and rank != ROOT:
        return None
    return np.resize(_base(rank, case.dtype), case.count_in)


@dataclass(frozen=True)
class _Segment:
    """`length` elements of a periodic pattern (one period `base`), starting at `phase`."""

    length: int
    base: np.ndarray
    phase: int


def _expected(case: Case, rank: int) -> list[_Segment] | None:
    """What `rank` must hold after `case`, as periodic segments; None where nothing is promised."""
    n, block = case.ranks, case.block
    reduced = np.sum([_base(r, np.dtype(np.float64)) for r in range(n)], axis=0).astype(case.dtype)
    op = case.op
    if op in ("reduce", "gather") and rank != ROOT:
        return None
    if op in ("all_reduce", "reduce"):
        return [_Segment(case.count_out, reduced, 0)]
    if op == "broadcast":
        return [_Segment(case.count_out, _base(ROOT, case.dtype), 0)]
    if op in ("all_gather", "gather"):
        return [_Segment(case.count_in, _base(r, case.dtype), 0) for r in range(n)]
    if op == "reduce_scatter":
        return [_Segment(block, reduced, rank * block)]
    if op == "scatter":
        return [_Segment(block, _base(ROOT, case.dtype), rank * block)]
    return [_Segment(block, _base(r, case.dtype), rank * block) for r in range(n)]  # all_to_all


def check_result(case: Case, rank: int, result: np.ndarray | None) -> str | None:
    """None when `result` is what `rank` must hold after `case`, else what is wrong."""
    segments = _expected(case, rank)
    if segments is None:
        return None
    if result is None:
        return "no result was returned"
    flat = np.asarray(result).reshape(-1)
    want = sum(s.length for s in segments)
    if flat.size != want or flat.dtype != case.dtype:
        return f"got {flat.dtype} ({flat.size},), expected {case.dtype} ({want},)"
    start = 0
    for segment in segments:
        pattern = np.roll(segment.base, -(segment.phase % _PERIOD))
        for offset in range(0, segment.length, _CHECK_CHUNK):
            part = flat[start + offset : start + min(segment.length, offset + _CHECK_CHUNK)]
            if not np.array_equal(part, np.resize(pattern, part.size)):
                bad = int(np.argmax(part != np.resize(pattern, part.size)))
                index = start + offset + bad
                expected = pattern[(offset + bad) % _PERIOD]
                return f"element {index} is {flat[index]}, expected {expected}"
        start += segment.length
    return None

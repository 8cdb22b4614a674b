"""One collective call as data: its name, sequence number, signature and a readable description.

The signature is a 64-bit digest of everything the ranks must agree on (operation, dtype, shape or
count, reduce op, root); it rides in every frame, so ranks in different calls are told apart.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from .arrays import to_numpy
from .ops import ReduceOp, check_dtype, check_op_dtype, dtype_code, parse_op

KINDS = (
    "barrier",
    "broadcast",
    "reduce",
    "all_reduce",
    "gather",
    "all_gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
    "counts",
    "split",
    "send",
)
#: Signature bit of the small exchange that precedes a call's data (row counts, scatter's header).
PHASE_SIG = 0x5A5A_0000_0000_0001
#: Ops whose schedules sum into every rank's buffer, so a rank that gets no result works on a copy.
SUMS_INTO_INPUT = frozenset({"reduce"})


def signature(
    kind: str, dtype: np.dtype | None, shape: tuple[int, ...], op: str = "", root: int = -1
) -> int:
    """Digest of what every rank of a call must pass identically."""
    code = dtype_code(dtype) if dtype is not None else 0
    raw = struct.pack(f"<BHq{len(shape)}q", KINDS.index(kind), code, root, *shape) + op.encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def describe(
    kind: str, dtype: np.dtype | None, shape: tuple[int, ...], op: str = "", root: int = -1
) -> str:
    """How an error message shows a call: ``all_reduce(float32 (4,), op=sum)``."""
    parts = []
    if dtype is not None:
        parts.append(f"{np.dtype(dtype).name} {shape}")
    if op:
        parts.append(f"op={op}")
    if root >= 0:
        parts.append(f"root={root}")
    return f"{kind}({', '.join(parts)})"


@dataclass(frozen=True)
class Call:
    """A collective in flight: everything errors and the flight recorder report about it."""

    kind: str
    seq: int
    sig: int
    desc: str

    def phase(self) -> Call:
        """The same call under its own signature, for the small exchange that precedes its data."""
        return Call(self.kind, self.seq, self.sig ^ PHASE_SIG, self.desc)


@functools.lru_cache(maxsize=4096)
def named(
    kind: str, dtype: np.dtype | None, shape: tuple[int, ...], op: str, root: int
) -> tuple[int, str]:
    """A call's signature and description, cached: the fast path pays a dict lookup, not a hash."""
    return signature(kind, dtype, shape, op, root), describe(kind, dtype, shape, op, root)


@functools.lru_cache(maxsize=1024)
def reduce_op(op: str | ReduceOp, dtype: np.dtype, kind: str) -> ReduceOp:
    """Parse the reduce op and check it suits the dtype (cached; raises ValueError/TypeError)."""
    rop = parse_op(op, call=kind)
    check_dtype(dtype, call=kind)
    check_op_dtype(rop, dtype, call=kind)
    return rop


def total(itemsize: int, **kw: object) -> int:
    """The bytes a call moves as select counts them, alike on every rank: the element count of
    the call (``count``, or the sum of ``counts`` / ``send_counts``) times the item size."""
    for name in ("count", "counts", "send_counts"):
        if (value := kw.get(name)) is not None:
            n = value if isinstance(value, int) else sum(value)  # type: ignore[call-overload]
            return int(n) * itemsize
    return itemsize


def reducible(x: object, op: str | ReduceOp, kind: str) -> tuple[np.ndarray, ReduceOp]:
    """A reduction's array (writable: results land in it) and its checked reduce op."""
    arr = to_numpy(x, call=kind, writable=True)
    try:
        return arr, reduce_op(op, arr.dtype, kind)
    except TypeError:
        if isinstance(op, str | ReduceOp):
            raise
        return arr, reduce_op.__wrapped__(op, arr.dtype, kind)  # unhashable op: a clear error


def check_root(root: int, size: int, kind: str) -> int:
    """``root`` as an int, or ValueError when it is not a rank of the communicator."""
    if not isinstance(root, (int, np.integer)) or not 0 <= root < size:
        raise ValueError(f"{kind}: root={root!r} is not a rank of this communicator (0..{size - 1})")
    return int(root)


def result_nbytes(kind: str, nbytes: int, rank: int, size: int, root: int = 0) -> int:
    """Bytes of the new array a call returns on ``rank`` for ``nbytes`` of input per rank (scatter:
    the root's whole input); 0 for the ops that work in place or return nothing there."""
    return {
        "all_gather": nbytes * size,
        "gather": nbytes * size if rank == root else 0,
        "scatter": nbytes // size,
        "reduce_scatter": nbytes // size,
        "all_to_all": nbytes,
    }.get(kind, 0)

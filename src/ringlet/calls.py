"""One collective call as data: its name, sequence number, signature and a readable description.

The signature is a 64-bit digest of everything the ranks must agree on (operation, dtype, shape or
count, reduce op, root); it rides in every frame, so ranks in different calls are told apart.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from .ops import dtype_code

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

"""The wire header of every frame between ranks: pack, unpack, check.

Every frame carries the communicator, the call's sequence number and signature, and the round and
segment within the call, so a peer that is in a different call is caught as a mismatch instead of
writing into the wrong buffer. The receiver always knows how many bytes it expects; a header that
claims anything else is rejected before a byte of payload is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"RL"
VERSION = 1
HEADER = struct.Struct("<2sBBQQIIQQ")
HEADER_SIZE = HEADER.size

DATA = 1
ABORT = 2

#: Largest ABORT payload (a UTF-8 error description) a receiver accepts.
MAX_ABORT_PAYLOAD = 64 * 1024


@dataclass(frozen=True)
class Header:
    """One frame header; ``length`` is the payload size in bytes."""

    kind: int
    comm: int
    seq: int
    round: int
    segment: int
    sig: int
    length: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.comm,
            self.seq,
            self.round,
            self.segment,
            self.sig,
            self.length,
        )


def unpack(raw: bytes | bytearray | memoryview) -> Header:
    """Parse a header; raises ValueError for a bad size, magic, version or kind."""
    try:
        magic, version, kind, comm, seq, rnd, seg, sig, length = HEADER.unpack(raw)
    except struct.error:  # not a ValueError: callers catch ValueError only
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, got {len(raw)}") from None
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r} (not a ringlet frame)")
    if version != VERSION:
        raise ValueError(f"unsupported protocol version {version} (this ringlet speaks {VERSION})")
    if kind not in (DATA, ABORT):
        raise ValueError(f"unknown frame kind {kind}")
    if kind == ABORT and length > MAX_ABORT_PAYLOAD:
        raise ValueError(f"abort frame of {length} bytes exceeds {MAX_ABORT_PAYLOAD}")
    return Header(kind, comm, seq, rnd, seg, sig, length)

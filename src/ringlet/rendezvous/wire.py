"""The rendezvous store's wire format, shared by the server and the client.

Big-endian, no pickle. A request is ``op u8, key length u32, value length u64, second value length
u64, argument i64`` followed by the key (UTF-8) and the two values; a response is ``status u8,
value length u64, argument i64`` followed by the value. The argument carries a wait in
milliseconds (GET, WAIT), an amount (ADD) or a result (ADD's total, DELETE's found flag). Lengths
are checked against the limits below before anything is read, and bodies are read in bounded
chunks, so a header never decides an allocation.
"""

from __future__ import annotations

import enum
import socket
import struct

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 64 << 20
AUTH_CONTEXT = b"ringlet-store"  # binds store handshakes to the store (not the data transport)
REQUEST = struct.Struct("!BIQQq")
RESPONSE = struct.Struct("!BQq")
INT64 = range(-(2**63), 2**63)
NO_WAIT = -1  # GET/WAIT argument meaning "answer now, even if the key is missing"
_READ_CHUNK = 1 << 20  # bodies arrive in pieces of at most this size: memory follows actual bytes
_COALESCE_BYTES = 1 << 16  # smaller messages go out as one buffer (one packet with TCP_NODELAY)


class Op(enum.IntEnum):
    """Request operation codes."""

    SET = 1
    GET = 2
    WAIT = 3
    ADD = 4
    COMPARE_SET = 5
    DELETE = 6


class Status(enum.IntEnum):
    """Response status codes."""

    OK = 0
    MISSING = 1
    TIMEOUT = 2
    ERROR = 3  # the value is a UTF-8 message for the caller


def recv_exact(sock: socket.socket, nbytes: int, *, eof_ok: bool = False) -> bytes | None:
    """Read exactly ``nbytes`` in bounded chunks.

    Returns None if ``eof_ok`` and the peer closed before the first byte; raises EOFError if it
    closed anywhere else.
    """
    parts: list[bytes] = []
    remaining = nbytes
    while remaining:
        part = sock.recv(min(remaining, _READ_CHUNK))
        if not part:
            if eof_ok and remaining == nbytes:
                return None
            raise EOFError(f"connection closed after {nbytes - remaining} of {nbytes} bytes")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def recv_bytes(sock: socket.socket, nbytes: int) -> bytes:
    """Read exactly ``nbytes``; raises EOFError if the peer closes first."""
    data = recv_exact(sock, nbytes)
    assert data is not None  # eof_ok is False, so EOF raised instead
    return data


def send_parts(sock: socket.socket, *parts: bytes) -> None:
    """Send the parts back to back, copying them into one buffer only when they are small."""
    if sum(len(p) for p in parts) <= _COALESCE_BYTES:
        sock.sendall(b"".join(parts))
        return
    for part in parts:
        if part:
            sock.sendall(part)

"""The whole transport vocabulary the engine uses: exchange a round of messages, abort, close.

A transport moves bytes between ranks of one communicator and never knows which collective it
serves. ``exchange`` posts every receive and send of one round, streams each payload straight
between the caller's buffers and the wire, and returns when all completed; it raises
PeerError / MismatchError / ProtocolError / CollectiveTimeout instead of ever hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class Tag(NamedTuple):
    """What a frame belongs to: the call (sequence number and signature), round and segment.

    A tuple, not a dataclass: the engine makes one per segment of every round (~0.1 µs, not ~1)."""

    seq: int
    sig: int
    round: int = 0
    segment: int = 0


class Transport(Protocol):
    """Point-to-point byte movement between the ranks of one communicator."""

    rank: int
    size: int

    def exchange(
        self,
        sends: Sequence[tuple[int, memoryview]],
        recvs: Sequence[tuple[int, memoryview]],
        tag: Tag,
        deadline: float,
    ) -> None:
        """Send each (peer, bytes) and receive each (peer, into) of one round; at most one per peer."""
        ...

    def abort(self, message: str) -> None:
        """Tell every connected peer, best effort, that this rank gave up and why."""
        ...

    def close(self) -> None:
        """Release sockets; idempotent."""
        ...

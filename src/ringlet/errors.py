"""The errors ringlet raises; every message names the rank, the call and what to do."""

from __future__ import annotations


class RingletError(RuntimeError):
    """Base class of every error that comes from communication rather than a local argument."""


class MismatchError(RingletError):
    """Ranks called different collectives, or with different dtype, shape, op or root."""


class PeerError(RingletError):
    """A peer rank died, closed its connection or reported an error of its own."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class CollectiveTimeout(RingletError, TimeoutError):
    """A blocking call waited longer than the timeout; names the ranks that have not arrived."""

    def __init__(self, message: str, missing: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class BrokenCommunicator(RingletError):
    """The communicator failed earlier; every later call raises this, carrying the first cause."""


class AuthenticationError(RingletError):
    """A connection did not prove it knows the job's secret."""


class ProtocolError(RingletError):
    """A peer sent a frame that is malformed, oversized or out of sequence."""

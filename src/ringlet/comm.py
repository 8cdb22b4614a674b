"""The Communicator users hold: every collective of SPEC, plus split and dup."""

from __future__ import annotations

import hashlib
from typing import Any

from .core import World
from .objects import ObjectCollectives

WORLD_ID = 1


class Communicator(ObjectCollectives):
    """A group of ranks that run collectives together; the docs' Operations page describes each.

    ``rank``/``size`` are this process's place in the group, ``local_rank``/``local_size`` its place
    among the group's ranks on the same host. Use as a context manager to close it.
    """

    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """MPI_Comm_split: ranks with the same ``color`` form a new communicator, ordered by (key, rank).

        Every rank of this communicator must call it; ``color=None`` takes part but gets None.
        """
        if color is not None and (not isinstance(color, int) or color < 0):
            raise ValueError(f"split: color must be a non-negative int or None, not {color!r}")
        if not isinstance(key, int):
            raise TypeError(f"split: key must be an int, not {type(key).__name__}")
        self._splits += 1
        pairs = self.all_gather_object((color, key))
        if color is None:
            return None
        ranks = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        members = [self.members[r] for _, r in ranks]
        raw = f"{self.id}/{self._splits}/{color}".encode()
        new_id = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2
        return Communicator(self._world, new_id, members)

    def dup(self) -> Communicator:
        """A new communicator of the same ranks, with its own sequence numbers and connections."""
        sub = self.split(0, self.rank)
        assert sub is not None
        return sub

    def close(self) -> None:
        """Release this communicator; closing the world communicator also leaves the job."""
        super().close()
        if self.id == WORLD_ID and self._world.closer is not None:
            self._world.closer()

    @property
    def world(self) -> World:
        return self._world

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

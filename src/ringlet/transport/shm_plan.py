"""Argument checks and the digested form of a split (counts per rank) for the shm collectives."""

from __future__ import annotations

from collections.abc import Sequence

MASK64 = (1 << 64) - 1


class Plan:
    """A split of elements among ``size`` ranks: counts, displacements, total and a digest that
    ranks compare on arrival (a rank given other counts then raises instead of misreading)."""

    def __init__(self, kind: str, counts: Sequence[int], size: int) -> None:
        self.counts = tuple(int(c) for c in counts)
        if len(self.counts) != size or any(c < 0 for c in self.counts):
            raise ValueError(
                f"shm {kind}: counts must be {size} non-negative numbers, got {list(counts)}"
            )
        self.displs = [sum(self.counts[:q]) for q in range(size)]
        self.total = sum(self.counts)
        self.largest = max(self.counts, default=0)
        self.layout = hash(self.counts) & MASK64  # ints hash alike in every process

    def check_own(self, kind: str, rank: int, own: int) -> None:
        """ValueError unless this rank's array holds ``counts[rank]`` elements."""
        if self.counts[rank] != own:
            raise ValueError(
                f"shm {kind}: rank {rank} passes {own} elements but counts[{rank}] = "
                f"{self.counts[rank]}"
            )

    def check_total(self, kind: str, what: str, total: int) -> None:
        """ValueError unless an array (named ``what``) holds all the counts' elements."""
        if self.total != total:
            raise ValueError(
                f"shm {kind}: {what} has {total} elements, but the counts sum to {self.total}"
            )


def check_root(kind: str, root: int, size: int) -> None:
    """ValueError unless ``root`` is a rank of a group of ``size``."""
    if not 0 <= root < size:
        raise ValueError(f"shm {kind}: root {root} is not a rank of this group (0..{size - 1})")

"""Timings of one DDP step, to see whether gradient averaging overlapped backward."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BucketTiming", "StepTrace"]


@dataclass
class BucketTiming:
    """When one bucket's averaging started and finished, in seconds since the step's first gradient."""

    index: int
    nbytes: int
    launched: float
    finished: float | None = None


@dataclass
class StepTrace:
    """One backward of :class:`~ringlet.torch.DistributedDataParallel`, timed from its first gradient.

    Times are seconds since the first gradient arrived. ``backward_end`` is when autograd finished
    (the last gradient); ``synced`` when every bucket's average was in. Communication overlapped
    backward where buckets started, and finished, before ``backward_end``.
    """

    start: float
    buckets: list[BucketTiming] = field(default_factory=list)
    backward_end: float = 0.0
    synced: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def finished_during_backward(self) -> int:
        """How many buckets were fully averaged before backward ended."""
        return sum(
            1 for b in self.buckets if b.finished is not None and b.finished <= self.backward_end
        )

    @property
    def wait_after_backward(self) -> float:
        """Seconds between the end of backward and the last bucket's average: the exposed communication."""
        return max(0.0, self.synced - self.backward_end)

    def summary(self) -> str:
        """One line: when the buckets started and finished relative to the end of backward."""
        first = min((b.launched for b in self.buckets), default=0.0)
        return (
            f"{len(self.buckets)} buckets ({self.total_bytes / 2**20:.1f} MiB): gradients came over "
            f"{self.backward_end * 1e3:.1f} ms of backward, the first bucket started at "
            f"{first * 1e3:.1f} ms, {self.finished_during_backward} finished before backward ended, "
            f"all were averaged {self.wait_after_backward * 1e3:.1f} ms after it"
        )

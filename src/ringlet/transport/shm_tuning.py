"""Sizes and thresholds that choose the shm paths, with the measurements behind them.

Measured with benchmarks/shm_micro.py and its per-path comparisons on a 2-core x86_64 VM (AMD
EPYC, 1 MiB L2 per core, 32 MiB L3), float32, best of several quiet repetitions:

- One-step all_reduce (every rank folds every rank's data) beats the pipelined reduce-scatter
  + all-gather up to ~512 KiB at 2 ranks and ~256 KiB at 4; it reads N x the message, so its
  limit is FLAT_REDUCE_TOTAL_BYTES / N.
- Through the segment a byte costs two memcpys that run at 15-45 GB/s from cache; cross-memory
  attach costs one kernel copy at ~8-13 GB/s (it pins every page). So with a core per rank the
  segment wins for all_reduce, reduce_scatter and broadcast at every size (2 MiB stages:
  16 MiB all_reduce 2.45 ms vs 2.67 ms, broadcast 1.3 ms vs 1.8 ms), while all_gather, where each
  rank both stages its input and copies N - 1 inputs out, gains from the single copy once the
  data no longer fits the caches (16 MiB: 2.0 ms vs 2.2-2.4 ms; 64 MiB: 7.4 ms vs 10.3 ms).
- With more ranks than cores every step costs context switches, and cross-memory attach needs
  two or three steps instead of one per chunk: at 4 ranks on 2 cores it wins from 4 MiB for
  all_reduce (16 MiB: 8.7 ms vs 12.6 ms) and reduce_scatter (64 MiB: 9.4 ms vs 19.6 ms), but
  for all_gather only at 64 MiB (15.2 ms vs 19.0 ms; at 16 MiB 5.8 ms vs 4.9 ms).
- 2 MiB staging buffers beat 1 MiB (16 MiB all_reduce 2.1-2.4 ms vs 2.3-2.5 ms) and 4 MiB
  (3.6 ms: the stages of both ranks no longer stay in cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .cma import enabled as cma_enabled
from .shm_segment import SHM_DIR
from .shm_wait import usable_cores

#: Bytes per staging buffer (two per rank); also the largest message that moves in one step.
STAGE_BYTES = 2 << 20
#: Most bytes the staging buffers of one group may take in /dev/shm (they shrink for big groups).
STAGE_BUDGET_BYTES = 32 << 20
#: all_reduce / reduce up to this many bytes x ranks: every rank folds all ranks' data in one step.
FLAT_REDUCE_TOTAL_BYTES = 1 << 20
#: Scratch bytes per reduction buffer on the cross-memory path (fits L2 alongside the stream).
SCRATCH_BYTES = 1 << 20

NEVER = 1 << 62
OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "reduce_scatter")
#: Message bytes from which an op copies straight between the ranks' buffers, when every rank
#: has a core of its own (all_gather and gather count the output).
CMA_MIN_BYTES: dict[str, int] = {
    "all_reduce": NEVER,
    "reduce": NEVER,
    "broadcast": NEVER,
    "scatter": NEVER,
    "reduce_scatter": NEVER,
    "all_gather": 16 << 20,
    "gather": 16 << 20,
}
#: The same when there are more ranks than cores: fewer steps matter more than copy speed.
CMA_MIN_BYTES_OVERSUBSCRIBED: dict[str, int] = {
    "all_reduce": 4 << 20,
    "reduce": 4 << 20,
    "broadcast": NEVER,
    "scatter": NEVER,
    "reduce_scatter": 4 << 20,
    "all_gather": 32 << 20,
    "gather": 32 << 20,
}


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer number of bytes") from None


@dataclass(frozen=True)
class ShmTuning:
    """Sizes and thresholds that pick the paths; every rank uses rank 0's, so they agree.

    Fields left None are chosen for the group by :meth:`fitted` (from its size and the cores).
    """

    stage_bytes: int = STAGE_BYTES
    flat_reduce_bytes: int | None = None
    cma_min_bytes: dict[str, int] | None = None
    scratch_bytes: int = SCRATCH_BYTES
    use_cma: bool = True

    @classmethod
    def from_env(cls) -> ShmTuning:
        """Defaults, overridden by RINGLET_SHM_STAGE_BYTES, RINGLET_SHM_FLAT_REDUCE_BYTES,
        RINGLET_SHM_CMA_MIN_BYTES (every op), RINGLET_SHM_SCRATCH_BYTES and RINGLET_SHM_CMA=0."""
        cma_min = _env_int("RINGLET_SHM_CMA_MIN_BYTES")
        return cls(
            stage_bytes=_env_int("RINGLET_SHM_STAGE_BYTES") or STAGE_BYTES,
            flat_reduce_bytes=_env_int("RINGLET_SHM_FLAT_REDUCE_BYTES"),
            cma_min_bytes=None if cma_min is None else dict.fromkeys(OPS, cma_min),
            scratch_bytes=_env_int("RINGLET_SHM_SCRATCH_BYTES") or SCRATCH_BYTES,
            use_cma=cma_enabled(),
        )

    def fitted(self, size: int, cores: int | None = None) -> ShmTuning:
        """This tuning completed for ``size`` ranks: staging buffers within STAGE_BUDGET_BYTES
        for the group and a quarter of the free space in /dev/shm, and the thresholds left open
        chosen for ``size`` and the number of cores."""
        try:
            st = os.statvfs(SHM_DIR)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = STAGE_BUDGET_BYTES * 4
        budget = min(STAGE_BUDGET_BYTES, free // 4) // (2 * size)
        stage = max(min(self.stage_bytes, budget // 4096 * 4096), 4096)
        flat = self.flat_reduce_bytes
        if flat is None:
            flat = FLAT_REDUCE_TOTAL_BYTES // size
        cma_min = self.cma_min_bytes
        if cma_min is None:
            crowded = size > (cores or usable_cores())
            cma_min = dict(CMA_MIN_BYTES_OVERSUBSCRIBED if crowded else CMA_MIN_BYTES)
        return replace(self, stage_bytes=stage, flat_reduce_bytes=flat, cma_min_bytes=cma_min)

    def check(self) -> None:
        """ValueError when a size cannot work."""
        if self.stage_bytes < 4096 or self.stage_bytes % 64:
            raise ValueError(
                f"shm: stage_bytes={self.stage_bytes} must be a multiple of 64, at least 4096"
            )
        if self.scratch_bytes < 64:
            raise ValueError(f"shm: scratch_bytes={self.scratch_bytes} must be at least 64")
        if self.cma_min_bytes is not None and set(OPS) - set(self.cma_min_bytes):
            missing = sorted(set(OPS) - set(self.cma_min_bytes))
            raise ValueError(f"shm: cma_min_bytes lacks {missing}")

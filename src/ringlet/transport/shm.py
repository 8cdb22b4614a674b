"""Collectives between the ranks of one host through a shared-memory segment.

:class:`ShmGroup` is what the communicator calls when every rank of a communicator is on this
host. Small messages go through the segment in one step (each rank stages its data, publishes
its arrival, and reads what it needs); large ones either through the segment in pipelined,
double-buffered chunks, or, where Linux cross-memory attach works, straight from the peers' own
buffers with one kernel copy. The size where the second kicks in is a named threshold per op,
chosen from benchmarks/shm_micro.py. The protocol is described in shm_channel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ringlet.errors import RingletError
from ringlet.ops import ReduceOp

from . import shm_cma, shm_staged
from .cma import CrossMemory, allow_peers
from .shm_channel import MASK64, Channel, SignatureMismatch, binary
from .shm_segment import Segment
from .shm_wait import PeerWatch, Waiter, process_start_time

__all__ = ["ShmGroup", "ShmTuning", "SignatureMismatch"]

#: Bytes per staging buffer (two per rank); also the largest message that moves in one step.
STAGE_BYTES = 1 << 20
#: all_reduce / reduce up to this many bytes: every rank folds all ranks' data in one step.
FLAT_REDUCE_BYTES = 16 << 10
#: Message bytes from which each op copies straight between buffers (when the kernel allows).
CMA_MIN_BYTES: dict[str, int] = {
    "all_reduce": 256 << 10,
    "reduce": 256 << 10,
    "broadcast": 64 << 10,
    "all_gather": 64 << 10,
    "gather": 64 << 10,
    "scatter": 64 << 10,
    "reduce_scatter": 256 << 10,
    "all_to_all": 64 << 10,
}
#: Scratch bytes per reduction buffer on the cross-memory path.
SCRATCH_BYTES = 256 << 10


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer number of bytes") from None


@dataclass(frozen=True)
class ShmTuning:
    """Sizes and thresholds that pick the paths; every rank uses rank 0's, so they agree."""

    stage_bytes: int = STAGE_BYTES
    flat_reduce_bytes: int = FLAT_REDUCE_BYTES
    cma_min_bytes: dict[str, int] = field(default_factory=lambda: dict(CMA_MIN_BYTES))
    scratch_bytes: int = SCRATCH_BYTES
    use_cma: bool = True

    @classmethod
    def from_env(cls) -> ShmTuning:
        """Defaults, overridden by RINGLET_SHM_STAGE_BYTES, RINGLET_SHM_FLAT_REDUCE_BYTES,
        RINGLET_SHM_CMA_MIN_BYTES (every op), RINGLET_SHM_SCRATCH_BYTES and RINGLET_SHM_CMA=0."""
        cma_min = {
            kind: _env_int("RINGLET_SHM_CMA_MIN_BYTES", v) for kind, v in CMA_MIN_BYTES.items()
        }
        return cls(
            stage_bytes=_env_int("RINGLET_SHM_STAGE_BYTES", STAGE_BYTES),
            flat_reduce_bytes=_env_int("RINGLET_SHM_FLAT_REDUCE_BYTES", FLAT_REDUCE_BYTES),
            cma_min_bytes=cma_min,
            scratch_bytes=_env_int("RINGLET_SHM_SCRATCH_BYTES", SCRATCH_BYTES),
            use_cma=os.environ.get("RINGLET_SHM_CMA", "1").lower() not in ("0", "false", "no"),
        )

    def check(self) -> None:
        """ValueError when a size cannot work."""
        if self.stage_bytes < 4096 or self.stage_bytes % 64:
            raise ValueError(
                f"shm: stage_bytes={self.stage_bytes} must be a multiple of 64, at least 4096"
            )
        if self.scratch_bytes < 64:
            raise ValueError(f"shm: scratch_bytes={self.scratch_bytes} must be at least 64")
        missing = set(CMA_MIN_BYTES) - set(self.cma_min_bytes)
        if missing:
            raise ValueError(f"shm: cma_min_bytes lacks {sorted(missing)}")


def _layout(counts: Sequence[int]) -> int:
    return hash(tuple(int(c) for c in counts)) & MASK64


class ShmGroup:
    """The ranks of one communicator on this host, joined through a shared-memory segment.

    Every method blocks until this rank's part is done; all take ``sig`` (the caller's 64-bit
    digest of the call) and ``deadline`` (a time.monotonic() value). Raised: SignatureMismatch
    (a MismatchError) on every rank when the ranks' calls differ, CollectiveTimeout naming the
    ranks that did not arrive, PeerError when a peer died or the group was aborted. After any
    of these the group is unusable; later calls raise RingletError.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        channel: Channel | None,
        cma: CrossMemory | None,
        tuning: ShmTuning,
    ) -> None:
        self.rank = rank
        self.size = size
        self.tuning = tuning
        self._ch = channel
        self._cma = cma
        self._cma_min = tuning.cma_min_bytes
        self._flat_reduce_bytes = min(tuning.flat_reduce_bytes, tuning.stage_bytes)
        self._scratch = shm_cma.Scratch(tuning.scratch_bytes)
        self._broken: BaseException | None = None
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        rank: int,
        size: int,
        *,
        job: str,
        exchange: Callable[[bytes], list[bytes]],
        timeout: float,
        poll: Callable[[], None] | None = None,
        tuning: ShmTuning | None = None,
    ) -> ShmGroup:
        """Create (rank 0) or attach the group's segment; every rank of the group must call it.

        ``exchange(b)`` all-gathers a small bytes value among the ranks; it is called three times.
        ``tuning`` (default: :meth:`ShmTuning.from_env`) counts on rank 0 only: the others adopt
        it, so every rank picks the same path for every call. Cross-memory attach is used only
        when every rank can read every peer. ``timeout`` is kept for callers.
        """
        if not 0 <= rank < size:
            raise ValueError(f"shm: rank {rank} is not in a group of {size}")
        tuning = tuning or ShmTuning.from_env()
        tuning.check()
        if size == 1:
            return cls(rank, size, None, None, tuning)
        pid = os.getpid()
        seg = Segment.create(job, size, tuning.stage_bytes) if rank == 0 else None
        try:
            me = {
                "name": seg.name if seg else "",
                "pid": pid,
                "start": process_start_time(pid),
                "tuning": asdict(tuning),
            }
            infos = [json.loads(b) for b in exchange(json.dumps(me).encode())]
            tuning = ShmTuning(**infos[0]["tuning"])
            if seg is None:
                seg = Segment.attach(infos[0]["name"], size)
            if tuning.use_cma:
                allow_peers()
            addresses = [json.loads(b) for b in exchange(json.dumps(seg.address).encode())]
            if rank == 0:
                seg.unlink()  # everyone attached: from now on a crash leaves nothing behind
            pids = [int(i["pid"]) for i in infos]
            cma: CrossMemory | None = CrossMemory(rank, pids) if tuning.use_cma else None
            problem = None
            if cma is not None:
                for q in range(size):
                    if q != rank:
                        problem = problem or cma.probe(q, addresses[q], 64)
            verdicts = [json.loads(b) for b in exchange(json.dumps(problem).encode())]
            if any(v is not None for v in verdicts):
                cma = None
            watch = PeerWatch(
                [
                    (p, i["start"] if process_start_time(p) == i["start"] else None)
                    for p, i in zip(pids, infos, strict=True)
                ]
            )
        except BaseException:
            if seg is not None:
                if rank == 0:
                    seg.unlink()
                seg.close()
            raise
        waiter = Waiter(seg, rank, size, watch, poll)
        return cls(rank, size, Channel(seg, rank, size, waiter, cma), cma, tuning)

    @property
    def uses_cma(self) -> bool:
        """True when large messages are copied straight between the ranks' buffers."""
        return self._cma is not None

    def abort(self, rank_reason: str) -> None:
        """Mark the group aborted so every rank waiting in it raises PeerError promptly."""
        ch = self._ch
        if ch is None or self._closed:
            return
        if ch.seg.set_abort(rank_reason):
            ch.waiter.wake_all()
        if self._broken is None:
            self._broken = RingletError(f"the shm group was aborted: {rank_reason}")

    def close(self) -> None:
        """Unmap the segment; idempotent. Peers still waiting on this rank will time out."""
        if self._closed:
            return
        self._closed = True
        if self._ch is not None:
            self._ch.seg.close()

    # -- the collectives ----------------------------------------------------------------------
    def _channel(self) -> Channel:
        if self._closed:
            raise RingletError(f"rank {self.rank}: the shm group is closed")
        if self._broken is not None:
            raise RingletError(
                f"rank {self.rank}: the shm group failed earlier and cannot be used: {self._broken}"
            ) from self._broken
        assert self._ch is not None
        return self._ch

    def _cma_for(self, kind: str, nbytes: int) -> CrossMemory | None:
        if self._cma is not None and nbytes >= self._cma_min[kind]:
            return self._cma
        return None

    def all_reduce(self, buf: np.ndarray, op: ReduceOp, sig: int, deadline: float) -> None:
        """Reduce ``buf`` over all ranks in place (rank order, bit-identical everywhere)."""
        if self.size == 1:
            return
        ch = self._channel()
        try:
            f = binary(op, buf.dtype)
            if buf.nbytes <= self._flat_reduce_bytes:
                shm_staged.flat_reduce(ch, buf, buf, f, sig, deadline, "all_reduce")
            elif (cma := self._cma_for("all_reduce", buf.nbytes)) is not None:
                shm_cma.all_reduce(ch, cma, buf, f, sig, deadline, self._scratch)
            else:
                shm_staged.pipelined_reduce(ch, buf, buf, f, sig, deadline, "all_reduce")
        except BaseException as exc:
            self._fail(exc)
            raise

    def reduce(
        self,
        buf: np.ndarray,
        out: np.ndarray | None,
        root: int,
        op: ReduceOp,
        sig: int,
        deadline: float,
    ) -> None:
        """Reduce ``buf`` over all ranks into ``out`` on ``root`` (may be ``buf``); other
        ranks' ``buf`` stays unchanged."""
        self._check_root(root, "reduce")
        if self.rank == root and out is None:
            raise ValueError(f"shm reduce: the root (rank {root}) needs an output array")
        result = out if self.rank == root else None
        if self.size == 1:
            if result is not None and result is not buf:
                np.copyto(result, buf)
            return
        ch = self._channel()
        try:
            f = binary(op, buf.dtype)
            if buf.nbytes <= self._flat_reduce_bytes:
                shm_staged.flat_reduce(ch, buf, result, f, sig, deadline, "reduce")
            elif (cma := self._cma_for("reduce", buf.nbytes)) is not None:
                shm_cma.reduce(ch, cma, buf, result, root, f, sig, deadline, self._scratch)
            else:
                shm_staged.pipelined_reduce(ch, buf, result, f, sig, deadline, "reduce")
        except BaseException as exc:
            self._fail(exc)
            raise

    def broadcast(self, buf: np.ndarray, root: int, sig: int, deadline: float) -> None:
        """Copy ``root``'s ``buf`` into ``buf`` on every rank."""
        self._check_root(root, "broadcast")
        if self.size == 1:
            return
        ch = self._channel()
        try:
            if (cma := self._cma_for("broadcast", buf.nbytes)) is not None:
                shm_cma.broadcast(ch, cma, buf, root, sig, deadline)
            else:
                shm_staged.broadcast(ch, buf, root, sig, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    def all_gather(
        self, inp: np.ndarray, out: np.ndarray, counts: Sequence[int], sig: int, deadline: float
    ) -> None:
        """``out`` = every rank's ``inp`` (``counts[q]`` elements from rank q), in rank order."""
        self._gather(inp, out, counts, None, sig, deadline)

    def gather(
        self,
        inp: np.ndarray,
        out: np.ndarray | None,
        counts: Sequence[int],
        root: int,
        sig: int,
        deadline: float,
    ) -> None:
        """Like all_gather, but only ``root`` receives (into ``out``)."""
        self._check_root(root, "gather")
        self._gather(inp, out if self.rank == root else None, counts, root, sig, deadline)

    def _gather(
        self,
        inp: np.ndarray,
        out: np.ndarray | None,
        counts: Sequence[int],
        root: int | None,
        sig: int,
        deadline: float,
    ) -> None:
        kind = "all_gather" if root is None else "gather"
        self._check_counts(kind, counts, own=inp.size)
        if out is not None and out.size != sum(counts):
            raise ValueError(
                f"shm {kind}: out has {out.size} elements, counts sum to {sum(counts)}"
            )
        if (root is None or root == self.rank) and out is None:
            raise ValueError(f"shm {kind}: rank {self.rank} needs an output array")
        if self.size == 1:
            if out is not None:
                np.copyto(out, inp)
            return
        ch = self._channel()
        try:
            layout = _layout(counts)
            if (cma := self._cma_for(kind, sum(counts) * inp.itemsize)) is not None:
                shm_cma.gather(ch, cma, inp, out, counts, root, sig, layout, deadline)
            else:
                shm_staged.gather(ch, inp, out, counts, root, sig, layout, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    def scatter(
        self,
        inp: np.ndarray | None,
        out: np.ndarray,
        counts: Sequence[int],
        root: int,
        sig: int,
        deadline: float,
    ) -> None:
        """Rank q receives elements ``counts[:q].sum() …`` of ``root``'s ``inp`` into ``out``."""
        self._check_root(root, "scatter")
        self._check_counts("scatter", counts, own=out.size)
        if self.rank == root and (inp is None or inp.size != sum(counts)):
            raise ValueError(f"shm scatter: the root's input must hold {sum(counts)} elements")
        if self.size == 1:
            assert inp is not None
            np.copyto(out, inp)
            return
        ch = self._channel()
        try:
            layout = _layout(counts)
            if (cma := self._cma_for("scatter", sum(counts) * out.itemsize)) is not None:
                shm_cma.scatter(ch, cma, inp, out, counts, root, sig, layout, deadline)
            else:
                shm_staged.scatter(ch, inp, out, counts, root, sig, layout, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    def reduce_scatter(
        self,
        inp: np.ndarray,
        out: np.ndarray,
        counts: Sequence[int],
        op: ReduceOp,
        sig: int,
        deadline: float,
    ) -> None:
        """``out`` = this rank's part (``counts[rank]`` elements) of the reduction of ``inp``."""
        self._check_counts("reduce_scatter", counts, own=out.size)
        if inp.size != sum(counts):
            raise ValueError(
                f"shm reduce_scatter: inp has {inp.size} elements, counts sum to {sum(counts)}"
            )
        if self.size == 1:
            np.copyto(out, inp)
            return
        ch = self._channel()
        try:
            f = binary(op, inp.dtype)
            layout = _layout(counts)
            if (cma := self._cma_for("reduce_scatter", inp.nbytes)) is not None:
                shm_cma.reduce_scatter(
                    ch, cma, inp, out, counts, f, sig, layout, deadline, self._scratch
                )
            else:
                shm_staged.reduce_scatter(ch, inp, out, counts, f, sig, layout, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    def all_to_all(
        self,
        inp: np.ndarray,
        out: np.ndarray,
        send_counts: Sequence[int],
        recv_counts: Sequence[int],
        sig: int,
        deadline: float,
    ) -> None:
        """Block q of ``inp`` (``send_counts[q]`` elements) goes to rank q; ``out`` receives
        the blocks for this rank in rank order (``recv_counts[q]`` from rank q)."""
        self._check_counts("all_to_all", send_counts, total=inp.size)
        self._check_counts("all_to_all", recv_counts, total=out.size)
        if self.size == 1:
            np.copyto(out, inp)
            return
        ch = self._channel()
        try:
            table = ch.seg.table((ch.seq + 1) & 1)
            table[0, self.rank] = send_counts
            table[1, self.rank] = recv_counts
            shm_staged.stage_first_all_to_all(ch, inp, send_counts)
            ch.arrive("all_to_all", sig, 0, deadline, addr_a=_address_or_zero(inp))
            sends = table[0].copy()
            expected = table[1].T
            if not np.array_equal(sends, expected):
                q, r = (int(i) for i in np.argwhere(sends != expected)[0])
                raise SignatureMismatch(
                    f"rank {self.rank}: {ch.describe()}: the ranks' split sizes do not match: "
                    f"rank {q} sends {sends[q, r]} elements to rank {r}, which expects "
                    f"{expected[q, r]} from it",
                    tuple((q, sig) for q in range(self.size)),
                )
            if (cma := self._cma_for("all_to_all", int(sends.sum()) * inp.itemsize)) is not None:
                shm_cma.all_to_all(ch, cma, inp, out, sends, deadline)
            else:
                shm_staged.all_to_all(ch, inp, out, sends, sig, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    def barrier(self, sig: int, deadline: float) -> None:
        """Return once every rank has entered the barrier."""
        if self.size == 1:
            return
        ch = self._channel()
        try:
            ch.arrive("barrier", sig, 0, deadline)
        except BaseException as exc:
            self._fail(exc)
            raise

    # -- helpers ------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc

    def _check_root(self, root: int, kind: str) -> None:
        if not 0 <= root < self.size:
            raise ValueError(
                f"shm {kind}: root {root} is not a rank of this group (0..{self.size - 1})"
            )

    def _check_counts(
        self, kind: str, counts: Sequence[int], own: int | None = None, total: int | None = None
    ) -> None:
        if len(counts) != self.size or any(c < 0 for c in counts):
            raise ValueError(
                f"shm {kind}: counts must be {self.size} non-negative numbers, got {list(counts)}"
            )
        if own is not None and counts[self.rank] != own:
            raise ValueError(
                f"shm {kind}: rank {self.rank} passes {own} elements but "
                f"counts[{self.rank}] = {counts[self.rank]}"
            )
        if total is not None and sum(counts) != total:
            raise ValueError(
                f"shm {kind}: counts sum to {sum(counts)} but the array has {total} elements"
            )


def _address_or_zero(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0]) if a.size else 0

"""The shm transport's parts on their own, in one process: segment layout and lifetime, futex,
liveness checks, cross-memory copies, folding order and tuning."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import threading
import time

import numpy as np
import pytest

from ringlet.errors import ProtocolError
from ringlet.ops import ReduceOp, binary, fold
from ringlet.transport import shm_staged
from ringlet.transport.cma import CrossMemory
from ringlet.transport.shm import ShmGroup, ShmTuning, ShmUnavailable
from ringlet.transport.shm_segment import LINE, PAGE, SLOT_WORDS, Layout, Segment
from ringlet.transport.shm_wait import Futex


@pytest.mark.parametrize("size", [1, 2, 3, 8, 64])
def test_layout_regions_are_aligned_and_disjoint(size: int) -> None:
    lay = Layout(size, 8192)
    regions = [
        (0, PAGE),
        (lay.doorbells, size * LINE),
        (lay.slots, size * SLOT_WORDS * 8),
        (lay.stages, 2 * size * 8192),
    ]
    for (start, length), (next_start, _) in itertools.pairwise(regions):
        assert start % PAGE == 0 and start + length <= next_start
    assert lay.total == lay.stages + 2 * size * 8192
    assert {lay.stage(r, p) for r in range(size) for p in (0, 1)} == {
        lay.stages + i * 8192 for i in range(2 * size)
    }


def test_segment_create_attach_unlink_and_abort() -> None:
    seg = Segment.create("unit/test job", 3, 4096)
    try:
        assert seg.name.startswith("ringlet-unit_test_job-")
        other = Segment.attach(seg.name, 3)
        seg.stage(1, 0)[:4] = [1, 2, 3, 4]
        assert other.stage(1, 0)[:4].tolist() == [1, 2, 3, 4]  # one memory, two mappings
        with pytest.raises(ProtocolError, match="expected 2 ranks"):
            Segment.attach(seg.name, 2)
        with pytest.raises(ProtocolError, match="unexpected segment name"):
            Segment.attach("../etc/passwd", 3)
        seg.unlink()
        assert not os.path.exists(f"/dev/shm/{seg.name}")
        assert other.stage(1, 0)[0] == 1  # mappings outlive the name
        assert not other.aborted
        assert seg.set_abort("rank 2: out of memory")
        assert not seg.set_abort("second reason is ignored")
        assert other.aborted and other.abort_reason() == "rank 2: out of memory"
        other.close()
        other.close()
    finally:
        seg.unlink()
        seg.close()


def test_sub_slots_are_aligned_and_virtual_indices_cover_the_peers() -> None:
    for size in (2, 3, 5, 8):
        for itemsize in (1, 2, 4, 8, 16):
            per = shm_staged._sub_slot(1 << 16, size - 1, itemsize)
            assert per * itemsize % 64 == 0 and per * itemsize * (size - 1) <= 1 << 16
        for writer in range(size):
            slots = sorted(shm_staged._virtual(writer, q) for q in range(size) if q != writer)
            assert slots == list(range(size - 1))


def test_fold_is_rank_order_and_allows_out_to_alias_the_first_two() -> None:
    xs = [np.array([1.0, 2.0]), np.array([10.0, 20.0]), np.array([100.0, 200.0])]
    calls: list[tuple[float, float]] = []

    def record(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        calls.append((float(a[0]), float(b[0])))
        np.subtract(a, b, out=out)  # not commutative: the order shows

    out = xs[1]
    fold(record, xs, out)
    assert calls == [(1.0, 10.0), (-9.0, 100.0)]
    assert out.tolist() == [1.0 - 10.0 - 100.0, 2.0 - 20.0 - 200.0]


def test_the_one_kernel_folds_mean_as_sum_and_never_warns() -> None:
    """Every transport reduces with ops.binary: mean folds as a sum (divided once at the end);
    float16 overflow and bfloat16 NaN in max/min stay the data's business, not a warning."""
    import warnings

    import ml_dtypes

    a32 = np.array([1.0, 2.0], np.float32)
    out32 = np.empty(2, np.float32)
    binary(ReduceOp.MEAN, np.dtype(np.float32))(a32, a32, out32)
    assert out32.tolist() == [2.0, 4.0]
    h = np.array([60000.0], np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binary(ReduceOp.SUM, np.dtype(np.float16))(h, h, h)
    assert np.isinf(h[0])
    with pytest.raises(TypeError):  # mixed dtypes are an error, never a silent conversion
        binary(ReduceOp.SUM, np.dtype(np.float32))(a32, a32.astype(np.float64), out32)
    bf = np.dtype(ml_dtypes.bfloat16)
    a = np.array([np.nan, 1.0], bf)
    out = np.empty(2, bf)
    with np.errstate(invalid="raise"):
        binary(ReduceOp.MAX, bf)(a, np.array([0.0, 2.0], bf), out)
    assert np.isnan(out[0]) and out[1] == 2.0


def test_futex_times_out_and_is_woken_early() -> None:
    seg = Segment.create("futex", 1, 4096)
    try:
        futex = Futex()
        address = seg.address + seg.layout.doorbells
        start = time.monotonic()
        futex.wait(address, 0, 0.05)
        assert 0.04 < time.monotonic() - start < 1.0
        start = time.monotonic()
        futex.wait(address, 1, 5.0)  # the word is 0, not 1: returns at once
        assert time.monotonic() - start < 0.5

        def ring() -> None:
            time.sleep(0.05)
            seg.doorbells[0] = 1
            futex.wake(address)

        threading.Thread(target=ring).start()
        start = time.monotonic()
        futex.wait(address, 0, 5.0)
        assert time.monotonic() - start < 1.0
    finally:
        seg.unlink()
        seg.close()


def test_cross_memory_reads_and_writes_and_reports_bad_addresses() -> None:
    cma = CrossMemory(0, [os.getpid()])
    src = np.arange(100_000, dtype=np.int64)
    dst = np.zeros_like(src)
    cma.read(0, src.ctypes.data, dst)
    assert np.array_equal(src, dst)
    cma.write(0, dst.ctypes.data + 8, np.array([-1], np.int64))
    assert dst[1] == -1
    reason = cma.probe(0, 8, 64)  # address 8 is never mapped
    assert reason is not None
    if reason.startswith(errno.errorcode[errno.EPERM]):
        pytest.skip("process_vm_readv not permitted here")


def test_tuning_from_env_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGLET_SHM_STAGE_BYTES", "65536")
    monkeypatch.setenv("RINGLET_SHM_CMA_MIN_BYTES", "0")
    monkeypatch.setenv("RINGLET_SHM_CMA", "0")
    tuning = ShmTuning.from_env()
    assert tuning.stage_bytes == 65536 and not tuning.use_cma
    assert set(tuning.cma_min_bytes.values()) == {0}
    monkeypatch.setenv("RINGLET_SHM_STAGE_BYTES", "lots")
    with pytest.raises(ValueError, match="RINGLET_SHM_STAGE_BYTES"):
        ShmTuning.from_env()
    with pytest.raises(ValueError, match="multiple of 64"):
        ShmTuning(stage_bytes=5000).check()


def test_a_rank_that_cannot_attach_makes_every_rank_raise_shm_unavailable() -> None:
    rank0 = {
        "name": "ringlet-no-such-segment",
        "pid": os.getpid(),
        "start": None,
        "tuning": dataclasses.asdict(ShmTuning().fitted(2)),
        "problem": None,
    }
    seen: list[dict[str, object]] = []

    def exchange(value: bytes) -> list[bytes]:  # plays rank 0, which attached fine
        mine = json.loads(value)
        seen.append(mine)
        theirs = rank0 if len(seen) == 1 else {"address": 0, "problem": None}
        return [json.dumps(theirs).encode(), value]

    with pytest.raises(ShmUnavailable, match="rank 1 cannot attach ringlet-no-such-segment"):
        ShmGroup.open(1, 2, job="x", exchange=exchange, timeout=1.0)
    assert len(seen) == 2 and seen[1]["problem"]  # it still took part in the second round


def test_size_one_needs_no_segment() -> None:
    group = ShmGroup.open(0, 1, job="solo", exchange=lambda b: [b], timeout=1.0)
    x = np.arange(5.0)
    group.all_reduce(x, "sum", 1, time.monotonic() + 1)  # type: ignore[arg-type]
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    group.close()
    group.close()


def test_a_waiting_rank_spins_only_where_every_rank_has_a_core() -> None:
    """Where a host's ranks outnumber the cores, a spinning rank holds the core the rank it
    waits for needs: it yields at once instead."""
    from ringlet.transport.shm_wait import SPIN_SECONDS, spin_for, usable_cores

    assert spin_for(1) == SPIN_SECONDS
    assert spin_for(usable_cores()) == SPIN_SECONDS
    assert spin_for(usable_cores() + 1) == 0.0

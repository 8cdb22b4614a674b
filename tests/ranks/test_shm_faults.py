"""ShmGroup never hangs: mismatches, missing ranks, dead ranks and aborts all raise promptly.

Each test runs real processes (see test_shm_spmd.run_group) and checks what every rank raised,
how fast, and that nothing is left in /dev/shm.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
from test_shm_spmd import leftovers, run_group

from ringlet.errors import CollectiveTimeout, MismatchError, PeerError, RingletError
from ringlet.transport.shm import ShmGroup, ShmTuning
from ringlet.transport.shm_tuning import OPS

SIG = 0x1234


def _deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


# -- bodies ------------------------------------------------------------------------------------
def _sig_differs_on(group: ShmGroup, odd: int, kind: str) -> Any:
    sig = SIG + 1 if group.rank == odd else SIG
    x = np.arange(4, dtype=np.float32)
    if kind == "barrier":
        group.barrier(sig, _deadline())
    elif kind == "broadcast":  # the root publishes data and does not otherwise wait for anyone
        group.broadcast(x, 0, sig, _deadline())
    else:
        group.all_reduce(x, "sum", sig, _deadline())  # type: ignore[arg-type]
    return "no error"


def _counts_differ_on(group: ShmGroup, odd: int) -> Any:
    counts = [2] * group.size
    if group.rank == odd:
        counts[0] = 3  # claims rank 0 sends 3: a layout the others do not share
    inp = np.zeros(counts[group.rank], np.int32)
    group.all_gather(inp, np.empty(sum(counts), np.int32), counts, SIG, _deadline())
    return "no error"


def _one_rank_absent(group: ShmGroup, absent: int) -> Any:
    if group.rank == absent:
        time.sleep(1.0)  # never calls; stays alive so this is a timeout, not a death
        return "absent"
    start = time.monotonic()
    try:
        group.all_reduce(np.ones(3), "sum", SIG, time.monotonic() + 0.5)  # type: ignore[arg-type]
    except CollectiveTimeout:
        elapsed = time.monotonic() - start
        # a timed-out group refuses further calls rather than running out of step
        try:
            group.barrier(SIG, _deadline())
        except RingletError as later:
            return ("later call refused", elapsed, type(later).__name__)
        raise
    return "no error"


def _killed_mid_collective(group: ShmGroup, victim: int, nbytes: int) -> Any:
    x = np.ones(nbytes // 8)
    group.all_reduce(x, "sum", SIG, _deadline())  # everyone is in and attached
    if group.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        for _ in range(1000):
            group.all_reduce(x, "sum", SIG, _deadline(30))
    except PeerError as exc:
        return ("PeerError", time.monotonic() - start, exc.rank, str(exc))
    return "no error"


def _killed_by_timer(group: ShmGroup, victim: int) -> Any:
    x = np.ones(1 << 17)  # 1 MiB: the kill lands inside copies as often as between calls
    if group.rank == victim:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
    last_ok = time.monotonic()
    try:
        for _ in range(100_000):
            group.all_reduce(x, "sum", SIG, _deadline(30))  # type: ignore[arg-type]
            last_ok = time.monotonic()
    except PeerError as exc:
        return ("PeerError", time.monotonic() - last_ok, exc.rank)
    return "no error"


def _abort_by(group: ShmGroup, aborter: int) -> Any:
    if group.rank == aborter:
        time.sleep(0.3)
        group.abort(f"rank {aborter}: gave up on purpose")
        return "aborted"
    start = time.monotonic()
    try:
        group.barrier(SIG, _deadline(30))
    except PeerError as exc:
        return ("PeerError", time.monotonic() - start, str(exc))
    return "no error"


def _late_after_abort(group: ShmGroup, late: int) -> Any:
    x = np.ones(4)
    if group.rank == late:
        time.sleep(0.8)  # the others time out, then abort the group, as the communicator does
        start = time.monotonic()
        try:
            group.all_reduce(x, "sum", SIG, _deadline())  # type: ignore[arg-type]
        except PeerError as exc:
            return ("PeerError", time.monotonic() - start, str(exc))
        return "completed a call the others had given up"
    try:
        group.all_reduce(x, "sum", SIG, time.monotonic() + 0.3)  # type: ignore[arg-type]
    except (CollectiveTimeout, PeerError) as exc:  # PeerError: the other one aborted first
        group.abort(f"rank {group.rank}: {exc}")
        return "timed out"
    return "no error"


def _many_small(group: ShmGroup, iterations: int) -> Any:
    x = np.zeros(2, np.float32)
    start = time.monotonic()
    for i in range(iterations):
        x[:] = group.rank + i
        group.all_reduce(x, "sum", SIG, _deadline())  # type: ignore[arg-type]
    return time.monotonic() - start, x.tolist()


def _poll_raises(group: ShmGroup) -> Any:
    if group.rank == 1:
        time.sleep(1.0)
        return "late"
    try:
        group.barrier(SIG, _deadline(30))
    except KeyboardInterrupt as exc:  # what poll() raised: it must surface unchanged
        return ("poll raised", str(exc))
    return "no error"


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("size", "kind"), [(2, "all_reduce"), (4, "broadcast")])
def test_different_signature_raises_mismatch_on_every_rank(size: int, kind: str) -> None:
    odd = size - 1
    outcomes = run_group(_sig_differs_on, size, odd, kind, expect_errors=True)
    for o in outcomes:
        assert o.error_type == "SignatureMismatch", o.detail
        assert issubclass(
            __import__("ringlet.transport.shm", fromlist=["x"]).SignatureMismatch, MismatchError
        )
        assert o.attrs["signatures"] == tuple(
            (r, SIG + 1 if r == odd else SIG) for r in range(size)
        )
        assert f"rank {odd}: {SIG + 1:#018x}" in o.detail


@pytest.mark.timeout(60)
def test_different_counts_raise_mismatch_on_every_rank() -> None:
    outcomes = run_group(_counts_differ_on, 3, 2, expect_errors=True)
    assert [o.error_type for o in outcomes] == ["SignatureMismatch"] * 3


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_absent_rank_gives_timeout_naming_it() -> None:
    outcomes = run_group(_one_rank_absent, 3, 1, expect_errors=True)
    assert outcomes[1].value == "absent"
    for o in (outcomes[0], outcomes[2]):
        assert o.status == "ok", o.detail
        label, elapsed, later = o.value
        assert label == "later call refused" and later == "RingletError"
        assert 0.4 < elapsed < 1.5


@pytest.mark.timeout(60)
def test_timeout_error_names_missing_ranks() -> None:
    outcomes = run_group(_absent_with_error, 3, 2, expect_errors=True)
    for o in outcomes[:2]:
        assert o.error_type == "CollectiveTimeout", o.detail
        assert o.attrs["missing"] == (2,)
        assert "rank(s) 2" in o.detail


def _absent_with_error(group: ShmGroup, absent: int) -> Any:
    if group.rank == absent:
        time.sleep(0.8)
        return "absent"
    group.barrier(SIG, time.monotonic() + 0.3)
    return "no error"


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_rank_arriving_after_the_others_gave_up_raises_at_once() -> None:
    outcomes = run_group(_late_after_abort, 3, 1, expect_errors=True)
    assert [outcomes[r].value for r in (0, 2)] == ["timed out"] * 2
    label, took, message = outcomes[1].value
    assert label == "PeerError" and took < 0.5, outcomes[1].value
    assert "aborted" in message and "timed out" in message


@pytest.mark.alone
@pytest.mark.timeout(60)
@pytest.mark.parametrize("nbytes", [8])
def test_sigkill_mid_collective_gives_peer_error_and_no_leftover(nbytes: int) -> None:
    job = f"kill{secrets.token_hex(3)}"
    outcomes = run_group(_killed_mid_collective, 3, 1, nbytes, expect_errors=True, job=job)
    assert outcomes[1].status == "killed by signal 9"
    for o in (outcomes[0], outcomes[2]):
        assert o.status == "ok", o.detail
        label, elapsed, rank, message = o.value
        assert label == "PeerError" and rank == 1
        assert elapsed < 1.5, f"took {elapsed:.2f}s to notice"
        assert "rank 1 (pid" in message and "died" in message
    assert leftovers(job) == []


@pytest.mark.alone
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tuning", ["default", "cma"])
def test_sigkill_at_a_random_moment_gives_peer_error(tuning: str) -> None:
    job = f"kill{secrets.token_hex(3)}"
    outcomes = run_group(
        _killed_by_timer, 3, 2, expect_errors=True, job=job, tuning=FAULT_TUNINGS[tuning]
    )
    assert outcomes[2].status == "killed by signal 9"
    for o in outcomes[:2]:
        assert o.status == "ok", o.detail
        label, elapsed, rank = o.value
        assert (label, rank) == ("PeerError", 2)
        assert elapsed < 1.5, f"took {elapsed:.2f}s to notice"
    assert leftovers(job) == []


FAULT_TUNINGS = {
    "default": ShmTuning(),
    "cma": ShmTuning(flat_reduce_bytes=0, cma_min_bytes=dict.fromkeys(OPS, 0)),
}


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_abort_wakes_every_waiting_rank() -> None:
    outcomes = run_group(_abort_by, 3, 0, expect_errors=True)
    for o in outcomes[1:]:
        label, elapsed, message = o.value
        assert label == "PeerError"
        assert elapsed < 1.0
        assert "gave up on purpose" in message


@pytest.mark.alone
@pytest.mark.timeout(60)
def test_oversubscribed_ranks_do_not_stall() -> None:
    # 5 ranks on (typically) 2 cores: waiting must give the CPU away, so 300 tiny all_reduces
    # finish in well under the time a spinning implementation would need.
    outcomes = run_group(_many_small, 5, 300)
    total = sum(range(5))
    for o in outcomes:
        elapsed, x = o.value
        assert x == [total + 5 * 299] * 2
        assert elapsed < 15.0


def test_poll_is_called_while_waiting_and_can_stop_the_wait() -> None:
    outcomes = run_group(_poll_raises, 2, expect_errors=True, poll=_raising_poll)
    assert outcomes[0].value == ("poll raised", "stop waiting")


_POLL_START: list[float] = []


def _raising_poll() -> None:
    if not _POLL_START:
        _POLL_START.append(time.monotonic())
    if time.monotonic() - _POLL_START[0] > 0.2:
        raise KeyboardInterrupt("stop waiting")


def test_bad_arguments_raise_value_error_before_anything_moves() -> None:
    group = ShmGroup.open(0, 1, job="args", exchange=lambda b: [b], timeout=1.0)
    with pytest.raises(ValueError, match="root 3"):
        group.broadcast(np.zeros(2), 3, SIG, _deadline())
    with pytest.raises(ValueError, match="counts"):
        group.all_gather(np.zeros(2), np.zeros(2), [1, 1], SIG, _deadline())
    with pytest.raises(ValueError, match="stage_bytes"):
        ShmGroup.open(
            0,
            2,
            job="args",
            exchange=lambda b: [b, b],
            timeout=1.0,
            tuning=ShmTuning(stage_bytes=100),
        )
    with pytest.raises(ValueError, match="rank 2"):
        ShmGroup.open(2, 2, job="args", exchange=lambda b: [b, b], timeout=1.0)

"""Joining a shm group: create or attach the segment, unlink it, and probe cross-memory attach.

Three rounds of the caller's ``exchange`` (an all-gather of small byte strings), so that every
rank reaches the same verdict: (1) rank 0 shares the segment name and its tuning, every rank its
pid; (2) every rank says it attached, after which rank 0 unlinks the name; (3) every rank says
whether it can read every peer's memory. A rank that fails a step still takes part in the round
and reports the problem, so all ranks raise ShmUnavailable together instead of waiting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ringlet.errors import RingletError

from .cma import CrossMemory, allow_peers
from .shm_segment import Segment
from .shm_tuning import ShmTuning
from .shm_wait import PeerWatch, process_start_time


class ShmUnavailable(RingletError):
    """Shared memory cannot join this group (raised alike on every rank, so all can fall back)."""


def _raise_problems(replies: list[dict[str, Any]]) -> None:
    found = [r["problem"] for r in replies if r.get("problem")]
    if found:
        raise ShmUnavailable(
            "shared-memory transport unavailable: "
            + "; ".join(found)
            + "; set RINGLET_TRANSPORT=tcp to skip it"
        )


def _round(exchange: Callable[[bytes], list[bytes]], value: Any) -> list[Any]:
    return [json.loads(b) for b in exchange(json.dumps(value).encode())]


def join(
    rank: int,
    size: int,
    job: str,
    exchange: Callable[[bytes], list[bytes]],
    tuning: ShmTuning,
) -> tuple[Segment, CrossMemory | None, PeerWatch, ShmTuning]:
    """Map the group's segment on this rank; returns it, the cross-memory copier (None when
    some rank cannot use it), the peers' liveness watch and rank 0's tuning."""
    pid = os.getpid()
    seg: Segment | None = None
    problem: str | None = None
    if rank == 0:
        tuning = tuning.fitted(size)  # the others adopt rank 0's sizes and thresholds
        try:
            seg = Segment.create(job, size, tuning.stage_bytes)
        except OSError as exc:
            problem = f"rank 0 cannot create the segment in /dev/shm: {exc}"
    try:
        me = {
            "name": seg.name if seg else "",
            "pid": pid,
            "start": process_start_time(pid),
            "tuning": asdict(tuning),
            "problem": problem,
        }
        infos = _round(exchange, me)
        _raise_problems(infos)
        tuning = ShmTuning(**infos[0]["tuning"])
        if seg is None:
            try:
                seg = Segment.attach(infos[0]["name"], size)
            except OSError as exc:
                problem = f"rank {rank} cannot attach {infos[0]['name']}: {exc}"
        if tuning.use_cma:
            allow_peers()
        attached = _round(exchange, {"address": seg.address if seg else 0, "problem": problem})
        if rank == 0 and seg is not None:
            seg.unlink()  # everyone attached (or gave up): a crash now leaves nothing behind
        _raise_problems(attached)
        assert seg is not None
        pids = [int(i["pid"]) for i in infos]
        cma = CrossMemory(rank, pids) if tuning.use_cma else None
        unreadable = None
        if cma is not None:
            for q in range(size):
                if q != rank:
                    unreadable = unreadable or cma.probe(q, attached[q]["address"], 64)
        if any(v is not None for v in _round(exchange, unreadable)):
            cma = None  # some rank cannot read some peer: everyone stays on the segment
        starts = [
            i["start"] if process_start_time(p) == i["start"] else None
            for p, i in zip(pids, infos, strict=True)
        ]
        return seg, cma, PeerWatch(list(zip(pids, starts, strict=True))), tuning
    except BaseException:
        if seg is not None:
            if rank == 0:
                seg.unlink()
            seg.close()
        raise

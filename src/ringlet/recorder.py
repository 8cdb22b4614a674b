"""The flight recorder: each communicator's last calls, written out when one of them fails.

Every call leaves one small entry (what it was, its sequence number, algorithm, when it was
issued, started and ended, how it ended) in a ring buffer of ``RINGLET_TRACE_SIZE`` entries
(default 256; 0 turns the recorder off). When a call fails, the recorder logs a one-line summary
and, when ``RINGLET_TRACE_DIR`` is set, writes every entry as JSON to one file per rank, so that
"which rank was stuck where" can be answered after the job ended. The failure reporter also reads
it to tell the other ranks what this rank passed in a call it has already left.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from .calls import Call

log = logging.getLogger("ringlet")

#: Entries kept per communicator unless RINGLET_TRACE_SIZE says otherwise.
DEFAULT_SIZE = 256

ISSUED, RUNNING, DONE, FAILED, REJECTED = "issued", "running", "done", "failed", "rejected"


def trace_size() -> int:
    """RINGLET_TRACE_SIZE as a count of entries; ValueError naming the variable if it is not one."""
    raw = os.environ.get("RINGLET_TRACE_SIZE", "").strip()
    if not raw:
        return DEFAULT_SIZE
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < 0:
        raise ValueError(f"RINGLET_TRACE_SIZE={raw!r}: use a number of calls >= 0 (0 turns it off)")
    return size


class Entry:
    """One call as the recorder saw it; times are time.monotonic() seconds (0.0 = not yet)."""

    __slots__ = (
        "algorithm",
        "call",
        "end",
        "error",
        "issued",
        "schedule",
        "start",
        "state",
        "transport",
    )

    def __init__(self, call: Call, issued: float) -> None:
        self.call = call
        self.issued = issued
        self.start = 0.0
        self.end = 0.0
        self.state = ISSUED
        self.algorithm = ""
        self.transport = ""  # how its messages travelled: "shm", "tcp", "shm+tcp" or "self"
        self.schedule: Any = None  # the Schedule run over TCP; its peers are listed at dump time
        self.error = ""

    def finish(self, exc: BaseException | None = None) -> None:
        """Mark the call done, or failed with ``exc``."""
        self.end = time.monotonic()
        if exc is None:
            self.state = DONE
        else:
            self.state = FAILED
            self.error = f"{type(exc).__name__}: {exc}"

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        """The entry as JSON-ready data; ``wall_offset`` turns monotonic times into Unix times."""
        peers = sorted(self.schedule.peers()) if self.schedule is not None else []

        def wall(t: float) -> float | None:
            return round(t + wall_offset, 6) if t else None

        ran = (self.end or time.monotonic()) - self.start if self.start else None
        return {
            "seq": self.call.seq,
            "op": self.call.kind,
            "call": self.call.desc,
            "signature": f"{self.call.sig:#018x}",
            "state": self.state,
            "algorithm": self.algorithm,
            "transport": self.transport,
            "peers": peers,
            "issued": wall(self.issued),
            "start": wall(self.start),
            "end": wall(self.end),
            "seconds": None if ran is None else round(ran, 6),
            "error": self.error,
        }


class FlightRecorder:
    """The ring buffer of one communicator's calls, and its dump on failure."""

    def __init__(
        self,
        rank: int,
        size: int,
        comm_id: int,
        world_rank: int,
        job: str,
        capacity: int | None = None,
    ) -> None:
        self.rank, self.size, self.comm_id, self.world_rank, self.job = (
            rank,
            size,
            comm_id,
            world_rank,
            job,
        )
        self.entries: deque[Entry] = deque(maxlen=trace_size() if capacity is None else capacity)
        self.current: Entry | None = None  # the entry running now, for note()
        self._wall_offset = time.time() - time.monotonic()

    # -- the fast path: one small object per call ----------------------------------------------
    def issue(self, call: Call) -> Entry:
        """Record a call as issued (queued behind others, or about to run)."""
        entry = Entry(call, time.monotonic())
        self.entries.append(entry)  # a deque of maxlen 0 keeps nothing: the recorder is off
        return entry

    def begin(self, entry: Entry) -> None:
        entry.start = time.monotonic()
        entry.state = RUNNING
        self.current = entry

    def note(self, algorithm: str, schedule: Any, transport: str = "") -> None:
        """Remember the algorithm, schedule and transport the running call uses (its last phase
        wins)."""
        if (entry := self.current) is not None:
            entry.algorithm, entry.schedule, entry.transport = algorithm, schedule, transport

    # -- the slow path ---------------------------------------------------------------------------
    def reject(self, call: Call, exc: BaseException) -> None:
        """Record a call whose arguments this rank rejected before it moved any data."""
        entry = self.issue(call)
        entry.state, entry.error = REJECTED, f"{type(exc).__name__}: {exc}"

    def find(self, seq: int) -> Entry | None:
        """The entry of call ``seq``, if still kept."""
        for entry in reversed(self.entries):
            if entry.call.seq == seq:
                return entry
            if entry.call.seq < seq:
                return None
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        """Every kept entry, oldest first, as JSON-ready data."""
        return [e.as_dict(self._wall_offset) for e in list(self.entries)]

    def dump(self, error: BaseException, failed: Entry | None, transport: str) -> Path | None:
        """Log a one-line summary of the failure; write the trace file when RINGLET_TRACE_DIR is set."""
        path = None
        directory = os.environ.get("RINGLET_TRACE_DIR")
        if directory:
            path = Path(directory) / (
                f"ringlet-trace-{self.job}-c{self.comm_id:x}-r{self.world_rank}.json"
            )
            record = {
                "rank": self.rank,
                "size": self.size,
                "world_rank": self.world_rank,
                "communicator": f"{self.comm_id:#x}",
                "job": self.job,
                "transport": transport,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "written": time.time(),
                "error_class": type(error).__name__,
                "error": str(error),
                "calls": self.snapshot(),
            }
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                tmp.replace(path)  # readers never see half a file
            except OSError as exc:
                log.warning("ringlet: could not write the flight record to %s: %s", path, exc)
                path = None
        log.warning("%s", self.summary(error, failed, transport, path))
        return path

    def summary(
        self, error: BaseException, failed: Entry | None, transport: str, path: Path | None
    ) -> str:
        """One line: which rank, which call, how long it ran, with whom, and where the trace is."""
        head = (
            f"ringlet rank {self.world_rank} (rank {self.rank} of {self.size} in communicator "
            f"{self.comm_id:#x})"
        )
        if failed is None:
            what = "failed"
        else:
            ran = (failed.end or time.monotonic()) - (failed.start or failed.issued)
            how = f"{failed.algorithm} over {failed.transport or transport}"
            how = how if failed.algorithm else transport
            peers = sorted(failed.schedule.peers()) if failed.schedule is not None else []
            with_peers = f", peers {peers}" if peers else ""
            what = (
                f"{failed.call.desc} (call #{failed.call.seq}, {how}{with_peers}) failed "
                f"after {ran:.2f} s"
            )
        done = [e for e in self.entries if e.state == DONE]
        before = (
            f"last completed: {done[-1].call.desc} (call #{done[-1].call.seq})"
            if done
            else "no completed call kept"
        )
        where = (
            f"trace written to {path}"
            if path is not None
            else "set RINGLET_TRACE_DIR to write the trace of the last calls"
        )
        return f"{head}: {what} with {type(error).__name__}; {before}; {where}"

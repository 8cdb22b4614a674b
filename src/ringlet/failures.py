"""Carrying one rank's failure to every rank of the communicator, through the rendezvous store.

The fast path never touches the store. When a call fails on a rank, that rank writes an abort
record (who, which call, what happened) and its own description of the call; every other rank
waiting in the communicator checks the abort flag every ~100 ms, publishes its own description
and raises an error of the same class. Descriptions let a MismatchError name what each rank passed
and a CollectiveTimeout name the ranks that never arrived.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .calls import Call
from .errors import CollectiveTimeout, MismatchError, PeerError, RingletError

#: How long a failing rank waits for the other ranks' descriptions of their call.
GATHER_SECONDS = 1.0


def _kind(exc: BaseException) -> str:
    if isinstance(exc, MismatchError):
        return "mismatch"
    if isinstance(exc, (CollectiveTimeout, TimeoutError)):
        return "timeout"
    return "peer"


class Reporter:
    """Writes and reads the abort records of one communicator (keys under ``prefix``)."""

    def __init__(self, store: Any, prefix: str, rank: int, size: int) -> None:
        self.store, self.prefix, self.rank, self.size = store, prefix, rank, size
        self._seen_abort = False

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _publish_desc(self, call: Call | None) -> None:
        desc = {"seq": call.seq, "desc": call.desc} if call else {"seq": -1, "desc": "no call"}
        self.store.set(self._key(f"desc/{self.rank}"), json.dumps(desc).encode())

    def poll(self, call: Call | None) -> None:
        """Raise the job's failure if another rank reported one; cheap (one store request)."""
        try:
            flag = self.store.try_get(self._key("aborted"))
        except (OSError, RingletError):
            return  # the store's host left; the transport still sees dead peers
        if flag is None or self._seen_abort:
            return
        self._seen_abort = True
        first = json.loads(self.store.get(self._key("abort/first"), timeout=5.0))
        self._publish_desc(call)
        raise self._error(first, call)

    def report(self, call: Call | None, exc: BaseException) -> RingletError:
        """Record this rank's failure for the others and return the error this rank raises."""
        if self._seen_abort and isinstance(exc, RingletError):
            return exc  # already the job-wide error
        self._seen_abort = True
        record = {"rank": self.rank, "kind": _kind(exc), "message": str(exc),
                  "seq": call.seq if call else -1, "call": call.desc if call else ""}
        try:
            self._publish_desc(call)
            if self.store.add(self._key("abort/count"), 1) == 1:
                self.store.set(self._key("abort/first"), json.dumps(record).encode())
            self.store.set(self._key("aborted"), b"1")
        except (OSError, RingletError):
            return exc if isinstance(exc, RingletError) else PeerError(str(exc))
        return self._error(record, call, own=exc)

    def _descriptions(self, seq: int) -> dict[int, tuple[int, str]]:
        """Every rank's published (seq, description), waiting briefly for stragglers."""
        found: dict[int, tuple[int, str]] = {}
        end = time.monotonic() + GATHER_SECONDS
        while True:
            for r in range(self.size):
                if r in found:
                    continue
                raw = self.store.try_get(self._key(f"desc/{r}"))
                if raw is not None:
                    d = json.loads(raw)
                    if d["seq"] >= seq:
                        found[r] = (d["seq"], d["desc"])
            if len(found) == self.size or time.monotonic() > end:
                return found
            time.sleep(0.02)

    def _error(self, record: dict[str, Any], call: Call | None, own: BaseException | None = None) -> RingletError:
        kind, origin = record["kind"], record["rank"]
        where = f"{call.desc} (call #{call.seq}) on rank {self.rank}" if call else f"rank {self.rank}"
        if kind == "mismatch":
            descs = self._descriptions(record["seq"])
            lines = "; ".join(f"rank {r}: {d} (call #{s})" for r, (s, d) in sorted(descs.items()))
            missing = sorted(set(range(self.size)) - set(descs))
            extra = f"; no report from ranks {missing}" if missing else ""
            return MismatchError(
                f"{where}: ranks called different collectives or passed different arguments — "
                f"{lines}{extra}. Make every rank make the same calls in the same order."
            )
        if kind == "timeout":
            descs = self._descriptions(record["seq"])
            missing = tuple(r for r in range(self.size) if r not in descs)
            why = record["message"] if origin == self.rank else f"rank {origin}: {record['message']}"
            return CollectiveTimeout(
                f"{where} timed out: ranks {list(missing)} have not arrived at call "
                f"#{record['seq']} ({why}). Check that every rank makes this call, or raise the "
                "timeout (ringlet.init(timeout=…) or RINGLET_TIMEOUT).",
                missing=missing,
            )
        if own is not None and isinstance(own, PeerError):
            return own
        return PeerError(
            f"{where}: rank {origin} failed in {record['call']} (call #{record['seq']}): "
            f"{record['message']}",
            rank=origin,
        )

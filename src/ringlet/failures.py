"""Carrying one rank's failure to every rank of the communicator, through the rendezvous store.

The fast path never touches the store. When a call fails on a rank, that rank writes an abort
record (who, which call, what happened, which rank is to blame) unless another rank wrote one
first, and bumps the communicator's event counter. Every rank waiting in the communicator reads
that counter every ~100 ms (one store request); when it moved, it looks for the abort record, and
for a rank that rejected its arguments to the call it is waiting in. Each rank then publishes its
description of the failed call — from its flight recorder if it has already left it — and raises
an error built from the first record, so all ranks raise the same class: a MismatchError that
names what each rank passed, a CollectiveTimeout that names the ranks that never arrived, or a
PeerError that names the rank that died. A rank that has waited a second in a call also checks,
once, that the first other rank to wait that long waits in the same call, which turns ranks
deadlocked in different collectives into a MismatchError long before the timeout.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from .calls import Call
from .errors import CollectiveTimeout, MismatchError, PeerError, RingletError
from .recorder import FlightRecorder

#: How long a failing rank waits for the other ranks' descriptions of the failed call.
GATHER_SECONDS = 0.5
#: The longest a waiting rank's check of the store may take (a stalled store host is skipped).
POLL_BOUND = 0.5
#: The longest a failing or rejecting rank spends telling the others through the store.
REPORT_BOUND = 2.0
#: After waiting this long in a call, a rank checks that the others wait in the same call.
SLOW_WAIT = 1.0
WAIT_SLOTS = 16
#: How much of a rejected call's error message the other ranks are shown.
REJECT_CHARS = 160
#: How many of its last calls a rank describes when a call fails (to find where ranks diverged).
HISTORY = 8
REJECTED_MARK = " rejected its arguments ("

def _kind(exc: BaseException) -> str:
    if isinstance(exc, MismatchError):
        return "mismatch"
    if isinstance(exc, (CollectiveTimeout, TimeoutError)):
        return "timeout"
    return "peer"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class Reporter:
    """Writes and reads the failure records of one communicator (keys under ``prefix``)."""

    def __init__(
        self,
        store: Any,
        prefix: str,
        rank: int,
        size: int,
        recorder: FlightRecorder | None = None,
        store_rank: int | None = None,
    ) -> None:
        self.store, self.prefix, self.rank, self.size = store, prefix, rank, size
        self.recorder = recorder
        self.store_rank = store_rank  # the rank of this communicator that hosts the store, if any
        self._seen_abort = False
        self._checked: tuple[int, bytes] | None = None  # (call, event count) last looked at
        self._waited = -1  # the last call compared with the other ranks' after a long wait

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _bounded(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """The store's requests end within ``seconds`` inside (a frozen rank 0 cannot hold a call
        past its deadline); a store without the bound is used as it is."""
        bounded = getattr(self.store, "bounded", None)
        return bounded(seconds) if bounded is not None else contextlib.nullcontext()

    # -- waiting ranks -------------------------------------------------------------------------
    def poll(self, call: Call | None) -> None:
        """Raise the job's failure if another rank reported one, rejected this call's arguments,
        or waits in a different call under the same sequence number.

        Costs one store request while nothing happened, and two more once a call waited long.
        """
        if self._seen_abort:
            return
        first: dict[str, Any] | None = None
        rejected = other = None
        try:
            with self._bounded(POLL_BOUND):  # the usual case: one short request
                events = self.store.try_get(self._key("events"))
            mark = (call.seq if call is not None else -1, events or b"")
            if events is not None and mark != self._checked:
                with self._bounded(REPORT_BOUND):
                    self._checked = mark
                    if self.store.try_get(self._key("aborted")) is not None:
                        self._seen_abort = True
                        first = json.loads(self.store.get(self._key("abort/first"), timeout=5.0))
                        self._publish_desc(call)
                    elif call is not None:
                        rejected = self.store.try_get(self._key(f"reject/{call.seq}"))
            if first is None and rejected is None and call is not None:
                with self._bounded(POLL_BOUND):
                    other = self._other_waiter(call)
        except (OSError, RingletError):
            return  # the store's host left; the transport still sees dead peers
        if first is not None:
            raise self._error(first, call)
        if rejected is not None and call is not None:
            info = json.loads(rejected)
            raise MismatchError(
                f"rank {info['rank']} rejected its arguments to call #{call.seq} "
                f"({info['desc']}) while this rank called {call.desc}"
            )
        if other is not None and call is not None:
            raise MismatchError(
                f"rank {other['rank']} waits in {other['desc']} at call "
                f"#{call.seq} while this rank waits in {call.desc}"
            )

    def _other_waiter(self, call: Call) -> dict[str, Any] | None:
        """Once per call that waited SLOW_WAIT seconds: compare it with the first such waiter's.

        Ranks that wait for each other in different collectives (an all_reduce and a broadcast)
        receive no frame to tell them apart; this finds them long before the timeout.
        """
        entry = self.recorder.current if self.recorder is not None else None
        if (
            self._waited == call.seq
            or entry is None
            or entry.call is not call
            or time.monotonic() - entry.start < SLOW_WAIT
        ):
            return None
        self._waited = call.seq
        slot = self._key(f"waiting/{call.seq % WAIT_SLOTS}")  # a few slots, reused: no growth
        mine = json.dumps(
            {"seq": call.seq, "sig": call.sig, "rank": self.rank, "desc": call.desc}
        ).encode()
        held = self.store.try_get(slot)
        if held is None or json.loads(held)["seq"] < call.seq:
            held = self.store.compare_set(slot, held or b"", mine)
        other: dict[str, Any] = json.loads(held)
        return other if other["seq"] == call.seq and other["sig"] != call.sig else None

    # -- the failing rank ----------------------------------------------------------------------
    def report(self, call: Call | None, exc: BaseException) -> RingletError:
        """Record this rank's failure for the others and return the error this rank raises."""
        if self._seen_abort and isinstance(exc, RingletError):
            return exc  # already the job-wide error
        self._seen_abort = True
        record: dict[str, Any] = {
            "rank": self.rank,
            "kind": _kind(exc),
            "message": str(exc),
            "blame": getattr(exc, "rank", None) if isinstance(exc, PeerError) else None,
            "seq": call.seq if call else -1,
            "call": call.desc if call else "",
        }
        if record["blame"] is None:
            record["blame"] = self.rank
        try:
            with self._bounded(REPORT_BOUND):
                if self.store.add(self._key("abort/count"), 1) == 1:
                    first = record
                    self.store.set(self._key("abort/first"), json.dumps(record).encode())
                    self.store.set(self._key("aborted"), b"1")
                    self.store.add(self._key("events"), 1)
                else:  # another rank failed first: raise what it reported, so every rank agrees
                    first = json.loads(self.store.get(self._key("abort/first"), timeout=5.0))
                self._publish_desc(call)
                return self._error(first, call, own=exc)
        except (OSError, RingletError, TimeoutError) as gone:
            blame = self.store_rank if self.store_rank is not None else getattr(exc, "rank", None)
            where = f"{call.desc} (call #{call.seq}) on rank {self.rank}" if call else ""
            if isinstance(gone, CollectiveTimeout):  # the store's host is there but silent
                return CollectiveTimeout(
                    f"{where}: {exc}; the rendezvous store does not answer either ({gone}), so "
                    f"rank {blame}, which hosts it, is stopped or stalled. The communicator "
                    "cannot be used any more.",
                    missing=() if blame is None else (blame,),
                )
            # Only the death of its host takes the store away: blame that rank.
            return PeerError(
                f"{where}: {exc}; the rendezvous store is unreachable too ({gone}), so rank "
                f"{blame}, which hosts it, has probably died. The communicator cannot be used any "
                "more.",
                rank=blame,
            )

    def reject(self, call: Call) -> None:
        """Tell the other ranks this rank rejected its arguments to ``call``, so they stop waiting."""
        if self.size == 1:
            return
        try:
            with self._bounded(REPORT_BOUND):
                self._publish_desc(call, final=False)
                info = {"rank": self.rank, "desc": call.desc}
                self.store.set(self._key(f"reject/{call.seq}"), json.dumps(info).encode())
                self.store.add(self._key("events"), 1)
        except (OSError, RingletError):
            pass  # the store's host left; the others learn of it from their transports

    # -- building the job-wide error -----------------------------------------------------------
    def _publish_desc(self, call: Call | None, final: bool = True) -> None:
        """Publish where this rank is and what it passed in its last calls (flight recorder).

        ``final`` marks a description given after the failure, the one the others wait for.
        """
        recent: dict[int, str] = {}
        if self.recorder is not None:
            for entry in list(self.recorder.entries)[-HISTORY:]:
                recent[entry.call.seq] = entry.call.desc
        if call is not None:
            recent[call.seq] = call.desc
        seq = call.seq if call is not None else max(recent, default=-1)
        value = {"seq": seq, "final": final, "calls": {str(k): v for k, v in recent.items()}}
        self.store.set(self._key(f"desc/{self.rank}"), json.dumps(value).encode())

    def _descriptions(self, seq: int) -> tuple[dict[int, dict[int, str]], list[int]]:
        """Every rank's recent calls, waiting briefly for ranks yet to describe them after the
        failure; and the ranks that reached call ``seq``."""
        found: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + GATHER_SECONDS
        try:
            while True:
                for r in range(self.size):
                    if r not in found or not found[r]["final"]:
                        raw = self.store.try_get(self._key(f"desc/{r}"))
                        if raw is not None:
                            found[r] = json.loads(raw)
                complete = len(found) == self.size and all(d["final"] for d in found.values())
                if complete or time.monotonic() > end:
                    break
                time.sleep(0.02)
        except (OSError, RingletError):
            pass  # the store's host left: make do with what arrived
        calls = {r: {int(k): v for k, v in d["calls"].items()} for r, d in found.items()}
        return calls, sorted(r for r, d in found.items() if d["seq"] >= seq)

    def _error(
        self, first: dict[str, Any], call: Call | None, own: BaseException | None = None
    ) -> RingletError:
        kind, origin, seq = first["kind"], first["rank"], first["seq"]
        where = (
            f"{call.desc} (call #{call.seq}) on rank {self.rank}" if call else f"rank {self.rank}"
        )
        if kind in ("mismatch", "timeout"):
            descs, arrived = self._descriptions(seq)
            differ = _first_difference(descs)
            if differ is not None:
                return self._mismatch(where, *differ)
            if kind == "mismatch":
                agreed = {c[seq] for c in descs.values() if seq in c}
                return MismatchError(
                    f"{where}: {first['message']} (reported by rank {origin} in call #{seq}; the "
                    f"ranks agree on the call: {', '.join(sorted(agreed)) or first['call']}). Check "
                    "that every rank uses the same ringlet version and RINGLET_* settings."
                )
            return self._timeout(where, first, arrived, call)
        blame = first.get("blame", origin)
        if blame != origin:
            seen = "" if origin == self.rank else f" (seen by rank {origin} in call #{seq})"
            what = f"lost rank {blame}: {first['message']}{seen}"
        elif origin == self.rank and own is not None:
            what = f"this rank failed: {first['message']}"
        else:
            what = f"rank {origin} failed in {first['call']} (call #{seq}): {first['message']}"
        return PeerError(
            f"{where}: {what}. The communicator cannot be used any more; see the "
            f"output of rank {blame} for why it stopped.",
            rank=blame,
        )

    def _mismatch(self, where: str, seq: int, groups: dict[str, list[int]]) -> MismatchError:
        heard = sorted(r for ranks in groups.values() for r in ranks)
        parts = [
            f"{_ranks(rs)}: {d}"
            for d, rs in sorted(groups.items(), key=lambda g: (len(g[1]), g[1]))
        ]
        missing = sorted(set(range(self.size)) - set(heard))
        extra = f"; no report from {_ranks(missing)}" if missing else ""
        return MismatchError(
            f"{where}: ranks called different collectives or passed different arguments at call "
            f"#{seq} — {'; '.join(parts)}{extra}. Make every rank make the same calls in the same "
            "order, with the same dtype, shape, reduce op and root."
        )

    def _timeout(
        self, where: str, first: dict[str, Any], arrived: list[int], call: Call | None
    ) -> CollectiveTimeout:
        seq, origin = first["seq"], first["rank"]
        why = first["message"] if origin == self.rank else f"rank {origin}: {first['message']}"
        missing = tuple(r for r in range(self.size) if r not in arrived)
        advice = (
            "Check that every rank makes this call, or raise the timeout "
            "(ringlet.init(timeout=…), RINGLET_TIMEOUT, or timeout= on the call)."
        )
        if missing:
            verb = "has" if len(missing) == 1 else "have"
            return CollectiveTimeout(
                f"{where} timed out: {_ranks(list(missing))} {verb} not arrived at call #{seq} "
                f"({why}). {advice}",
                missing=missing,
            )
        late = origin != self.rank and call is not None and call.seq == seq
        text = (
            f"this rank arrived at call #{seq} after rank {origin} had given up waiting ({why})"
            if late
            else f"every rank reached call #{seq}, but not all within the timeout ({why})"
        )
        return CollectiveTimeout(
            f"{where} timed out: {text}. {advice}", missing=(self.rank,) if late else ()
        )


def _first_difference(descs: dict[int, dict[int, str]]) -> tuple[int, dict[str, list[int]]] | None:
    """The earliest call the ranks described differently, with the ranks behind each description.

    Calls every rank rejected (for whatever reason) moved no data and are passed over.
    """
    for seq in sorted({s for calls in descs.values() for s in calls}):
        groups: dict[str, list[int]] = {}
        for r, calls in sorted(descs.items()):
            if seq in calls:
                groups.setdefault(calls[seq], []).append(r)
        if len(groups) > 1 and not all(REJECTED_MARK in d for d in groups):
            return seq, groups
    return None


def rejected_call(kind: str, seq: int, exc: BaseException) -> Call:
    """The record of a call this rank refused: what it was and why, short enough for a message."""
    why = f"{type(exc).__name__}: {exc}"
    if len(why) > REJECT_CHARS:
        why = why[: REJECT_CHARS - 1] + "…"
    return Call(kind, seq, 0, f"{kind}{REJECTED_MARK}{why})")


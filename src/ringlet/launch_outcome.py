"""How the ranks of a `ringlet run` job ended, which one caused the end, and the summary saying so.

When one rank fails the others usually fail after it — a PeerError or a CollectiveTimeout because
their peer is gone — so the first exit is not always the cause: a rank that stalled (SIGSTOP) or
left early while the others still needed it can be. `RankProcess` holds what the launcher knows of
one started rank (its process, the tail of its stderr, whether the launcher stopped it, when it
exited); `culprit` picks the rank to blame and `summary` words every rank's fate for the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field

TAIL_LINES = 200  # stderr lines kept per rank for the failure summary
#: The last line of a traceback raised because another rank failed, stopped or left: a victim.
_VICTIM = re.compile(r"^(?:ringlet\.errors\.)?(?:PeerError|CollectiveTimeout|BrokenCommunicator)\b")


#: A victim's CollectiveTimeout naming the ranks that never arrived at the call (failures.py).
_MISSING = re.compile(r"timed out: ranks? ([\d, ]+) ha(?:s|ve) not arrived at call")


def is_victim_line(line: str) -> bool:
    """True for an error line saying the rank failed because another rank failed, stopped or left."""
    return _VICTIM.match(line) is not None


def describe_exit(returncode: int) -> str:
    """'ok', 'exit code C' or 'killed by SIGNAME' for a Popen return code."""
    if returncode == 0:
        return "ok"
    if returncode > 0:
        return f"exit code {returncode}"
    return f"killed by {signal_name(-returncode)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def proc_stat(pid: int) -> list[str]:
    """Fields 3 on of /proc/<pid>/stat (the state first, the start time at index 19); [] if gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[-1].split()
    return []


@dataclass
class RankProcess:
    """One started rank: its process, output threads, stderr tail and how it ended."""

    rank: int
    proc: subprocess.Popen[bytes]
    threads: list[threading.Thread] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopped_with: int | None = None  # the signal the launcher sent, if it stopped this rank
    stalled: bool = False  # found stopped (SIGSTOP, ^Z) when another rank failed
    exited_at: float | None = None  # monotonic time it exited
    start_time: str = ""  # the leader's start time: after it is gone, its pid may name another

    def __post_init__(self) -> None:
        self.start_time = "".join(proc_stat(self.proc.pid)[19:20])

    @property
    def failed_alone(self) -> bool:
        """True when the rank failed by itself, not because the launcher stopped it."""
        return self.proc.returncode not in (None, 0) and self.stopped_with is None

    @property
    def victim(self) -> bool:
        """True when it failed because another rank failed, stopped or left (ringlet says so)."""
        return any(is_victim_line(line) for line in list(self.tail)[-30:])

    def is_stopped(self) -> bool:
        """True when the process is stopped (state T): it will never answer the others."""
        return proc_stat(self.proc.pid)[:1] in (["T"], ["t"])

    def missing(self) -> list[int]:
        """The ranks its CollectiveTimeout says never arrived at the call (none: no such error)."""
        for line in reversed(list(self.tail)[-30:]):
            if found := _MISSING.search(line):
                return [int(r) for r in found.group(1).split(",")]
        return []

    def last_error(self) -> str:
        """The last line of its stderr that looks like an exception, for the summary."""
        for line in reversed(self.tail):
            if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Timeout)\b", line):
                return line
        return ""

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the rank's whole process group (the group id is the rank's pid), unless
        the rank is gone and its pid now names another process (which a signal would hit)."""
        if self.proc.returncode is not None and proc_stat(self.proc.pid)[19:20] not in (
            [],
            [self.start_time],
        ):
            return
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def join_output(self, deadline: float) -> None:
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def culprit(ranks: dict[int, RankProcess], first_failure: RankProcess | None) -> RankProcess | None:
    """The rank that caused the end: the first to fail by itself, else one that stopped, one the
    others' timeouts name as never arriving while it ran on (busy in its own code), or one that
    left early while the others waited for it; the first failure only when nothing else fits.
    """
    if first_failure is None:
        return None
    failures = sorted(
        (r for r in ranks.values() if r.failed_alone and r.exited_at is not None),
        key=lambda r: r.exited_at or 0.0,
    )
    for rank in failures:
        if not rank.victim:
            return rank
    if stalled := [r for r in ranks.values() if r.stalled]:
        return stalled[0]
    named = [ranks[m] for r in failures for m in r.missing() if m in ranks]
    if hung := [r for r in named if r.stopped_with is not None]:  # ran on till the launcher's end
        return hung[0]
    assert first_failure.exited_at is not None
    left = [r for r in ranks.values() if r.proc.returncode == 0 and r.stopped_with is None
            and r.exited_at is not None and r.exited_at <= first_failure.exited_at]  # fmt: skip
    return left[0] if left else first_failure


def summary(ranks: dict[int, RankProcess], culprit: RankProcess | None) -> str:
    """Every rank's fate, the rank that caused the end marked; tracebacks are not repeated."""
    lines = ["ringlet run: job summary"]
    for rank in ranks.values():  # in rank order, as started
        outcome = describe_exit(rank.proc.returncode)
        if rank.stopped_with is not None:
            sent = signal_name(rank.stopped_with)
            ended = "" if rank.proc.returncode == -rank.stopped_with else f", then {outcome}"
            outcome = f"terminated by launcher ({sent}{ended})"
        if rank.stalled:
            outcome = f"stopped (not running), {outcome}"
        elif rank.failed_alone and rank.victim:
            kind = rank.last_error().split(":", 1)[0].rsplit(".", 1)[-1]
            outcome += f", because of another rank ({kind})"
        elif rank.failed_alone and (error := rank.last_error()):
            outcome += f": {error if len(error) <= 160 else error[:157] + '...'}"
        if rank is culprit:
            if rank.stalled:
                outcome += "  <- caused the end: it stalled and the others timed out waiting"
            elif rank.stopped_with is not None:
                outcome += "  <- caused the end: it never made the call the others timed out in"
            elif rank.proc.returncode == 0:
                outcome += "  <- caused the end: it left while the others still needed it"
            else:
                outcome += "  <- failed first"
        lines.append(f"  rank {rank.rank}: {outcome}")
    if culprit is not None and culprit.failed_alone:
        lines.append(f"(rank {culprit.rank}'s traceback is above, in its [r{culprit.rank}] lines)")
    return "\n".join(lines)

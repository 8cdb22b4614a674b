"""Forwarding the ranks' output: one sink per launcher stream and the threads that feed it.

Every rank's stdout and stderr are pipes read by threads of the launcher; a `Sink` serialises
their writes so that a line (and, for stderr, a whole burst such as a traceback) lands in one
piece, each line prefixed with its rank's [rN]. Kept apart from the supervision in
`ringlet.launch` because it is about bytes and timing only: it never learns how a rank ended,
only keeps the tail of its stderr for the summary. With --quiet-others, `QuietOthers` cuts a
traceback that only says "another rank failed" (or repeats one already shown) to one line.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections import deque
from typing import IO

from ringlet.launch_outcome import is_victim_line

_MAX_LINE = 1 << 20  # a longer "line" is forwarded in pieces rather than buffered whole
_QUIET = 0.05  # a rank's stderr silent this long: what it wrote in the burst goes out as one block
_BLOCK_AGE = 0.5  # ... and never held longer than this
_MAX_BLOCK = 1 << 16


class Sink:
    """A launcher output stream shared by the forwarding threads; one whole line per write."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._broken:
                return  # keep draining the ranks' pipes so they never block on a full pipe
            try:
                buffer = getattr(self._stream, "buffer", None)
                if buffer is not None:
                    self._stream.flush()
                    buffer.write(data)
                    buffer.flush()
                else:
                    self._stream.write(data.decode(errors="replace"))
                    self._stream.flush()
            except (OSError, ValueError):
                self._broken = True

    def line(self, text: str) -> None:
        self.write(text.encode() + b"\n")


_TRACEBACK = "Traceback (most recent call last):"
_ERROR = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt|Timeout)\b")


class QuietOthers:
    """--quiet-others: the first failure in full, one line for each rank that failed after it.

    A block of a rank's stderr holding a traceback whose error says another rank failed, stopped
    or left (PeerError, CollectiveTimeout, BrokenCommunicator) is held back and replaced by that
    error's line; so is a traceback identical to one another rank already showed. The launcher
    prints the first held traceback at the end if no rank failed by itself (`held_first`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shown: dict[tuple[str, ...], int] = {}  # traceback text -> the rank that showed it
        self._held: list[tuple[int, list[bytes]]] = []  # (rank, block) in the order they came

    def filter(self, rank: int, lines: list[bytes]) -> list[bytes]:
        """The lines of one stderr block to forward: all of them, or one line instead."""
        text = [line.decode(errors="replace").rstrip("\r") for line in lines]
        if not any(line.startswith(_TRACEBACK) for line in text):
            return lines
        errors = [line for line in text if _ERROR.match(line)]
        last = errors[-1] if errors else text[-1]
        key = tuple(text[text.index(_TRACEBACK) :])
        with self._lock:
            if any(is_victim_line(line) for line in text):
                self._held.append((rank, lines))
                note = "traceback left out (--quiet-others)"
            elif (first := self._shown.setdefault(key, rank)) != rank:
                note = f"the same traceback as rank {first}'s, left out (--quiet-others)"
            else:
                return lines
        return [f"{last}  [{note}]".encode()]

    def held_first(self) -> tuple[int, list[bytes]] | None:
        """The first traceback held back, with its rank; None if none was."""
        with self._lock:
            return self._held[0] if self._held else None


def pump_lines(source: IO[bytes], sink: Sink, prefix: bytes, tail: deque[str] | None) -> None:
    """Copy one stream of a rank to the launcher's, line by line, each line prefixed."""
    with source:
        for line in iter(lambda: source.readline(_MAX_LINE), b""):
            if tail is not None:
                tail.append(line.decode(errors="replace").rstrip("\r\n"))
            sink.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))


def pump_blocks(
    source: IO[bytes],
    sink: Sink,
    prefix: bytes,
    tail: deque[str],
    quiet: tuple[QuietOthers, int] | None = None,
) -> None:
    """Forward a rank's stderr in bursts: lines written together (a traceback) stay together.

    Whatever arrived is written as one block, each line prefixed, once the stream has been quiet
    for 50 ms (or the block is 0.5 s old or 64 KiB), so other ranks' lines never land inside it.
    ``quiet`` (the job's filter and this rank) may cut a block to one line; the tail keeps all.
    """
    fd = source.fileno()
    pending, since = b"", 0.0

    def flush(data: bytes, final: bool) -> bytes:
        """Write the complete lines of ``data`` as one block; return the unfinished rest."""
        cut = len(data) if final or len(data) >= _MAX_BLOCK else data.rfind(b"\n") + 1
        body, rest = data[:cut], data[cut:]
        lines = body.split(b"\n")
        if body.endswith(b"\n"):
            lines.pop()
        for line in lines:
            tail.append(line.decode(errors="replace").rstrip("\r"))
        if lines and quiet is not None:
            lines = quiet[0].filter(quiet[1], lines)
        if lines:
            sink.write(b"".join(prefix + line + b"\n" for line in lines))
        return rest

    with source:
        while True:
            wait = None
            if pending:
                wait = max(0.0, min(_QUIET, since + _BLOCK_AGE - time.monotonic()))
            ready, _, _ = select.select([fd], [], [], wait)
            if pending and (not ready or time.monotonic() - since >= _BLOCK_AGE):
                pending = flush(pending, final=False)
                since = time.monotonic()
            if not ready:
                continue
            chunk = os.read(fd, _MAX_BLOCK)
            if not chunk:
                break
            if not pending:
                since = time.monotonic()
            pending += chunk
            if len(pending) >= _MAX_BLOCK:
                pending = flush(pending, final=False)
        if pending:
            flush(pending, final=True)

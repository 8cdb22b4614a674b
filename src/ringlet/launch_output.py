"""Forwarding the ranks' output: one sink per launcher stream and the threads that feed it.

Every rank's stdout and stderr are pipes read by threads of the launcher; a `Sink` serialises
their writes so that a line (and, for stderr, a whole burst such as a traceback) lands in one
piece, each line prefixed with its rank's [rN]. Kept apart from the supervision in
`ringlet.launch` because it is about bytes and timing only: it never learns how a rank ended,
only keeps the tail of its stderr for the summary.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from typing import IO

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


def pump_lines(source: IO[bytes], sink: Sink, prefix: bytes, tail: deque[str] | None) -> None:
    """Copy one stream of a rank to the launcher's, line by line, each line prefixed."""
    with source:
        for line in iter(lambda: source.readline(_MAX_LINE), b""):
            if tail is not None:
                tail.append(line.decode(errors="replace").rstrip("\r\n"))
            sink.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))


def pump_blocks(source: IO[bytes], sink: Sink, prefix: bytes, tail: deque[str]) -> None:
    """Forward a rank's stderr in bursts: lines written together (a traceback) stay together.

    Whatever arrived is written as one block, each line prefixed, once the stream has been quiet
    for 50 ms (or the block is 0.5 s old or 64 KiB), so other ranks' lines never land inside it.
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

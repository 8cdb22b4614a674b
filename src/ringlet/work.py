"""Work handles and the communicator's progress thread, which runs calls in issue order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import CollectiveTimeout


class Work:
    """The handle of an asynchronous call: ``wait()`` returns its result or raises its error."""

    def __init__(self, desc: str = "") -> None:
        self.desc = desc
        self._done = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Work], None]] = []
        self._lock = threading.Lock()

    def _finish(self, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self._result, self._exc = result, exc
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, cb: Callable[[Work], None]) -> None:
        """Call ``cb(work)`` when the call finishes (at once if it already has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(cb)
                return
        cb(self)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the call finished; return its result or raise its error.

        A ``timeout`` here only bounds this wait (CollectiveTimeout); the call itself keeps its own
        deadline and goes on.
        """
        if not self._done.wait(timeout):
            raise CollectiveTimeout(f"{self.desc}: not finished after waiting {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    def exception(self) -> BaseException | None:
        """The call's error once it finished with one, else None."""
        return self._exc if self._done.is_set() else None

    def result(self) -> Any:
        return self.wait()


class Worker:
    """One thread per communicator that executes submitted calls strictly in submission order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Work] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        return self._pending == 0

    def on_worker_thread(self) -> bool:
        """True inside a call or a done-callback that runs on this worker's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, fn: Callable[[], Any], desc: str) -> Work:
        work = Work(desc)
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((fn, work))
        return work

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, work = item
            result, error = None, None
            try:
                result = fn()
            except BaseException as exc:  # carried to wait()
                error = exc
            with self._lock:
                self._pending -= 1
            work._finish(result, error)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None

"""The threads that resolve the backend's torch Futures (and so run their callbacks).

A Future's callbacks may issue another call and wait for it (torch's PowerSGD hook does, inside a
``then`` callback of the previous call's Future), so they cannot run on ringlet's progress thread,
which would then wait for itself; and no fixed number of threads is enough either, since each
nested level holds one thread while it waits for the next. So a resolution never waits for a
thread: when every thread is busy (a callback blocked, or just working) one more starts. Threads
beyond the first ``KEEP`` end after ``IDLE_SECONDS`` without work, so the count follows the
deepest nesting a program reaches, not the number of calls.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["IDLE_SECONDS", "KEEP", "resolve", "threads"]

#: Threads kept waiting for work however long they idle.
KEEP = 2
#: Seconds a thread beyond ``KEEP`` waits for work before it ends.
IDLE_SECONDS = 5.0

_log = logging.getLogger("ringlet.torch")
_cond = threading.Condition()
_tasks: deque[Callable[[], None]] = deque()
_idle = 0  # threads waiting in _serve for a task (a woken one counts until it takes one)
_threads = 0  # threads alive


def resolve(fn: Callable[[], None]) -> None:
    """Run ``fn`` (which resolves a torch Future, running its callbacks) on a resolver thread,
    starting one when none is free: ``fn`` never waits behind a callback that blocks."""
    global _threads
    with _cond:
        _tasks.append(fn)
        if _idle >= len(_tasks):  # a waiting thread for every pending task, this one included
            _cond.notify()
            return
        _threads += 1
        number = _threads
    threading.Thread(target=_serve, name=f"ringlet-torch-done-{number}", daemon=True).start()


def threads() -> int:
    """How many resolver threads are alive now."""
    return _threads


def _serve() -> None:
    global _idle, _threads
    while True:
        with _cond:
            while not _tasks:
                _idle += 1
                woken = _cond.wait(IDLE_SECONDS)
                _idle -= 1
                if not woken and not _tasks and _threads > KEEP:
                    _threads -= 1
                    return
            fn = _tasks.popleft()
        try:
            fn()
        except BaseException:  # a Future's own callbacks report through the Future
            _log.exception("ringlet.torch: resolving a Future failed")


def _after_fork() -> None:
    """A forked child has none of its parent's threads: start counting afresh."""
    global _cond, _idle, _threads
    _cond = threading.Condition()
    _tasks.clear()
    _idle = _threads = 0


os.register_at_fork(after_in_child=_after_fork)

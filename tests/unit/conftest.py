"""tests/unit starts no processes: a test here that forks, spawns or runs a command fails, naming
what it started. Tests that need real processes belong in tests/ranks (see tests/spmd.py)."""

from __future__ import annotations

import _posixsubprocess
import multiprocessing.process
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _refuse(what: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(
            f"a unit test started a process ({what}); tests/unit starts none: make it a real "
            "unit test or move it to tests/ranks"
        )

    return refused


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse os.fork, posix_spawn, subprocess and multiprocessing for the test's duration."""
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"os.{name}"))
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refuse("subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("multiprocessing"))
    yield

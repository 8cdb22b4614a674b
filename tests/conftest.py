"""Shared pytest setup: make tests/spmd.py importable, and let timing-sensitive tests run alone.

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml): most tests wait on the
ranks they spawned, so two at a time nearly halve the wall time. A test marked ``alone`` asserts
how fast something happens (a failure noticed within 1.5 s, a later call failing within 50 ms):
it has the machine to itself, so no test of the other worker shares the CPU with it. Every other
test holds a shared lock, an ``alone`` test an exclusive one; the ``alone`` tests form one xdist
group that runs back to back on one worker, which keeps the exclusive lock from one to the next.
Locks are taken outside pytest-timeout's timer, so waiting for the other worker never counts
against a test's timeout; a turnstile in front keeps an ``alone`` test from waiting forever
behind the other worker's stream of shared holders. Without xdist (``-n 0``) no lock is taken.
"""

from __future__ import annotations

import fcntl
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


#: The controller's folder for this run's lock files, handed to every worker in its workerinput.
_LOCK_DIR = "ringlet_lock_dir"
_DIR_KEY = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """The xdist controller makes one folder for the run's lock files and tells every worker."""
    stash = node.config.stash
    if _DIR_KEY not in stash:
        stash[_DIR_KEY] = tempfile.mkdtemp(prefix="ringlet-pytest-")
    node.workerinput[_LOCK_DIR] = stash[_DIR_KEY]


class _Machine:
    """This worker's hold on the machine: none, shared or exclusive (kept across consecutive
    ``alone`` tests, which xdist runs one after another on one worker as the group "alone")."""

    def __init__(self) -> None:
        self.files: tuple[IO[str], IO[str]] | None = None
        self.alone = False

    def take(self, folder: Path, alone: bool) -> None:
        """Hold the machine shared, or exclusively for an ``alone`` test."""
        if self.files is not None and self.alone == alone:
            return
        self.release()
        turn, machine = open(folder / "turn", "a"), open(folder / "machine", "a")  # noqa: SIM115
        fcntl.flock(turn, fcntl.LOCK_EX)  # an alone test waiting here holds back new shared ones
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
        self.files, self.alone = (turn, machine), alone

    def release(self) -> None:
        """Let go of the machine (closing the files drops their locks)."""
        if self.files is not None:
            for f in self.files:
                f.close()
            self.files = None


_MACHINE = _Machine()


def _is_alone(item: pytest.Item | None) -> bool:
    """Marked ``alone``, or a drill (which times how fast the job recovers, too)."""
    return item is not None and any(item.get_closest_marker(m) for m in ("alone", "drill"))


#: Modules whose module-scoped fixture is costly (simulated hosts, a Ray cluster, a site build,
#: one job shared by many tests): each runs on one worker, so the fixture is made once.
ONE_WORKER = ("test_multihost.py", "test_engines_mpi_hosts.py", "test_engines_openmpi.py",
              "test_ray.py", "test_docs.py", "test_bench_cli.py", "test_examples.py")  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put every ``alone`` test in one xdist group, so they run back to back on one worker, and
    each ONE_WORKER module in a group of its own (before xdist reads the groups)."""
    for item in items:
        if _is_alone(item):
            item.add_marker(pytest.mark.xdist_group("alone"))
        elif item.path.name in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Run setup, call and teardown of each test under its share of the machine; outside
    pytest-timeout's timer, so waiting for the other worker is not the test's time."""
    folder = getattr(item.config, "workerinput", {}).get(_LOCK_DIR)
    if folder is not None:
        _MACHINE.take(Path(folder), _is_alone(item))
    try:
        yield
    finally:
        if not (_is_alone(item) and _is_alone(nextitem)):
            _MACHINE.release()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller removes the run's lock folder once every worker is done."""
    folder = config.stash.get(_DIR_KEY, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)

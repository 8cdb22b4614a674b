"""Every script in examples/ runs under `ringlet run` and exits 0 on every rank.

The split and survive examples run on 4 ranks as scripts of their own. The others run one after another inside
one `ringlet run -n 3`: each rank runs each script as ``__main__`` (runpy) and reports how it
ended, so a failure still names the example and shows its traceback on every rank. Starting a
launcher and three interpreters per example was most of this test's time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
NEEDS_TORCH = ("clip", "ddp")
RANKS = 3
TIMEOUT = 240

#: Each rank runs its arguments in order as scripts; the first failure ends it (and the job).
#: Between two scripts the ranks meet through files in argv[1], so none starts the next job's
#: rendezvous while another still holds the last one's.
RUNNER = """\
import os, pathlib, runpy, sys, time, traceback
sync = pathlib.Path(sys.argv[1])
rank, size = os.environ["RINGLET_RANK"], int(os.environ["RINGLET_WORLD_SIZE"])
for i, path in enumerate(sys.argv[2:]):
    print("@@start", path, flush=True)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print("@@failed", path, "exit", exc.code, flush=True)
            raise
    except BaseException:
        print(traceback.format_exc(), flush=True)
        print("@@failed", path, flush=True)
        raise
    print("@@ok", path, flush=True)
    (sync / f"{i}.{rank}").touch()
    deadline = time.monotonic() + 60
    while len(list(sync.glob(f"{i}.*"))) < size:
        assert time.monotonic() < deadline, f"the other ranks never finished {path}"
        time.sleep(0.01)
"""


def _launch(n: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """`ringlet run -n n argv…` with a short collective timeout, so a failure cannot hang it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    env["RINGLET_TIMEOUT"] = "60"
    cmd = [sys.executable, "-m", "ringlet", "run", "-n", str(n), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


#: Run alone on 4 ranks, as their docstrings do: the split example needs a 4th rank, and the
#: survive example manages processes of its own (under ringlet run nobody is killed).
ALONE = ("split", "survive")


def _shared(script: Path) -> bool:
    return not any(k in script.name for k in ALONE)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """One `ringlet run -n 3` of the runner over every example that needs no 4th rank."""
    here = tmp_path_factory.mktemp("examples")
    runner, sync = here / "run_examples.py", here / "sync"
    runner.write_text(RUNNER)
    sync.mkdir()
    has_torch = importlib.util.find_spec("torch") is not None
    scripts = [
        str(s)
        for s in EXAMPLES
        if _shared(s) and (has_torch or not any(k in s.name for k in NEEDS_TORCH))
    ]
    return _launch(RANKS, str(runner), str(sync), *scripts)


def _section(stdout: str, rank: int, script: Path) -> list[str]:
    """What rank ``rank`` printed while it ran ``script`` (its prefix removed)."""
    lines, inside = [], False
    for line in stdout.splitlines():
        if not line.startswith(f"[r{rank}] "):
            continue
        text = line[len(f"[r{rank}] ") :]
        if text == f"@@start {script}":
            inside = True
        elif inside:
            lines.append(text)
            if text.startswith(("@@ok", "@@failed")):
                break
    return lines


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, request: pytest.FixtureRequest) -> None:
    if any(k in script.name for k in NEEDS_TORCH):
        pytest.importorskip("torch")
    if not _shared(script):
        alone = _launch(4, str(script))
        assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
        assert "[r" in alone.stdout  # ranks printed, with their prefix
        return
    proc: subprocess.CompletedProcess[str] = request.getfixturevalue("shared_run")
    sections = [_section(proc.stdout, rank, script) for rank in range(RANKS)]
    for rank, section in enumerate(sections):
        assert section and section[-1] == f"@@ok {script}", (
            f"{script.name} on rank {rank} of {RANKS}: "
            + ("\n".join(section) if section else "never started (an earlier example failed)")
            + f"\n--- launcher exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
        )
    assert any(len(section) > 1 for section in sections), f"{script.name} printed nothing"

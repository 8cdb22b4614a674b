"""`ringlet run` names the rank that caused the end, whichever way it did (issue 11, point 6).

test_launch.py covers a rank leaving early and rank 0 stopped. Here the rest of "first to fail,
exit, stop or stall" on a real 3- or 4-rank job: a rank busy in its own code that never makes
the call (running, not stopped: the others' timeouts name it), a stopped rank other than 0, and a
rank failing by itself, over shared memory and over TCP. Exactly one rank is marked, the culprit.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_launch import clean_env, run

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    import ringlet
    comm = ringlet.init()
    comm.barrier()
    if comm.rank == int(sys.argv[1]):
        how = sys.argv[2]
        if how == "busy":
            time.sleep(60)  # its own work, never the call the others wait in
        elif how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise RuntimeError("this rank's own bug")
    comm.all_reduce(np.ones(4))
""")
WORDS = {
    "busy": "terminated by launcher (SIGTERM)  <- caused the end: it never made the call",
    "stop": "stopped (not running)",
    "raise": "<- failed first",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("n", "culprit", "how", "transport"),
    [(3, 1, "busy", "shm"), (4, 2, "busy", "tcp"), (3, 2, "stop", "tcp"), (4, 3, "raise", "shm")],
)
def test_the_launcher_names_the_culprit_however_it_ended_the_job(
    n: int, culprit: int, how: str, transport: str, tmp_path: Path
) -> None:
    script = tmp_path / "culprit.py"
    script.write_text(SCRIPT)
    result = run("-n", str(n), "--timeout", "3", "--grace", "1", str(script), str(culprit), how,
                 env=clean_env(RINGLET_TRANSPORT=transport), timeout=50)  # fmt: skip
    assert result.returncode != 0
    summary = result.stderr.split("ringlet run: job summary", 1)[1]
    marked = [line for line in summary.splitlines() if "<-" in line]
    assert len(marked) == 1 and marked[0].startswith(f"  rank {culprit}:"), result.stderr[-3000:]
    assert WORDS[how] in marked[0], marked[0]
    if how == "busy":  # its victims' own words name it too
        assert f"rank {culprit} has not arrived" in result.stderr

"""Issue 11's listener drill as it was reported: 1100 connections under a 1024-file limit.

test_security.py floods a job's store and a rank's listener with 1100 connections from another
user, but with this machine's file limit (often far above 1024) a rank never runs out of file
descriptors. Here both ranks run with RLIMIT_NOFILE = 1024, as on the machine of the report, where
the flood once ended a rank's accept loop for good: the job must still connect and finish.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_security import (
    ATTACKER_UID,
    RANK,
    _finish,
    _free_port,
    _torchrun_env,
    _wait_for,
    needs_other_user,
)

FILES = 1024


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


@needs_other_user
@pytest.mark.timeout(180)
def test_1100_connections_under_a_1024_file_limit_do_not_stop_a_job(tmp_path: Path) -> None:
    port = _free_port()
    env = {"WAIT_FOR_GO": "1", "RINGLET_TIMEOUT": "60"}
    procs = []
    for r in range(2):
        log = (tmp_path / f"r{r}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RANK, str(tmp_path)], env=_torchrun_env(r, 2, port, **env),
            text=True, stdout=subprocess.PIPE, stderr=log, preexec_fn=_limited,
        ))  # fmt: skip
    for r in range(2):
        _wait_for(tmp_path / f"ready{r}")
    limits = [Path(f"/proc/{p.pid}/limits").read_text() for p in procs]
    assert all(f"Max open files            {FILES}" in text for text in limits), limits[0]
    listener = json.loads((tmp_path / "ready1").read_text())["listener"]
    flood = subprocess.Popen(
        ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
         os.path.realpath(sys.executable), "-c", textwrap.dedent("""
            import resource, socket, sys, time
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
            held = []
            for port in map(int, sys.argv[1:]):
                for _ in range(1100):
                    try:
                        held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                    except OSError:
                        pass
            print(len(held), flush=True)
            time.sleep(120)
        """), str(port), str(listener)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert flood.stdout is not None
        opened = int(flood.stdout.readline())
        assert opened >= 1100, f"the attacker opened only {opened} connections"
        fds = [len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs]
        assert max(fds) < FILES, f"a rank holds {fds} files: the flood is not bounded"
        started = time.monotonic()
        (tmp_path / "go").touch()
        results = [_finish(p, tmp_path, f"r{r}") for r, p in enumerate(procs)]
        took = time.monotonic() - started
    finally:
        flood.kill()
        flood.wait()
        for p in procs:
            p.kill()
    assert took < 20, f"the flood slowed the collective to {took:.1f} s"
    assert all(res["sum"] == [1.0, 3.0, 5.0, 7.0] for res in results)
    assert results[0]["objs"] == [{"rank": 0}, {"rank": 1}]
    print(f"{opened} held connections, ranks' open files {fds}, the job took {took:.2f} s")

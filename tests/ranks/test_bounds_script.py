"""benchmarks/bounds.py end to end at 2 ranks: its JSON lines have every field, with sane counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 120
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bounds.py"
FIELDS = {"op", "bytes", "ranks", "rank", "role", "way", "time_us", "python_us", "profiled_us",
          "wait_share", "copy_share", "py_calls", "py_calls_waiting", "top", "futex_waits",
          "futex_wakes", "yields", "page_faults", "sleeps", "preempted", "copies_per_byte",
          "per_byte"}  # fmt: skip
KINDS = {"copy", "fold", "cma", "slot", "sched", "bytes"}


def _records() -> list[dict[str, Any]]:
    """Run the script on three ops at two small sizes; its JSON lines (exit 0 required)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    cmd = [sys.executable, "-m", "ringlet", "run", "-n", "2", "--no-prefix", sys.executable,
           str(SCRIPT), "--ops", "all_reduce,gather,all_to_all", "--sizes", "8,64K", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(TIMEOUT + 10)
def test_bounds_script_prints_counts_per_op_and_the_copy_ceiling() -> None:
    records = _records()
    rows = [r for r in records if r["kind"] == "bounds"]
    # rank 0 for every op and size, and gather's non-root (rank 1) as well
    assert {(r["op"], r["bytes"], r["rank"]) for r in rows} == {
        (op, n, rank)
        for op, n in [(o, s) for o in ("all_reduce", "gather", "all_to_all") for s in (8, 65536)]
        for rank in ((0, 1) if op == "gather" else (0,))
    }
    for r in rows:
        assert set(r) >= FIELDS and set(r["per_byte"]) == KINDS, r
        assert r["ranks"] == 2 and r["py_calls"] > 0 and len(r["top"]) == 3
        assert r["time_us"] > 0 and r["profiled_us"] > 0 and 0 <= r["wait_share"] <= 1
        assert 0 <= r["copy_share"] <= 1 and 0 <= r["python_us"] <= r["time_us"]
        assert 0 <= r["py_calls_waiting"] <= r["py_calls"]
        assert r["copies_per_byte"] >= 0 and all(v >= 0 for v in r["per_byte"].values())
        assert min(r[k] for k in ("futex_waits", "futex_wakes", "yields", "page_faults")) >= 0
        assert r["sleeps"] >= 0 and r["preempted"] >= 0
    # counted, so some bytes always move: a gather's root copies at least its whole output once
    big = {(r["op"], r["rank"]): r for r in rows if r["bytes"] == 65536}
    assert big[("gather", 0)]["copies_per_byte"] >= 1
    assert big[("all_reduce", 0)]["per_byte"]["fold"] > 0
    assert big[("all_to_all", 0)]["copies_per_byte"] > 0
    (ceiling,) = [r for r in records if r["kind"] == "ceiling"]
    assert ceiling["memcpy_256k_gbs"] > 0 and ceiling["memcpy_64m_gbs"] > 0

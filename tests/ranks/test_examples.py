"""Every script in examples/ runs under `ringlet run` on 3 ranks (4 for the split example) and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
NEEDS_TORCH = ("clip", "ddp")


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    if any(k in script.name for k in NEEDS_TORCH):
        pytest.importorskip("torch")
    n = "4" if "split" in script.name else "3"
    proc = subprocess.run([sys.executable, "-m", "ringlet", "run", "-n", n, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[r" in proc.stdout  # ranks printed, with their prefix

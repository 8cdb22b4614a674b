"""`ringlet bench --plot` from a real 2-rank run: the PNG's size, and through matplotlib the figure
it was drawn from — log-log axes, every measured size labelled in B/KiB/MiB, a latency panel, one
line per library, a title naming op, dtype, transport, ranks and machine — and one file per op."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 180
SIZES = ["8 B", "1 KiB", "64 KiB", "1 MiB"]
ARGS = ["--ops", "all_reduce,broadcast", "--sizes", "8,1K,64K,1M", "--iters", "2", "--warmup",
        "0", "--json", "--no-progress"]  # fmt: skip


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    cmd = [sys.executable, "-m", "ringlet", "bench", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.timeout(TIMEOUT)
def test_plot_of_a_real_run_is_log_log_with_every_size_and_a_latency_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ringlet.bench_backends import machine
    from ringlet.bench_report import figure, plot

    png = tmp_path / "grid.png"
    done = _bench("-n", "2", *ARGS, "--plot", str(png))
    records: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines()]
    assert f"# plot saved to {png}" in done.stderr
    assert _png_size(png) == (12 * 110, round(4.4 * 2 * 110))  # two ops: two rows of panels

    fig = figure(records)
    try:
        rows = fig.subfigs
        assert len(rows) == 2
        for row, op in zip(rows, ["all_reduce", "broadcast"], strict=True):
            title = row._suptitle.get_text()
            for part in (op, "float32", "ringlet over shm", "2 ranks", machine()):
                assert part in title, (part, title)
            bw, latency = row.axes
            assert "busbw" in bw.get_ylabel() and "time" in latency.get_ylabel()
            for axes in (bw, latency):
                assert (axes.get_xscale(), axes.get_yscale()) == ("log", "log")
                assert [t.get_text() for t in axes.get_xticklabels()] == SIZES
                [line] = axes.get_lines()  # one library ran: one line, with markers
                assert line.get_label() == "ringlet" and line.get_marker() == "o"
                assert list(line.get_xdata()) == [8, 1024, 65536, 1 << 20]
                assert all(y > 0 for y in line.get_ydata())
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)

    # one PNG per op, as `--plot 'busbw-{op}.png'` asks (the same function the command calls)
    written = plot(records, str(tmp_path / "busbw-{op}.png"))
    assert written == [str(tmp_path / f"busbw-{op}.png") for op in ("all_reduce", "broadcast")]
    for out in written:
        assert _png_size(Path(out)) == (12 * 110, round(4.4 * 110))

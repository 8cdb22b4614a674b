"""The "Check it yourself" script of docs/dtypes.md, run on 3 real ranks: every value its
comments promise (int8 mean 14, uint8 mean 1, floor division, wrapping, inf, the band TypeError) is
what ringlet prints today, so the page and the code cannot drift apart."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

import spmd

DOC = Path(__file__).resolve().parents[2] / "docs" / "dtypes.md"
PROMISE = re.compile(r'^\s*"(?P<label>[^"]+)":.*#\s*(?P<value>\[.*\])\s*$')


def _script() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## Check it yourself")
    return text[start:].split("```python\n", 1)[1].split("```", 1)[0]


def _run_script(comm: Any, source: str) -> str:
    """The page's script on this rank, with `ringlet.init()` handing it this rank's communicator."""
    import ringlet

    init = ringlet.init
    ringlet.init = lambda *args, **kwargs: comm  # type: ignore[assignment]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, str(DOC), "exec"), {"__name__": "__main__"})
    finally:
        ringlet.init = init  # type: ignore[assignment]
    return out.getvalue()


@pytest.mark.timeout(120)
def test_the_dtype_page_prints_what_it_promises() -> None:
    source = _script()
    promised = {m["label"]: m["value"] for m in map(PROMISE.match, source.splitlines()) if m}
    assert {"int8 mean of 100,100,100", "uint8 mean of 200,50,10", "int64 mean of -4,0,0"} <= set(
        promised
    ), promised
    printed, *others = spmd.run(_run_script, 3, source)
    assert others == ["", ""]  # only rank 0 prints
    lines = dict(line.split(": ", 1) for line in printed.splitlines())
    for label, value in promised.items():
        assert lines.get(label) == value, (label, lines.get(label), value)
    assert lines["band on float32"].startswith("all_reduce: bitwise op band needs an integer")

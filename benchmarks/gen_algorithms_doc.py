"""Write docs/algorithms.md from the schedules' cost model.

Run `python benchmarks/gen_algorithms_doc.py`; with --check, exit 1 instead of writing if the
file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ringlet.schedules.cost import render_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "algorithms.md"


def main(argv: list[str]) -> int:
    text = render_markdown()
    if "--check" in argv:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date; run python benchmarks/gen_algorithms_doc.py")
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""MkDocs hooks: the Performance page is benchmarks/README.md, included at build time.

benchmarks/README.md stays the one source of every number. Its relative links point at scripts
next to it, which are not part of the site: they become code spans naming the file in the repo.
Images it shows (benchmarks/*.png) are copied into the site beside the page.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PAGE = "performance.md"
INTRO = """\
<!-- generated at build time from benchmarks/README.md by docs/hooks.py; edit that file -->
!!! note
    This page is `benchmarks/README.md` from the repository, as it stands. Every number in it
    comes from a script in `benchmarks/`; scripts are named by their path in the repository.

"""
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _rewrite(match: re.Match[str]) -> str:
    image, text, target = match.groups()
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
        return match.group(0)
    if image and target.endswith(".png") and "/" not in target:
        return f"![{text}](benchmarks/{target})"
    path = (Path("benchmarks") / target).as_posix()
    path = re.sub(r"benchmarks/\.\./", "", path)
    return f"{text} (`{path}`)" if text.strip("`") != target else f"`{path}`"


def performance_markdown() -> str:
    """benchmarks/README.md with its headings one level down and its links made site-safe."""
    text = (BENCH / "README.md").read_text(encoding="utf-8")
    text = _LINK.sub(_rewrite, text)
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = "# Performance"
    return INTRO + "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:  # type: ignore[no-untyped-def]
    files.append(File.generated(config, PAGE, content=performance_markdown()))
    for png in sorted(BENCH.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    return files

"""The documentation site builds with warnings as errors, every internal link and anchor resolves,
and every public name has an API reference entry. Needs the docs extra (pip install -e ".[docs]")."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import ringlet

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.docs


class _Page(HTMLParser):
    """The ids a page defines and the links (href / src) it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            elif name in ("href", "src") and value and tag != "link":
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip(
        "mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'"
    )
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _target(site: Path, page: Path, link: str) -> tuple[Path, str] | None:
    """The file and fragment an internal link points at; None for external links."""
    parts = urlsplit(link)
    if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
        return None
    if not parts.path:
        return page, unquote(parts.fragment)
    path = unquote(parts.path)  # 404.html links from the site root
    target = (site / path.lstrip("/") if path.startswith("/") else page.parent / path).resolve()
    if target.is_dir() or parts.path.endswith("/"):
        target = target / "index.html"
    return target, unquote(parts.fragment)


def test_internal_links_and_anchors_resolve(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 10, [p.relative_to(site).as_posix() for p in pages]
    parsed = {p.resolve(): _parse(p) for p in pages}
    broken = []
    for page, html in parsed.items():
        for link in html.links:
            found = _target(site, page, link)
            if found is None:
                continue
            target, fragment = found
            where = f"{page.relative_to(site.resolve())}: {link}"
            if not target.exists():
                broken.append(f"{where} (no file {target})")
            elif fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if fragment not in ids:
                    broken.append(f"{where} (no id {fragment!r})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_public_name_has_a_reference_entry(site: Path) -> None:
    ids = _parse(site / "reference" / "ringlet" / "index.html").ids
    missing = [n for n in ringlet.__all__ if n != "__version__" and f"ringlet.{n}" not in ids]
    assert not missing, f"no API reference entry for {missing}"
    torch_page = (site / "reference" / "torch" / "index.html").read_text(encoding="utf-8")
    torch_ids = _parse(site / "reference" / "torch" / "index.html").ids
    names = ["DistributedDataParallel", "RingletProcessGroup", "all_gather_with_grad",
             "allreduce_hook", "bf16_compress_hook", "communicator", "fp16_compress_hook"]  # fmt: skip
    missing = [n for n in names if f"ringlet.torch.{n}" not in torch_ids]
    assert not missing and "BACKEND" in torch_page, (
        f"no ringlet.torch reference entry for {missing}"
    )


def test_search_index_covers_every_page(site: Path) -> None:
    index = (site / "search" / "search_index.json").read_text(encoding="utf-8")
    for word in ("all_gather_with_grad", "RINGLET_DETERMINISTIC", "floor division", "busbw"):
        assert word in index, f"{word!r} is not in the search index"

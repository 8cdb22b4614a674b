"""The documentation site builds with warnings as errors, every internal link and anchor resolves,
every public name has an API reference entry, and the built site works in a real headless chromium
(pages load without errors, the search finds things, no link is broken). Needs the docs extra
(pip install -e ".[docs]") and, for the browser tests, Debian's chromium (apt-get install chromium);
RINGLET_REQUIRE_BROWSER=1 (as CI sets) turns a missing chromium into a failure instead of a skip."""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urlsplit

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


def _inventory(site: Path) -> set[str]:
    """The names in the site's objects.inv (the Sphinx inventory mkdocstrings writes)."""
    data = (site / "objects.inv").read_bytes()
    header, _, body = data.partition(b"zlib.\n")
    assert b"inventory version 2" in header, header
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def _own_members(cls: type) -> list[str]:
    """Public members ringlet defines on a class, other than overrides of another library's API
    (torch.nn.Module, torch's ProcessGroup, Exception): those are documented by that library."""
    foreign = [k for k in cls.__mro__[1:] if not k.__module__.startswith("ringlet")]
    return [name for name in vars(cls) if not name.startswith("_")
            and not any(hasattr(k, name) for k in foreign)]  # fmt: skip


def test_every_public_name_has_a_reference_entry(site: Path) -> None:
    """Every name in ringlet.__all__ and ringlet.torch.__all__, and every public member ringlet
    defines on those classes, is an object of the API reference, on its page."""
    modules: list[Any] = [ringlet]
    if _importable("torch"):
        modules.append(importlib.import_module("ringlet.torch"))
    inventory = _inventory(site)
    missing = []
    for module in modules:
        for name in module.__all__:
            full = f"{module.__name__}.{name}"
            missing += [] if full in inventory else [full]
            obj = getattr(module, name)
            if inspect.isclass(obj):
                missing += [
                    f"{full}.{m}" for m in _own_members(obj) if f"{full}.{m}" not in inventory
                ]
    assert not missing, f"no API reference entry for {missing}"
    pages = {
        "ringlet": "reference/ringlet/index.html",
        "ringlet.torch": "reference/torch/index.html",
    }
    for module in modules:
        ids = _parse(site / pages[module.__name__]).ids
        absent = [n for n in module.__all__ if f"{module.__name__}.{n}" not in ids]
        assert not absent, f"{pages[module.__name__]} has no entry for {absent}"


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_readme_links_the_site() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mkdocs serve" in readme and "docs/" in readme


def test_search_index_covers_every_page(site: Path) -> None:
    index = (site / "search" / "search_index.json").read_text(encoding="utf-8")
    for word in ("all_gather_with_grad", "RINGLET_DETERMINISTIC", "floor division", "busbw"):
        assert word in index, f"{word!r} is not in the search index"


# -- the built site in a real browser --------------------------------------------------------------
BROWSER_TIMEOUT = 30.0
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--remote-debugging-pipe"]  # fmt: skip


class Chromium:
    """Headless chromium driven through the DevTools protocol over a pipe (fds 3 and 4, messages
    ended by NUL): no websocket library, no driver binary, one page (target) at a time."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_browser, from_us = os.pipe()
        to_us, from_browser = os.pipe()

        def fds() -> None:  # in the child: the protocol's ends on 3 and 4, inheritable
            a, b = os.dup(to_browser), os.dup(from_browser)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.out, self.inp = from_us, to_us
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=self.session)

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.inp, 1 << 16)
            if not chunk:
                raise EOFError(f"chromium exited (code {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command; keep the events that arrive meanwhile; return its result."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply["result"])
            self.events.append(reply)

    def evaluate(self, expression: str) -> Any:
        """The value of a JS expression in the page (promises awaited); page exceptions raise."""
        reply = self.call("Runtime.evaluate", session=self.session, expression=expression,
                          awaitPromise=True, returnByValue=True)  # fmt: skip
        assert "exceptionDetails" not in reply, f"{expression}: {reply['exceptionDetails']}"
        return reply["result"].get("value")

    def open(self, url: str) -> list[dict[str, Any]]:
        """Load `url` and wait for its load event; the events of that load."""
        self.events = []
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(deadline))
        return self.events

    def close(self) -> None:
        with_timeout = self.proc.poll() is None
        if with_timeout:
            try:
                self.call("Browser.close")
            except (EOFError, TimeoutError, OSError, AssertionError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on localhost (the search's worker cannot fetch from file://)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    exe = _chromium()
    if exe is None:
        reason = "no chromium on PATH (apt-get install chromium): the browser checks need it"
        if os.environ.get("RINGLET_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; RINGLET_REQUIRE_BROWSER=1 requires them")
        pytest.skip(reason)
    chromium = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def _problems(events: list[dict[str, Any]]) -> list[str]:
    """Failed or non-2xx requests, JS exceptions and console errors among a page's events."""
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in events if e.get("method") == "Network.requestWillBeSent"}  # fmt: skip
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.loadingFailed":
            found.append(f"{urls.get(params['requestId'])}: {params.get('errorText')}")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            found.append(f"{params['response']['url']}: HTTP {params['response']['status']}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"JS exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            found.append(f"console.error: {[a.get('value') for a in params.get('args', [])]}")
    return found


PAGE_FACTS = """({
  title: document.title,
  h1: (document.querySelector("article h1") || {}).textContent || "",
  ids: [...document.querySelectorAll("[id]")].map(e => e.id),
  links: [...document.querySelectorAll("a[href], img[src]")].map(e => e.href || e.src),
  images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
})"""


def test_every_page_loads_in_chromium_and_no_link_is_broken(
    site: Path, served: str, browser: Chromium
) -> None:
    """Each page of the site, loaded by chromium from a local server: no failed request, no JS
    error, a heading, every image decoded; then every same-site link and #anchor on every page
    points at a page that loaded and an id its live DOM has."""
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    urls = [served + p.removesuffix("index.html") for p in pages if p != "404.html"]
    facts: dict[str, dict[str, Any]] = {}
    problems = []
    for url in urls:
        events = browser.open(url)
        problems += [f"{url}: {p}" for p in _problems(events)]
        facts[url] = page = browser.evaluate(PAGE_FACTS)
        if not page["h1"].strip() or "ringlet" not in page["title"]:
            problems.append(f"{url}: title {page['title']!r}, heading {page['h1']!r}")
        problems += [f"{url}: image {src} did not load" for src in page["images"]]
    assert not problems, "\n".join(problems)
    assert len(facts) >= 10, list(facts)
    other = set()
    broken = []
    for url, page in facts.items():
        for link in page["links"]:
            target, fragment = urldefrag(link)
            if not target.startswith(served):
                continue
            if target in facts:
                if fragment and unquote(fragment) not in facts[target]["ids"]:
                    broken.append(f"{url}: {link} (no id {fragment!r} on that page)")
            elif target.endswith("/") or target.endswith(".html"):
                broken.append(f"{url}: {link} (not a page of the site)")
            else:
                other.add(target)
    for target in sorted(other):  # images, objects.inv, …: fetched by the browser itself
        status = browser.evaluate(f"fetch({json.dumps(target)}).then(r => r.status)")
        if status != 200:
            broken.append(f"{target}: HTTP {status}")
    assert not broken, "broken links:\n" + "\n".join(broken)


SEARCH = """new Promise((resolve, reject) => {
  const started = Date.now();
  const poll = () => {
    const items = [...document.querySelectorAll(".md-search-result__item")];
    if (items.length) {
      resolve({
        meta: document.querySelector(".md-search-result__meta").textContent,
        hrefs: items.map(i => (i.querySelector("a") || {}).href),
      });
    } else if (Date.now() - started > 10000) {
      resolve(null);
    } else {
      setTimeout(poll, 50);
    }
  };
  poll();
})"""


@pytest.mark.parametrize(
    ("query", "page"),
    [
        ("all_gather_with_grad", "reference/torch/"),
        ("RINGLET_DETERMINISTIC", "environment/"),
        ("busbw", "performance/"),
        ("floor division", "dtypes/"),
    ],
)
def test_search_finds_pages_in_chromium(
    served: str, browser: Chromium, query: str, page: str
) -> None:
    """The site's own search (its JS, its worker, its index), typed into as a user does, lists the
    page that explains the query."""
    events = browser.open(served)
    found = None
    for _ in range(3):  # typed again if the search worker was not ready yet on a busy machine
        browser.evaluate('(e => { e.focus(); e.value = ""; })'
                         '(document.querySelector("input.md-search__input"))')  # fmt: skip
        browser.call("Input.insertText", session=browser.session, text=query)
        if found := browser.evaluate(SEARCH):
            break
    assert found, f"the search for {query!r} listed nothing in 30 s"
    assert not _problems(events + browser.events), _problems(events + browser.events)
    assert "matching document" in found["meta"], found
    assert any(urlsplit(h).path == "/" + page for h in found["hrefs"]), (query, found)

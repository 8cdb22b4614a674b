"""Layers depend one way only: cli/launch/bench/torch → comm → schedules, engine → transport → ops.

The test parses every module's imports (module level and inside functions) and checks them against
what each layer may use, and that importing ringlet does not import torch, matplotlib or rich.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "ringlet"

#: layer of a module → ringlet modules (prefixes) it must never import
FORBIDDEN = {
    "schedules": ("ringlet.transport", "ringlet.engine", "ringlet.path", "ringlet.comm", "ringlet.rendezvous",
                  "ringlet.links", "ringlet.torch", "ringlet.launch", "ringlet.bench"),
    "transport": ("ringlet.schedules", "ringlet.engine", "ringlet.path", "ringlet.comm",
                  "ringlet.links", "ringlet.p2p", "ringlet.objects", "ringlet.world",
                  "ringlet.torch", "ringlet.launch", "ringlet.bench", "ringlet.cli"),
    "rendezvous": ("ringlet.schedules", "ringlet.engine", "ringlet.path", "ringlet.comm",
                   "ringlet.transport", "ringlet.torch", "ringlet.launch", "ringlet.bench"),
    "engine": ("ringlet.path", "ringlet.comm", "ringlet.links", "ringlet.rendezvous",
               "ringlet.transport.tcp", "ringlet.transport.shm", "ringlet.torch", "ringlet.launch"),
    "ops": ("ringlet.",),
    "arrays": ("ringlet.",),
    "errors": ("ringlet.",),
    "path": ("ringlet.comm", "ringlet.torch", "ringlet.launch", "ringlet.bench",
             "ringlet.cli"),
    "links": ("ringlet.comm", "ringlet.path", "ringlet.engine", "ringlet.schedules", "ringlet.torch",
              "ringlet.launch", "ringlet.bench", "ringlet.cli"),
    "comm": ("ringlet.torch", "ringlet.launch", "ringlet.bench", "ringlet.cli"),
}
ALLOWED_FROM_BOTTOM = {"ops": ("ringlet.errors",), "arrays": ("ringlet.errors", "ringlet.ops")}


def _imports(path: Path) -> set[str]:
    """Absolute names of the ringlet modules ``path`` imports."""
    module = "ringlet." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
    return {f for f in found if f.startswith("ringlet")}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_imports_respect_the_layers(path: Path) -> None:
    layer = _layer(path)
    allowed = ALLOWED_FROM_BOTTOM.get(layer, ())
    for name in _imports(path):
        for bad in FORBIDDEN.get(layer, ()):
            if name.startswith(bad) and not name.startswith(allowed or ("\0",)) and name != "ringlet":
                pytest.fail(f"{path.relative_to(PKG)} ({layer}) imports {name}")


def test_no_module_is_too_long() -> None:
    """The budget in STYLE.md: no module over ~400 lines (a little slack for docstrings)."""
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


#: Collective names a transport must never mention: it moves bytes for any schedule.
COLLECTIVES = re.compile(
    r"\b(all_reduce|all_gather|reduce_scatter|all_to_all|broadcast|scatter|gather|barrier|reduce)\b"
)
#: The one-host shm group (ShmGroup and what only it uses): collectives written against the
#: segment, still inside transport/ until they are schedules over the shared-memory transport.
#: This list may only shrink.
SHM_GROUP = {"shm.py", "shm_staged.py", "shm_cma.py", "shm_tuning.py", "shm_plan.py",
             "shm_channel.py", "shm_segment.py", "shm_setup.py", "shm_wait.py"}


@pytest.mark.parametrize("path", sorted((PKG / "transport").glob("*.py")), ids=lambda p: p.name)
def test_transports_do_not_know_which_collective_they_serve(path: Path) -> None:
    if path.name in SHM_GROUP:
        pytest.skip("part of the one-host shm group, which is still a set of collectives")
    named = sorted({m.group(1) for m in COLLECTIVES.finditer(path.read_text())})
    assert not named, f"transport/{path.name} names collectives {named}"

"""What needs a process of its own: a fresh interpreter (what importing ringlet loads) and a store
client in another process. Moved out of tests/unit, which starts no processes."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import spmd
from ringlet.rendezvous import Store, StoreServer

SECRET = b"store-test-secret"
OPTIONAL = ("torch", "matplotlib", "rich", "mpi4py")


@pytest.mark.timeout(60)
def test_importing_ringlet_and_checking_arrays_loads_no_optional_dependency() -> None:
    """A fresh interpreter: importing ringlet, and is_torch / to_numpy on NumPy arrays and
    buffers, must not be what loads torch (or any other optional dependency)."""
    code = (
        "import sys, ringlet\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
        "import numpy as np\n"
        "from ringlet.arrays import is_torch, to_numpy, from_numpy_like\n"
        "assert not is_torch(np.zeros(2)) and not is_torch(bytearray(2))\n"
        "to_numpy(bytearray(2)); from_numpy_like(np.zeros(1), np.zeros(1))\n"
        "import ringlet.ops\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[]"], done.stdout


def _client(port: int, results: Any) -> None:
    try:
        s = Store("127.0.0.1", port, SECRET, timeout=10.0)
        s.set("from-child", b"hello parent")
        s.add("count", 10)
        results.put(s.get("from-parent"))
    except BaseException as exc:  # the parent reports it
        results.put(repr(exc).encode())


@pytest.mark.timeout(30)
def test_store_client_in_another_process() -> None:
    ctx = spmd.context()
    results = ctx.Queue()
    with StoreServer("127.0.0.1", 0, SECRET) as server:
        child = ctx.Process(target=_client, args=(server.port, results), daemon=True)
        child.start()
        with Store("127.0.0.1", server.port, SECRET, timeout=5.0) as store:
            assert store.get("from-child", timeout=15.0) == b"hello parent"
            store.set("from-parent", b"hello child")
            assert results.get(timeout=15.0) == b"hello child"
            child.join(timeout=15.0)
            assert child.exitcode == 0
            assert store.add("count", 1) == 11

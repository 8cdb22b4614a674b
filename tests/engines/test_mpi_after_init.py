"""MPI (mpi4py) in the same process as ringlet under MPICH's real ``mpiexec``, in both orders.

mpi4py's MPI_Init blocks holding the GIL until every rank has called it. Right after
``ringlet.init()`` on rank 0, which serves ringlet's store, that stopped the store's threads while
other ranks still waited on them to finish their own init(): 2 of 5 launches at 2 ranks and 4 of
5 at 4 ranks hung before init() ended with every other rank's answers sent. Each launch here
runs under a timeout, several times, since the hang depended on timing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_engines import clean_env, mpiexec, results

from ringlet.rendezvous import Store, StoreServer
from ringlet.rendezvous import server as server_module

LAUNCHES = 5

# One rank: MPI_Init at once after ringlet.init() (mpi4py initialises at import), or before it;
# then MPI's allreduce and ringlet's all_reduce, both checked against NumPy.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np

    if sys.argv[1] == "mpi-first":
        from mpi4py import MPI
    import ringlet

    comm = ringlet.init()
    if sys.argv[1] == "ringlet-first":
        from mpi4py import MPI  # MPI_Init: holds the GIL until every rank is in it
    world = MPI.COMM_WORLD
    r, n = comm.rank, comm.size
    assert (world.Get_rank(), world.Get_size()) == (r, n), "MPI's rank and size"
    table = np.arange(n * 300, dtype=np.int64).reshape(n, 300) * 7 - 5  # alike on every rank
    by_mpi = np.empty(300, dtype=np.int64)
    world.Allreduce(table[r], by_mpi, op=MPI.SUM)
    assert (by_mpi == table.sum(axis=0)).all(), "MPI's Allreduce"
    x = table[r].copy()
    comm.all_reduce(x)
    assert (x == table.sum(axis=0)).all(), "ringlet's all_reduce"
    comm.close()
    print("RESULT " + json.dumps({"rank": r, "size": n, "source": "mpi"}), flush=True)
""")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "with_mpi.py"
    path.write_text(SCRIPT)
    return path


def launch(script: Path, n: int, order: str, attempt: int) -> None:
    """One ``mpiexec -n n`` of the script; every rank's RESULT, else every rank's output."""
    argv = [mpiexec(), "-n", str(n), sys.executable, str(script), order]
    try:
        proc = subprocess.run(argv, env=clean_env(RINGLET_TIMEOUT="30"), capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"launch {attempt + 1} of {LAUNCHES} at {n} ranks hung ({order}):\n{out}")
    results(proc, n, "mpi")


@pytest.mark.timeout(LAUNCHES * 60 + 30)
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_init_right_after_ringlet_init(script: Path, n: int) -> None:
    pytest.importorskip("mpi4py")
    for attempt in range(LAUNCHES):
        launch(script, n, "ringlet-first", attempt)


@pytest.mark.timeout(90)
def test_mpi_init_before_ringlet_init_on_one_host(script: Path) -> None:
    """Without -pmi-port on one host ringlet speaks no PMI, so MPI may come first too."""
    pytest.importorskip("mpi4py")
    launch(script, 2, "mpi-first", 0)


# -- the store's side, in one process -----------------------------------------------------------


@pytest.fixture
def held_answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The store's server holds every answer back until the event is set."""
    release = threading.Event()
    send = server_module.send_parts

    def slow_send(*args: object, **kwargs: object) -> None:
        release.wait(10.0)
        send(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module, "send_parts", slow_send)
    yield release
    release.set()


@pytest.mark.timeout(30)
def test_settle_waits_for_the_keys_and_for_their_answers_to_be_sent(
    held_answers: threading.Event,
) -> None:
    secret = b"settle-test-secret"
    with StoreServer("127.0.0.1", 0, secret) as server:
        assert not server.settle(["w/ready/1"], 0.1)  # not set yet
        client = Store("127.0.0.1", server.port, secret, timeout=10.0)
        setter = threading.Thread(target=client.set, args=("w/ready/1", b"1"))
        setter.start()
        while server._data.get("w/ready/1") is None:  # applied, its answer held back
            time.sleep(0.01)
        assert not server.settle(["w/ready/1"], 0.2), "settled before the client had its answer"
        held_answers.set()
        assert server.settle(["w/ready/1"], 5.0)
        setter.join(5.0)
        assert not setter.is_alive()
        client.close()

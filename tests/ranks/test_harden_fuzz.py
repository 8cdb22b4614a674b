"""Fuzzing a running job (hypothesis): its store and a rank's listener, then the job must work.

tests/unit/test_fuzz_wire.py fuzzes each decoder against a server in the test's own process; here
the targets are a real 2-rank job started as torchrun would start it. While both ranks wait,
the test sends random bytes and mutated hellos to rank 0's store and to rank 1's peer listener
(no secret: nothing may be answered but the gate's hello), and, knowing the secret, random,
mutated, truncated and oversized store requests (lengths up to 2**64 - 1). Then the ranks run
collectives, pickled objects included, with the right results, and neither rank's peak RSS grew
by anything near what the headers claimed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringlet import auth
from ringlet.auth import secret_from_str
from ringlet.rendezvous import Store
from ringlet.rendezvous.wire import AUTH_CONTEXT, MAX_KEY_BYTES
from unit.test_fuzz_wire import REQUESTS, _mutate  # the same requests the unit fuzz draws

SECRET = "fuzz-a-live-job"
RUN_ID = "fuzzed"
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

RANK = textwrap.dedent("""
    import json, pathlib, resource, sys, time
    import numpy as np
    import ringlet
    out = pathlib.Path(sys.argv[1])
    comm = ringlet.init()
    comm.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"ready{comm.rank}").write_text(json.dumps(
        {"listener": comm.world.listener.address[1], "job": comm.world.job}))
    while not (out / "go").exists():
        time.sleep(0.02)
    total = comm.all_reduce(np.arange(1000.0) + comm.rank)
    objs = comm.all_gather_object({"rank": comm.rank, "pad": "x" * 1000})
    parts = comm.scatter([np.full(3, r) for r in range(comm.size)])
    comm.barrier()
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    print(json.dumps({"sum_ok": bool((total == 2 * np.arange(1000.0) + 1).all()),
                      "objs": [o["rank"] for o in objs], "part": parts.tolist(),
                      "grew_mib": grew}), flush=True)
    comm.close()
""")


def _send(port: int, data: bytes, *, job: str | None = None) -> bytes:
    """Connect, authenticate when ``job`` is given, send ``data``, end our side; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        if job is not None:
            auth.authenticate(sock, secret_from_str(SECRET), initiator=True, timeout=5.0,
                              context=AUTH_CONTEXT, job=job)  # fmt: skip
        with contextlib.suppress(OSError):  # dropped already: fine
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        sock.settimeout(10.0)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(1 << 16):
                answer += chunk
                assert len(answer) <= 4 * MAX_KEY_BYTES + 4096, "answered more than a request asks"
        return bytes(answer)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_fuzzed_job_keeps_working_and_allocates_nothing_claimed(tmp_path: Path) -> None:
    port = socket.create_server(("127.0.0.1", 0))
    store_port = port.getsockname()[1]
    port.close()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLET_", "MASTER_"))}
    procs = []
    for r in range(2):
        env = base | {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                      "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(store_port), "RINGLET_SECRET": SECRET,
                      "TORCHELASTIC_RUN_ID": RUN_ID, "RINGLET_TIMEOUT": "240"}  # fmt: skip
        log = (tmp_path / f"r{r}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path)], env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=log))  # fmt: skip
    try:
        for r in range(2):
            _wait_for(tmp_path / f"ready{r}")
        listener = json.loads((tmp_path / "ready1").read_text())["listener"]
        job = f"torchrun:{RUN_ID}"  # the store's; rank-to-rank hellos bind the job in the key
        ports = {"store": store_port, "listener": listener}
        hellos = {name: auth.MAGIC + os.urandom(auth.NONCE_BYTES) + auth.job_field(j)
                  + os.urandom(auth.MAC_BYTES) + b"tail" * 20
                  for name, j in (("store", job), ("listener", ""))}  # fmt: skip

        @EXAMPLES
        @given(
            target=st.sampled_from(sorted(ports)),
            garbage=st.none() | st.binary(max_size=300),
            flips=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
            cut=st.none() | st.integers(0, 300),
        )
        def unauthenticated(
            target: str, garbage: bytes | None, flips: list[tuple[int, int]], cut: int | None
        ) -> None:
            data = garbage if garbage is not None else _mutate(hellos[target], flips, cut)
            answer = _send(ports[target], data)
            assert len(answer) <= auth.HELLO_BYTES, answer  # the gate's hello, nothing more

        @EXAMPLES
        @given(batch=st.lists(REQUESTS, min_size=1, max_size=3), cut=st.integers(0, 64))
        def authenticated(batch: list[bytes], cut: int) -> None:
            data = b"".join(batch)
            _send(store_port, data[: len(data) - cut] if cut < len(data) else data, job=job)

        unauthenticated()
        authenticated()
        with Store("127.0.0.1", store_port, secret_from_str(SECRET), timeout=10, job=job) as store:
            store.set("after-the-fuzz", b"served")  # the job's own store still serves a client
            assert store.get("after-the-fuzz") == b"served"
        (tmp_path / "go").touch()
        results = []
        for r, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            err = (tmp_path / f"r{r}.log").read_text()
            assert proc.returncode == 0, f"rank {r} exited {proc.returncode}:\n{err[-3000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for r, res in enumerate(results):
        assert res["sum_ok"] and res["objs"] == [0, 1] and res["part"] == [r] * 3, res
        assert res["grew_mib"] < 16, f"rank {r}'s peak RSS grew {res['grew_mib']:.0f} MiB"
    print(f"peak RSS growth while fuzzed: {[round(r['grew_mib'], 1) for r in results]} MiB")

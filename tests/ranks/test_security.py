"""Issue 11 as an attacker and a careless user would drill it, on real processes and sockets.

The ranks are started without RINGLET_SECRET (as torchrun, srun or mpirun start them), so the
secret is the one ringlet makes itself. The attacker is another local user: the tests run it with
``setpriv`` as an unused uid, so they need root (CI runs as root) and skip otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ringlet.rendezvous.secret import LocalSecret

ATTACKER_UID = 4242  # no such user on the CI image; any uid without an account will do
SITE = Path(__file__).resolve().parents[2]
_LAUNCHER_PREFIXES = ("RINGLET_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_",
                      "PMI", "TORCHELASTIC")  # fmt: skip

needs_other_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="the attacker runs as another local user: needs root and setpriv (util-linux)",
)

# A rank: init() from the environment, optionally wait for the test, then collectives.
RANK = textwrap.dedent("""
    import json, os, pathlib, sys, time
    import numpy as np
    import ringlet
    out = pathlib.Path(sys.argv[1])
    comm = ringlet.init()
    (out / f"ready{comm.rank}.part").write_text(json.dumps(
        {"listener": comm.world.listener.address[1], "job": comm.world.job}))
    os.replace(out / f"ready{comm.rank}.part", out / f"ready{comm.rank}")  # never seen half-written
    while os.environ.get("WAIT_FOR_GO") and not (out / "go").exists():
        time.sleep(0.02)
    total = comm.all_reduce(np.arange(4, dtype=np.float64) + comm.rank)
    objs = comm.all_gather_object({"rank": comm.rank})
    print(json.dumps({"sum": total.tolist(), "objs": objs}), flush=True)
    comm.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    return env | extra


def _torchrun_env(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    """What torchrun gives a rank on one host: no RINGLET_SECRET."""
    return _clean_env(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra)  # fmt: skip


def _start(env: dict[str, str], out: Path, name: str) -> subprocess.Popen[str]:
    log = (out / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, "-c", RANK, str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log)  # fmt: skip


def _finish(proc: subprocess.Popen[str], out: Path, name: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    stdout, _ = proc.communicate(timeout=timeout)
    err = (out / f"{name}.log").read_text()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{err[-3000:]}"
    result: dict = json.loads(stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
    return result


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def _attacker(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as another local user, with ringlet importable (the attacker may read it)."""
    python = os.path.realpath(sys.executable)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/",
           "PYTHONPATH": os.pathsep.join([str(SITE / "src"), *site])}  # fmt: skip
    cmd = ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
           python, "-c", textwrap.dedent(code), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "mpi", "arguments"])
def test_every_one_host_launcher_works_without_a_secret(launcher: str, tmp_path: Path) -> None:
    port = _free_port()
    envs = {
        "torchrun": lambda r: _torchrun_env(r, 2, port),
        "slurm": lambda r: _clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                      SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2",
                                      SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="777",
                                      SLURM_STEP_ID="0", MASTER_PORT=str(port)),
        "mpi": lambda r: _clean_env(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE="2",
                                    OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT=str(port)),
        # by hand: rank and size through the variables of the ringlet source, without a secret
        "arguments": lambda r: _clean_env(RINGLET_RANK=str(r), RINGLET_WORLD_SIZE="2",
                                          RINGLET_MASTER=f"127.0.0.1:{port}"),
    }  # fmt: skip
    procs = [_start(envs[launcher](r), tmp_path, f"r{r}") for r in range(2)]
    results = [_finish(p, tmp_path, f"r{r}") for r, p in enumerate(procs)]
    assert all(res["sum"] == [1.0, 3.0, 5.0, 7.0] for res in results)
    assert results[0]["objs"] == [{"rank": 0}, {"rank": 1}]


@pytest.mark.timeout(60)
def test_across_hosts_without_a_secret_refuses_with_the_fix(tmp_path: Path) -> None:
    # torchrun on two nodes: this node has 1 of 2 ranks and nobody gave a secret
    env = _torchrun_env(1, 2, _free_port()) | {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    proc = _start(env, tmp_path, "r1")
    proc.communicate(timeout=30)
    err = (tmp_path / "r1.log").read_text()
    assert proc.returncode != 0
    assert "SecretError" in err and "spans hosts" in err
    assert "RINGLET_SECRET=" in err and "RINGLET_SECRET_FILE" in err and "ringlet run" in err


@needs_other_user
@pytest.mark.timeout(120)
def test_another_user_cannot_read_the_secret_nor_get_in(tmp_path: Path) -> None:
    """While rank 0 waits for rank 1 the attacker tries the secret file and the store; then, with
    both ranks up, rank 1's listener; then the job runs pickling collectives unharmed."""
    port = _free_port()
    marker = Path(f"/tmp/ringlet-pwned-{port}")
    r0 = _start(_torchrun_env(0, 2, port, WAIT_FOR_GO="1"), tmp_path, "r0")
    path = LocalSecret(f"\x00127.0.0.1:{port}").path  # the job id is empty under plain torchrun
    _wait_for(path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    payload = f"import os; os.system('touch {marker}')"
    attack = _attacker(
        """
        import hashlib, os, pickle, socket, sys
        from ringlet.errors import AuthenticationError
        from ringlet.rendezvous.store import Store
        path, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        try:
            open(path).read()
            print("READ THE SECRET")
        except PermissionError:
            print("file: denied")
        class Evil:
            def __reduce__(self):
                return (exec, (payload,))
        # the key ringlet used to derive from public facts, and a few guesses
        guesses = [hashlib.sha256(f"ringlet-derived/{port}".encode()).hexdigest().encode(),
                   str(port).encode(), b""]
        for key in guesses:
            try:
                Store("127.0.0.1", port, key or b"x", timeout=3).set("w/peer/1", b"forged")
                print("STORE ACCEPTED US")
            except AuthenticationError:
                print("store: refused")
        # raw pickles at the store, without any handshake
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.sendall(pickle.dumps(Evil()) * 10)
                try:
                    s.recv(1 << 16)
                except OSError:
                    pass
        print("done")
        """,
        str(path), str(port), payload,
    )  # fmt: skip
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.split() == ["file:", "denied", *["store:", "refused"] * 3, "done"]
    r1 = _start(_torchrun_env(1, 2, port, WAIT_FOR_GO="1"), tmp_path, "r1")
    for r in range(2):
        _wait_for(tmp_path / f"ready{r}")
    listener = json.loads((tmp_path / "ready1").read_text())["listener"]
    attack = _attacker(
        """
        import hashlib, pickle, socket, sys, time
        from ringlet.auth import MAGIC, job_field
        from ringlet.errors import AuthenticationError
        from ringlet.transport.tcp_connect import connect
        port, store_port, payload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        class Evil:
            def __reduce__(self):
                return (exec, (payload,))
        guesses = [hashlib.sha256(f"ringlet-derived/{store_port}".encode()).hexdigest().encode(),
                   str(store_port).encode()]
        for key in guesses:  # log in as rank 0 of the world communicator
            try:
                connect(("127.0.0.1", port), key, 0, 0, time.monotonic() + 3)
                print("LISTENER ACCEPTED US")
            except AuthenticationError:
                print("listener: refused")
        # pose as rank 0 without the secret: a well-formed hello, a forged proof, then pickles
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(MAGIC + b"n" * 32 + job_field("") + b"p" * 32 + pickle.dumps(Evil()) * 5)
            try:
                while s.recv(1 << 16):
                    pass
            except OSError:
                pass
        print("done")
        """,
        str(listener), str(port), payload,
    )  # fmt: skip
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.split() == [*["listener:", "refused"] * 2, "done"]
    (tmp_path / "go").touch()
    results = [_finish(r0, tmp_path, "r0"), _finish(r1, tmp_path, "r1")]
    assert results[1]["objs"] == [{"rank": 0}, {"rank": 1}]
    assert not marker.exists(), "the attacker's pickle was loaded"
    assert not path.exists(), "rank 0 leaves the secret file once every rank has read it"


@pytest.mark.alone
@pytest.mark.long  # by default test_harden_listeners runs it under a 1024-file limit, the harder case
@needs_other_user
@pytest.mark.timeout(180)
def test_1100_held_connections_do_not_stop_a_job(tmp_path: Path) -> None:
    """The attacker holds 1100 connections on the store and on rank 1's listener, then the job
    runs its first collective (ranks connect lazily, so through the flooded listener)."""
    port = _free_port()
    marker = Path(f"/tmp/ringlet-pwned-{port}")
    env = {"WAIT_FOR_GO": "1", "RINGLET_TIMEOUT": "60"}
    procs = [_start(_torchrun_env(r, 2, port, **env), tmp_path, f"r{r}") for r in range(2)]
    for r in range(2):
        _wait_for(tmp_path / f"ready{r}")
    listener = json.loads((tmp_path / "ready1").read_text())["listener"]
    flood = subprocess.Popen(
        ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
         os.path.realpath(sys.executable), "-c", textwrap.dedent("""
            import resource, socket, sys, time
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
            held = []
            for port in map(int, sys.argv[1:]):
                for _ in range(1100):
                    try:
                        held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                    except OSError:
                        pass
            print(len(held), flush=True)
            time.sleep(120)
        """), str(port), str(listener)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert flood.stdout is not None
        opened = int(flood.stdout.readline())
        assert opened >= 1100, f"the attacker opened only {opened} connections"
        started = time.monotonic()
        (tmp_path / "go").touch()
        results = [_finish(p, tmp_path, f"r{r}") for r, p in enumerate(procs)]
        assert time.monotonic() - started < 20, "the flood slowed the collective to a crawl"
    finally:
        flood.kill()
        flood.wait()
    assert all(res["sum"] == [1.0, 3.0, 5.0, 7.0] for res in results)
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_a_second_job_on_the_same_port_and_secret_is_refused(tmp_path: Path) -> None:
    port, secret = _free_port(), "shared-by-two-jobs"
    env = {"WAIT_FOR_GO": "1", "RINGLET_SECRET": secret}
    first = [_start(_torchrun_env(r, 2, port, TORCHELASTIC_RUN_ID="job-a", **env), tmp_path,
                    f"a{r}") for r in range(2)]  # fmt: skip
    for r in range(2):
        _wait_for(tmp_path / f"ready{r}")
    # a second job (another run id) whose rank 1 finds the first job's store on the port
    intruder = _start(_torchrun_env(1, 2, port, TORCHELASTIC_RUN_ID="job-b", **env), tmp_path, "b1")
    intruder.communicate(timeout=60)
    err = (tmp_path / "b1.log").read_text()
    assert intruder.returncode != 0
    assert "JobMismatchError" in err and "'torchrun:job-b'" in err and "'torchrun:job-a'" in err
    # with no job id at all, the rank it claims is already taken: refused too, never mixed in
    anonymous = _start(_torchrun_env(1, 2, port, RINGLET_SECRET=secret), tmp_path, "c1")
    anonymous.communicate(timeout=60)
    assert anonymous.returncode != 0
    assert "job" in (tmp_path / "c1.log").read_text()
    (tmp_path / "go").touch()
    results = [_finish(p, tmp_path, f"a{r}") for r, p in enumerate(first)]
    assert all(res["sum"] == [1.0, 3.0, 5.0, 7.0] for res in results)


@pytest.mark.timeout(120)
def test_init_twice_is_a_clear_error_and_leaves_the_world_working(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import numpy as np, ringlet
        comm = ringlet.init()
        try:
            ringlet.init()
            print("NO ERROR")
        except ringlet.RingletError as exc:
            print("refused:", exc)
        solo = ringlet.init(rank=0, world_size=1)  # another job's world may be open alongside
        print("solo", solo.size)
        solo.close()
        print(comm.all_reduce(np.ones(3)).tolist())
        comm.close()
        again = ringlet.init()  # once closed, the same job may be joined again
        print("again", again.all_reduce(np.ones(1)).tolist())
        again.close()
    """)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_torchrun_env(r, 2, port),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "already called in this process" in out and "NO ERROR" not in out
        assert "solo 1" in out and "[2.0, 2.0, 2.0]" in out and "again [2.0]" in out

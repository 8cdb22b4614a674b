"""`ringlet run` on real processes: variables, output prefixes, failures, signals, several nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ringlet
from ringlet.launch import _REAPER, launch

RUN = [sys.executable, "-m", "ringlet", "run"]
RINGLET_VARS = [
    "RINGLET_RANK",
    "RINGLET_WORLD_SIZE",
    "RINGLET_LOCAL_RANK",
    "RINGLET_LOCAL_SIZE",
    "RINGLET_NODE_RANK",
    "RINGLET_MASTER",
    "RINGLET_SECRET",
    "RINGLET_JOB_ID",
    "RINGLET_TIMEOUT",
    "RINGLET_TRANSPORT",
]
TORCHRUN_VARS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
]
PRINT_ENV = (
    "import json, os; "
    f"print(json.dumps({{k: os.environ.get(k) for k in {RINGLET_VARS + TORCHRUN_VARS!r}}}))"
)
# Each rank prints its pid and a grandchild's pid, then sleeps: for checking nothing survives.
SLEEP_WITH_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("pids", os.getpid(), child.pid, flush=True)
    time.sleep(60)
    """
)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without job variables a surrounding launcher may have set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RINGLET_", "PET_")) and k not in TORCHRUN_VARS
    }
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUN, *args], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def rank_json_lines(stdout: str) -> dict[int, dict[str, str]]:
    """{rank: printed variables} from `[rK] {json}` lines, checking each prefix matches."""
    seen = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"\[r(\d+)\] (\{.*\})", line)
        assert match, f"unprefixed or malformed line: {line!r}"
        values = json.loads(match.group(2))
        assert int(values["RANK"]) == int(match.group(1))
        seen[int(match.group(1))] = values
    return seen


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, already dead but not reaped by its new parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state not in ("Z", "X")


def wait_dead(pids: list[int], within: float = 3.0) -> list[int]:
    deadline = time.monotonic() + within
    while (survivors := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return survivors


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(20)
def test_every_rank_gets_its_variables_and_prefix() -> None:
    result = run("-n", "4", "--timeout", "12.5", "--transport", "tcp", "python", "-c", PRINT_ENV)
    assert result.returncode == 0, result.stderr
    ranks = rank_json_lines(result.stdout)
    assert sorted(ranks) == [0, 1, 2, 3]
    master = ranks[0]["RINGLET_MASTER"]
    host, port = master.rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    for rank, values in ranks.items():
        assert values["RINGLET_RANK"] == values["RANK"] == str(rank)
        assert values["RINGLET_LOCAL_RANK"] == values["LOCAL_RANK"] == str(rank)
        assert values["RINGLET_WORLD_SIZE"] == values["WORLD_SIZE"] == "4"
        assert values["RINGLET_LOCAL_SIZE"] == values["LOCAL_WORLD_SIZE"] == "4"
        assert values["RINGLET_NODE_RANK"] == "0"
        assert values["RINGLET_MASTER"] == master
        # torch's master is its own: init_process_group binds MASTER_PORT beside ringlet's store
        assert values["MASTER_ADDR"] == host and values["MASTER_PORT"] != port
        assert values["MASTER_PORT"] == ranks[0]["MASTER_PORT"]
        assert values["OMP_NUM_THREADS"] == "1"  # set like torchrun does
        assert values["RINGLET_TIMEOUT"] == "12.5"
        assert values["RINGLET_TRANSPORT"] == "tcp"
        # one job: one secret and one job id, shared by every rank
        assert values["RINGLET_SECRET"] == ranks[0]["RINGLET_SECRET"]
        assert len(values["RINGLET_SECRET"]) >= 32
        assert values["RINGLET_JOB_ID"] == ranks[0]["RINGLET_JOB_ID"]
    # a second job gets a fresh secret
    again = rank_json_lines(run("-n", "1", "python", "-c", PRINT_ENV).stdout)
    assert again[0]["RINGLET_SECRET"] != ranks[0]["RINGLET_SECRET"]


@pytest.mark.timeout(20)
def test_no_prefix_secret_and_job_id_from_environment() -> None:
    env = clean_env(RINGLET_SECRET="s3cret-from-env")
    result = run("--no-prefix", "-n", "2", "python", "-c", PRINT_ENV, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("{") for line in lines)
    values = [json.loads(line) for line in lines]
    assert sorted(v["RANK"] for v in values) == ["0", "1"]
    assert {v["RINGLET_SECRET"] for v in values} == {"s3cret-from-env"}
    # jobs sharing an exported secret still get different job ids; an explicit one is kept
    other = rank_json_lines(run("-n", "1", "python", "-c", PRINT_ENV, env=env).stdout)
    assert other[0]["RINGLET_JOB_ID"] != values[0]["RINGLET_JOB_ID"]
    env["RINGLET_JOB_ID"] = "job-42"
    named = rank_json_lines(run("-n", "2", "python", "-c", PRINT_ENV, env=env).stdout)
    assert {v["RINGLET_JOB_ID"] for v in named.values()} == {"job-42"}


@pytest.mark.timeout(20)
def test_script_runs_with_this_python_and_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint(os.environ['RANK'], sys.executable, sys.argv[1:])\n")
    result = run("-n", "2", str(script), "--lr", "0.1", "-x")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == [f"[r{r}] {r} {sys.executable} ['--lr', '0.1', '-x']" for r in range(2)]


INIT_TWICE = """
import numpy as np, ringlet
for world in range(3):  # one world after another in the same processes, each on fresh keys
    with ringlet.init() as comm:
        got = comm.all_reduce(np.full(4, comm.rank + world, np.float64))
        assert (got == sum(range(comm.size)) + world * comm.size).all(), got
        print("world", world, "ok", flush=True)
"""


@pytest.mark.timeout(60)
def test_init_again_after_close_in_one_job(tmp_path: Path) -> None:
    script = tmp_path / "again.py"
    script.write_text(INIT_TWICE)
    result = run("-n", "3", str(script), timeout=50)
    assert result.returncode == 0, result.stderr
    for world in range(3):
        assert result.stdout.count(f"world {world} ok") == 3, result.stdout


@pytest.mark.timeout(20)
def test_console_script_runs_too() -> None:
    console = Path(sys.executable).with_name("ringlet")
    if not console.exists():
        found = shutil.which("ringlet")
        if found is None:
            pytest.skip("the ringlet console script is not installed next to this Python")
        console = Path(found)
    result = subprocess.run(
        [str(console), "run", "-n", "2", "python", "-c", PRINT_ENV],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(rank_json_lines(result.stdout)) == [0, 1]


#: In a fresh interpreter: ringlet and every non-bfloat16 dtype leave ml_dtypes (~1 s) unloaded;
#: naming bfloat16, receiving its wire code or holding an ml_dtypes array loads it.
LAZY_ML_DTYPES = textwrap.dedent("""
    import sys
    import numpy as np
    import ringlet
    from ringlet import ops
    assert ops.check_dtype(np.float32) == np.float32 and ops.dtype_code(np.dtype("int8")) == 2
    assert ops.dtype_from_code(12) == np.float32
    assert "ml_dtypes" not in sys.modules, "import ringlet loaded ml_dtypes"
    if sys.argv[1] == "name":
        dt = ops.check_dtype("bfloat16")
    elif sys.argv[1] == "code":
        dt = ops.dtype_from_code(11)
    else:
        import ml_dtypes
        dt = ops.check_dtype(np.zeros(3, ml_dtypes.bfloat16).dtype)
    assert dt.name == "bfloat16" and ops.dtype_code(dt) == 11 and ops.dtype_from_code(11) == dt
    assert ops.SUPPORTED_DTYPES[10] == dt == ops.BFLOAT16 and len(ops.SUPPORTED_DTYPES) == 15
    print("ok")
""")


@pytest.mark.timeout(30)
def test_ml_dtypes_is_imported_only_for_bfloat16() -> None:
    """`import ringlet` and `ringlet --version` skip ml_dtypes (and --version the communicator);
    bfloat16 still works every way."""
    for how in ("name", "code", "array"):
        result = subprocess.run([sys.executable, "-c", LAZY_ML_DTYPES, how],
                                capture_output=True, text=True, timeout=20)  # fmt: skip
        assert result.stdout == "ok\n", (how, result.stderr)
    probe = "import runpy, sys; sys.argv = ['ringlet', '--version']\ntry:\n"
    probe += "    runpy.run_module('ringlet', run_name='__main__')\nexcept SystemExit:\n"
    probe += "    print('ml_dtypes' in sys.modules, 'ringlet.comm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=20)  # fmt: skip
    assert result.stdout.splitlines() == [f"ringlet {ringlet.__version__}", "False False"], result


@pytest.mark.alone
@pytest.mark.timeout(20)
def test_failing_rank_ends_the_job_and_its_traceback_is_shown() -> None:
    grace = 1.0
    code = textwrap.dedent(
        """
        import os, time
        if os.environ["RANK"] == "2":
            raise ValueError("rank two broke")
        time.sleep(60)
        """
    )
    started = time.monotonic()
    result = run("-n", "4", "--grace", str(grace), "python", "-c", code)
    elapsed = time.monotonic() - started
    assert elapsed < grace + 5, f"the job took {elapsed:.1f} s to end"
    assert result.returncode == 1
    assert "[r2] Traceback (most recent call last):" in result.stderr
    assert "[r2] ValueError: rank two broke" in result.stderr
    assert "ringlet run: rank 2 failed first (exit code 1)" in result.stderr
    summary = result.stderr.split("ringlet run: job summary", 1)[1]
    assert "rank 2: exit code 1: ValueError: rank two broke  <- failed first" in summary
    for rank in (0, 1, 3):
        assert f"rank {rank}: terminated by launcher (SIGTERM)" in summary
    # the traceback is printed once (not again in the summary), the summary last
    assert result.stderr.count("Traceback (most recent call last)") == 1
    assert result.stderr.rstrip().splitlines()[-1].startswith("(rank 2's traceback is above")


@pytest.mark.timeout(20)
def test_exit_code_of_the_first_failure_is_returned() -> None:
    code = "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"
    result = run("-n", "3", "python", "-c", code)
    assert result.returncode == 3
    assert "rank 1 failed first (exit code 3)" in result.stderr
    assert "rank 0: ok" in result.stderr and "rank 2: ok" in result.stderr


@pytest.mark.timeout(20)
def test_rank_killed_by_signal_is_reported() -> None:
    code = textwrap.dedent(
        """
        import os, time
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), 9)
        time.sleep(60)
        """
    )
    result = run("-n", "2", "--grace", "0.5", "python", "-c", code)
    assert result.returncode == 128 + signal.SIGKILL
    assert "rank 1 failed first (killed by SIGKILL)" in result.stderr
    assert "rank 1: killed by SIGKILL" in result.stderr


def start_sleeping_job(nproc: int, *extra: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start a job whose ranks each sleep with a child; return it and every rank's pids."""
    job = subprocess.Popen(
        [*RUN, "-n", str(nproc), *extra, "python", "-c", SLEEP_WITH_CHILD],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    pids: list[int] = []
    while len(pids) < 2 * nproc:
        line = job.stdout.readline()
        assert line, f"the job ended early: {job.wait()} {job.stderr.read() if job.stderr else ''}"
        pids += [int(word) for word in line.split()[2:]]
    return job, pids


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_ends_every_process(signum: int) -> None:
    job, pids = start_sleeping_job(3)
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=10)
    assert job.returncode == 128 + signum
    assert f"received {signal.Signals(signum).name}" in stderr
    assert wait_dead(pids) == [], "ranks or their children survived the job"


@pytest.mark.timeout(20)
def test_killed_launcher_takes_its_ranks_along() -> None:
    """SIGKILL leaves the launcher no chance to act: its watchdog ends the ranks' groups."""
    job, pids = start_sleeping_job(2)
    job.kill()
    job.communicate(timeout=10)
    assert wait_dead(pids, within=5.0) == [], "ranks or their children outlived the launcher"


@pytest.mark.timeout(20)
def test_the_watchdog_spares_a_group_whose_leader_pid_was_reused() -> None:
    """A rank long gone whose pid now names another process is not killed when the launcher dies;
    a pid reused by a new process shows as a start time other than the one recorded."""
    sleepers = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
    try:
        reaper = subprocess.Popen([sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, text=True)
        reused, ours = sleepers
        reaper.communicate(f"{reused.pid} 1\n{ours.pid}\n", timeout=10)  # no "done": it died
        assert ours.wait(timeout=5) == -signal.SIGKILL, "the watchdog left a rank's group alive"
        assert reused.poll() is None, "the watchdog killed a process that had taken a rank's pid"
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


@pytest.mark.alone
@pytest.mark.timeout(20)
def test_rank_ignoring_signals_is_killed_after_grace() -> None:
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEP_WITH_CHILD
    job = subprocess.Popen(
        [*RUN, "-n", "2", "--grace", "0.5", "python", "-c", stubborn],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    pids = [int(w) for _ in range(2) for w in job.stdout.readline().split()[2:]]
    started = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert job.returncode == 128 + signal.SIGTERM
    assert "rank 0: terminated by launcher (SIGKILL)" in stderr
    assert wait_dead(pids) == []


@pytest.mark.timeout(20)
def test_bad_arguments_are_refused_before_starting() -> None:
    no_master = run("-n", "2", "--nnodes", "2", "python", "-c", "pass")
    assert no_master.returncode == 2 and "--master" in no_master.stderr
    no_secret = run("-n", "2", "--nnodes", "2", "--master", "127.0.0.1:1234", "python", "-c", "")
    assert no_secret.returncode == 2
    assert "--secret" in no_secret.stderr and "RINGLET_SECRET" in no_secret.stderr
    missing = run("-n", "2", "no_such_script.py")
    assert missing.returncode == 2 and "not found" in missing.stderr
    bad_rank = run("-n", "2", "--nnodes", "2", "--node-rank", "2", "--master", "h:1", "true")
    assert bad_rank.returncode == 2 and "--node-rank" in bad_rank.stderr


@pytest.mark.timeout(20)
def test_launch_from_python(capfd: pytest.CaptureFixture[str]) -> None:
    code = "import os; print('hello from', os.environ['RANK'], os.environ['EXTRA'])"
    assert launch(["python", "-c", code], 2, env={"EXTRA": "yes"}) == 0
    out = capfd.readouterr().out
    assert sorted(out.splitlines()) == ["[r0] hello from 0 yes", "[r1] hello from 1 yes"]
    assert launch(["no-such-command-for-ringlet"], 2) == 127
    assert "cannot start rank 0" in capfd.readouterr().err


def start_node(node_rank: int, port: int, command: list[str], **env: str) -> subprocess.Popen[str]:
    """One of two launchers of a two-node job on this machine, with -n 2 each."""
    command = ["--master", f"127.0.0.1:{port}", *command]
    return subprocess.Popen(
        [*RUN, "-n", "2", "--nnodes", "2", "--node-rank", str(node_rank), *command],
        env=clean_env(RINGLET_SECRET="two-node-test-secret", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(20)
def test_two_nodes_see_one_world() -> None:
    port = free_port()
    nodes = [start_node(k, port, ["python", "-c", PRINT_ENV]) for k in (0, 1)]
    outputs = [node.communicate(timeout=15) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr
    ranks = {**rank_json_lines(outputs[0][0]), **rank_json_lines(outputs[1][0])}
    assert sorted(ranks) == [0, 1, 2, 3]
    for rank, values in ranks.items():
        assert values["RINGLET_WORLD_SIZE"] == values["WORLD_SIZE"] == "4"
        assert values["RINGLET_LOCAL_RANK"] == values["LOCAL_RANK"] == str(rank % 2)
        assert values["RINGLET_NODE_RANK"] == str(rank // 2)
        assert values["RINGLET_MASTER"] == f"127.0.0.1:{port + 1}"  # torch's is {port}
        assert (values["MASTER_ADDR"], values["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert values["RINGLET_SECRET"] == "two-node-test-secret"
        assert values["RINGLET_JOB_ID"] == ranks[0]["RINGLET_JOB_ID"]


@pytest.mark.multihost
@pytest.mark.timeout(30)
def test_two_nodes_all_reduce(tmp_path: Path) -> None:
    if not hasattr(ringlet, "init"):
        pytest.skip("ringlet.init is not available yet")
    script = tmp_path / "all_reduce.py"
    script.write_text(
        textwrap.dedent(
            """
            import numpy as np
            import ringlet

            comm = ringlet.init()
            x = np.ones(4) * comm.rank
            comm.all_reduce(x)
            expected = np.ones(4) * sum(range(comm.size))
            assert np.array_equal(x, expected), (comm.rank, x, expected)
            print("all_reduce ok", comm.rank, comm.size)
            """
        )
    )
    port = free_port()
    command = ["--timeout", "20", str(script)]
    nodes = [start_node(0, port, command), start_node(1, port, command, RINGLET_HOST="127.0.0.2")]
    outputs = [node.communicate(timeout=25) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr
    lines = sorted(outputs[0][0].splitlines() + outputs[1][0].splitlines())
    assert lines == [f"[r{r}] all_reduce ok {r} 4" for r in range(4)]


def error_blocks(stderr: str) -> dict[int, list[int]]:
    """{rank: indexes of its [rK] lines in stderr}, to see that each rank's lines are one block."""
    where: dict[int, list[int]] = {}
    for index, line in enumerate(stderr.splitlines()):
        if match := re.match(r"\[r(\d+)\] ", line):
            where.setdefault(int(match.group(1)), []).append(index)
    return where


@pytest.mark.timeout(30)
def test_one_error_on_three_ranks_prints_each_traceback_once_as_a_block() -> None:
    code = "import time, os; time.sleep(0.3); len(5)  # TypeError on every rank at once"
    result = run("-n", "3", "--grace", "1", "python", "-c", code)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("Traceback (most recent call last)") == 3, result.stderr
    for rank, indexes in error_blocks(result.stderr).items():
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes))), (rank, result.stderr)
        assert len(indexes) == 3, result.stderr  # Traceback, File "<string>", TypeError
    assert len(result.stderr.splitlines()) < 25, result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("(rank ")


FAIL_ON_RANK_1 = textwrap.dedent("""
    import numpy as np
    import ringlet
    comm = ringlet.init()
    comm.barrier()
    if comm.rank == 1:
        raise ValueError("bad batch on rank 1")
    comm.all_reduce(np.ones(4))  # ranks 0 and 2 fail here, because of rank 1
""")


@pytest.mark.timeout(60)
def test_quiet_others_shows_the_first_failure_whole_and_one_line_per_victim(
    tmp_path: Path,
) -> None:
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    result = run("-n", "3", "--quiet-others", "--timeout", "10", "--grace", "10", str(script),
                 timeout=50)  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert [line for line in lines if line.startswith("[r1] ")][-1] == (
        "[r1] ValueError: bad batch on rank 1"
    ), result.stderr
    for rank in (0, 2):
        own = [line for line in lines if line.startswith(f"[r{rank}] ")]
        assert len(own) == 1 and "PeerError" in own[0], result.stderr
        assert own[0].endswith("[traceback left out (--quiet-others)]"), result.stderr
    summary = lines.index("ringlet run: job summary")
    assert not [line for line in lines[summary:] if line.startswith("[r")], result.stderr
    assert "  rank 1: exit code 1: ValueError: bad batch on rank 1  <- failed first" in lines
    assert lines[-1] == "(rank 1's traceback is above, in its [r1] lines)", result.stderr
    # The same TypeError on every rank: rank 0's in full, the others one line each
    same = run("-n", "3", "--quiet-others", "--grace", "1", "python", "-c",
               "import time; time.sleep(0.3); len(5)")  # fmt: skip
    assert same.returncode == 1 and same.stderr.count("Traceback (most recent") == 1, same.stderr
    cut = re.findall(r"^\[r(\d)\] TypeError: .* \[the same traceback as rank (\d)'s, left out",
                     same.stderr, re.M)  # fmt: skip
    assert len(cut) == 2 and len({r for r, _ in cut} | {s for _, s in cut}) == 3, same.stderr


RING_AFTER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import ringlet
    comm = ringlet.init()
    comm.barrier()
    if comm.rank == int(sys.argv[1]):
        if sys.argv[2] == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os._exit(0)  # leaves without a word while the others still need it
    comm.all_reduce(np.ones(4))
""")


@pytest.mark.timeout(40)
@pytest.mark.parametrize(("culprit", "how"), [(2, "leave"), (0, "stop")])
def test_the_rank_that_caused_the_end_is_named_not_its_victims(
    culprit: int, how: str, tmp_path: Path
) -> None:
    script = tmp_path / "ring_after.py"
    script.write_text(RING_AFTER)
    result = run("-n", "3", "--timeout", "3", "--grace", "1", str(script), str(culprit), how,
                 timeout=35)  # fmt: skip
    assert result.returncode != 0
    summary = result.stderr.split("ringlet run: job summary", 1)[1]
    marked = [line for line in summary.splitlines() if "<-" in line]
    assert len(marked) == 1 and marked[0].startswith(f"  rank {culprit}:"), result.stderr
    if how == "stop":
        assert "stopped (not running)" in marked[0] and "timed out waiting" in marked[0]
    else:
        assert "left while the others still needed it" in marked[0]
    victims = [r for r in range(3) if r != culprit]
    for rank in victims:  # failed because of it, or still waiting when the launcher ended it
        assert re.search(
            rf"rank {rank}: (exit code 1, because of another rank \((PeerError|"
            r"CollectiveTimeout)\)|terminated by launcher)",
            summary,
        ), result.stderr


@pytest.mark.timeout(30)
def test_torchrun_spellings_and_kubeflow_defaults() -> None:
    port = free_port()
    result = run("--nproc_per_node", "2", "--nnodes", "1:1", "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "--rdzv-backend", "c10d", "--rdzv-id", "job-7",
                 "python", "-c", PRINT_ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    ranks = rank_json_lines(result.stdout)
    assert sorted(ranks) == [0, 1]
    for values in ranks.values():
        assert (values["MASTER_ADDR"], values["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert values["RINGLET_MASTER"] == f"127.0.0.1:{port + 1}"
        assert values["RINGLET_JOB_ID"] == "job-7"
    # Kubeflow's PyTorchJob/TrainJob set PET_*: `ringlet run script.py` alone takes them
    pet = clean_env(PET_NPROC_PER_NODE="2", PET_NNODES="1", PET_NODE_RANK="0",
                    PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))  # fmt: skip
    result = run("python", "-c", PRINT_ENV, env=pet)
    assert result.returncode == 0, result.stderr
    assert {v["MASTER_PORT"] for v in rank_json_lines(result.stdout).values()} == {str(port)}
    elastic = run("--nnodes", "1:4", "-n", "1", "python", "-c", "pass")
    assert elastic.returncode == 2 and "elastic range" in elastic.stderr
    assert "how many ranks" in run("python", "-c", "pass").stderr


@pytest.mark.timeout(150)
def test_max_restarts_restarts_a_killed_rank_which_rejoins_the_job() -> None:
    """``--max-restarts 1``: rank 2 SIGKILLs itself mid-training; the launcher starts it again
    alone, it rejoins (ringlet.survive.init_or_rejoin) and receives the state, and all 4 end with
    identical parameters; the job exits 0."""
    example = Path(__file__).resolve().parents[2] / "examples" / "survive_mlp.py"
    result = run("-n", "4", "--max-restarts", "1", str(example),
                 env=clean_env(SURVIVE_KILL="1"), timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 2 failed (killed by SIGKILL); restarting it (1 of 1)" in result.stderr
    done = re.findall(r"^\[r(\d)\] global rank \d: 60 steps on ranks \[0, 1, 2, 3\].* digest (\S+)$",
                      result.stdout, re.M)  # fmt: skip
    assert sorted(r for r, _ in done) == ["0", "1", "2", "3"], result.stdout
    assert len({d for _, d in done}) == 1, f"parameters differ: {done}"


def test_max_restarts_restarts_rank_0_too_and_ends_the_job_when_none_are_left() -> None:
    """The launcher, not rank 0, serves the store: rank 0 is restarted like any rank, and its
    failure with no restarts left ends the job with its exit code."""
    result = run("-n", "2", "--max-restarts", "3", sys.executable, "-c",
                 "import os, sys; sys.exit(3 if os.environ['RANK'] == '0' else 0)")  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "rank 0 failed (exit code 3); restarting it (3 of 3)" in result.stderr
    assert "rank 0 failed first (exit code 3)" in result.stderr

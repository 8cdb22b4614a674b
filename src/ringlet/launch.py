"""`ringlet run`: start N local ranks of a command, forward their output, end the job as one.

Every rank gets the RINGLET_* variables that `ringlet.init()` reads, and torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, so scripts written for
torchrun run unchanged. Each rank runs in its own process group, so a signal reaches the whole
tree a rank started. One rank failing ends the job: the others get `grace` seconds to finish or
report their own errors, then SIGTERM, then SIGKILL, and a summary names every rank's fate. A
watchdog process kills every rank's group if the launcher itself dies, even by SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

from ringlet.auth import job_secret, secret_from_str

TAIL_LINES = 200  # stderr lines kept per rank for the failure summary
_MAX_LINE = 1 << 20  # a longer "line" is forwarded in pieces rather than buffered whole
_JOIN_OUTPUT = 2.0  # seconds to wait for a finished rank's last output to be forwarded
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: A watchdog process: it reads the process group of every rank the launcher starts, and if its
#: input ends without "done" (the launcher died, even by SIGKILL) it kills those groups.
_REAPER = """
import os, signal, sys
groups = []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    groups.append(int(line))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


def launch(
    cmd: list[str],
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master: str | None = None,
    prefix: bool = True,
    grace: float = 3.0,
    env: dict[str, str] | None = None,
    secret: str | None = None,
    timeout: float | None = None,
    transport: str | None = None,
) -> int:
    """Run `cmd` as ranks node_rank*nproc … node_rank*nproc+nproc-1 of nnodes*nproc; wait for all.

    A command whose first word ends in `.py` runs with this Python. `env` adds variables to (and
    overrides) the launcher's own environment for every rank. Returns 0 when every rank exits 0,
    else the first failure's exit code (128+signal for a signal). Raises ValueError for bad
    arguments, before any rank starts.
    """
    argv = _command(cmd)
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"ringlet run: need -n >= 1 and --nnodes >= 1, got {nproc} and {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"ringlet run: --node-rank must be in [0, {nnodes}), got {node_rank}")
    if grace < 0:
        raise ValueError(f"ringlet run: --grace must be >= 0 seconds, got {grace}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"ringlet run: --timeout must be > 0 seconds, got {timeout}")
    host, port = _master_address(master, nnodes)
    base = {**os.environ, **(env or {})}
    shared_secret = _resolve_secret(secret or base.get("RINGLET_SECRET"), nnodes)
    shared = {
        **base,
        "PYTHONUNBUFFERED": "1",  # ranks' output appears as it is printed, not at exit
        "RINGLET_WORLD_SIZE": str(nnodes * nproc),
        "RINGLET_LOCAL_SIZE": str(nproc),
        "RINGLET_NODE_RANK": str(node_rank),
        "RINGLET_MASTER": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "RINGLET_SECRET": shared_secret,
        "RINGLET_JOB_ID": base.get("RINGLET_JOB_ID") or _job_id(shared_secret, host, port),
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
    }
    if timeout is not None:
        shared["RINGLET_TIMEOUT"] = str(timeout)
    if transport is not None:
        shared["RINGLET_TRANSPORT"] = transport
    first = node_rank * nproc
    rank_envs = [
        {**shared, "RINGLET_RANK": str(first + local), "RINGLET_LOCAL_RANK": str(local),
         "RANK": str(first + local), "LOCAL_RANK": str(local)}
        for local in range(nproc)
    ]  # fmt: skip
    job = _Job(grace, _Sink(sys.stdout), _Sink(sys.stderr), prefix)
    return job.run(argv, rank_envs, first)


def run_main(args: argparse.Namespace) -> int:
    """Entry point of `ringlet run`: the parsed command line → launch(); 2 on bad arguments."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        return launch(
            command,
            args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master=args.master,
            prefix=args.prefix,
            grace=args.grace,
            secret=args.secret,
            timeout=args.timeout,
            transport=args.transport,
        )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2


def _command(cmd: list[str]) -> list[str]:
    """The argv to start: a `.py` script runs with this interpreter, anything else as given."""
    if not cmd:
        raise ValueError("ringlet run: no command given; usage: ringlet run -n N script.py args…")
    if cmd[0].endswith(".py"):
        if not os.path.isfile(cmd[0]):
            raise ValueError(f"ringlet run: script {cmd[0]!r} not found")
        return [sys.executable, *cmd]
    return list(cmd)


def _master_address(master: str | None, nnodes: int) -> tuple[str, int]:
    """(host, port) of the rendezvous; on one node a free local port is picked when not given."""
    if master is None:
        if nnodes > 1:
            raise ValueError(
                "ringlet run: --nnodes > 1 needs --master host:port, the same on every node "
                "(an address of node 0 that the other nodes can reach)"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return "127.0.0.1", int(probe.getsockname()[1])
    host, sep, port_text = master.rpartition(":")
    host = host.strip("[]")  # [::1]:29500
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"ringlet run: --master must look like host:port, got {master!r}")
    return host, int(port_text)


def _resolve_secret(given: str | None, nnodes: int) -> str:
    """The job's shared secret: the one given, else (one node only) a fresh one."""
    if given:
        secret_from_str(given)  # refuses a blank secret, which would authenticate anyone
        return given
    if nnodes > 1:
        raise ValueError(
            "ringlet run: with --nnodes > 1 every node must use the same secret; pass --secret S "
            "or set RINGLET_SECRET on every node, e.g. to the output of "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return job_secret().decode("ascii")


def _job_id(shared_secret: str, host: str, port: int) -> str:
    """A job id every node derives alike from the secret and the master, revealing neither.

    The master is part of it so that jobs sharing a secret (RINGLET_SECRET exported once) differ.
    """
    material = f"ringlet-job-id\0{host}\0{port}\0{shared_secret}".encode()
    return hashlib.sha256(material).hexdigest()[:16]


def describe_exit(returncode: int) -> str:
    """'ok', 'exit code C' or 'killed by SIGNAME' for a Popen return code."""
    if returncode == 0:
        return "ok"
    if returncode > 0:
        return f"exit code {returncode}"
    return f"killed by {_signal_name(-returncode)}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Sink:
    """A launcher output stream shared by the forwarding threads; one whole line per write."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._broken:
                return  # keep draining the ranks' pipes so they never block on a full pipe
            try:
                buffer = getattr(self._stream, "buffer", None)
                if buffer is not None:
                    self._stream.flush()
                    buffer.write(data)
                    buffer.flush()
                else:
                    self._stream.write(data.decode(errors="replace"))
                    self._stream.flush()
            except (OSError, ValueError):
                self._broken = True

    def line(self, text: str) -> None:
        self.write(text.encode() + b"\n")


def _pump(source: IO[bytes], sink: _Sink, prefix: bytes, tail: deque[str] | None) -> None:
    """Copy one stream of a rank to the launcher's, line by line, each line prefixed."""
    with source:
        for line in iter(lambda: source.readline(_MAX_LINE), b""):
            if tail is not None:
                tail.append(line.decode(errors="replace").rstrip("\r\n"))
            sink.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))


@dataclass
class _Rank:
    """One started rank: its process, output threads, stderr tail and how it ended."""

    rank: int
    proc: subprocess.Popen[bytes]
    threads: list[threading.Thread] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopped_with: int | None = None  # the signal the launcher sent, if it stopped this rank

    @property
    def failed_alone(self) -> bool:
        """True when the rank failed by itself, not because the launcher stopped it."""
        return self.proc.returncode not in (None, 0) and self.stopped_with is None

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the rank's whole process group (the group id is the rank's pid)."""
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def join_output(self, deadline: float) -> None:
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


@dataclass(frozen=True)
class _Received:
    """A signal the launcher received, queued by its handler for the supervising loop."""

    signum: int


def _wait_for_exit(rank: _Rank, events: queue.SimpleQueue[int | _Received]) -> None:
    """Report the rank's exit without reaping it, so its pid still names its group."""
    if hasattr(os, "waitid"):
        try:
            os.waitid(os.P_PID, rank.proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
    else:  # without waitid the thread reaps; group signals after that are best effort
        rank.proc.wait()
    events.put(rank.rank)


class _Job:
    """Starts the ranks and supervises them: forwards signals, ends the job on the first failure."""

    def __init__(self, grace: float, out: _Sink, err: _Sink, prefix: bool) -> None:
        self.grace = grace
        self.out, self.err, self.prefix = out, err, prefix
        self.ranks: dict[int, _Rank] = {}
        self.events: queue.SimpleQueue[int | _Received] = queue.SimpleQueue()
        self.reaper: IO[str] | None = None

    def run(self, argv: list[str], rank_envs: list[dict[str, str]], first_rank: int) -> int:
        previous = self._install_handlers()
        reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the job does not end the watchdog
            text=True,
        )
        self.reaper = reaper.stdin
        try:
            for offset, rank_env in enumerate(rank_envs):
                if not self._start(first_rank + offset, argv, rank_env):
                    return 127  # the ranks already started are killed below
            return self._supervise()
        finally:
            self._kill_all()  # only does anything if the launcher itself failed
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            assert reaper.stdin is not None
            with contextlib.suppress(OSError):
                reaper.stdin.write("done\n")
                reaper.stdin.close()
            reaper.wait()

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signals reach only the main thread; the caller handles them there
        return {signum: signal.signal(signum, self._on_signal) for signum in _FORWARDED}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.events.put(_Received(signum))  # SimpleQueue.put is safe inside a signal handler

    def _start(self, rank: int, argv: list[str], rank_env: dict[str, str]) -> bool:
        try:
            proc = subprocess.Popen(
                argv,
                env=rank_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # own process group: signals reach the rank's whole tree
            )
        except OSError as error:
            self.err.line(f"ringlet run: cannot start rank {rank} ({argv[0]!r}): {error}")
            return False
        if self.reaper is not None:  # the rank leads its own process group: pgid = pid
            with contextlib.suppress(OSError):
                self.reaper.write(f"{proc.pid}\n")
                self.reaper.flush()
        started = _Rank(rank, proc)
        tag = f"[r{rank}] ".encode() if self.prefix else b""
        assert proc.stdout is not None and proc.stderr is not None
        started.threads = [
            threading.Thread(target=_pump, args=(proc.stdout, self.out, tag, None), daemon=True),
            threading.Thread(
                target=_pump, args=(proc.stderr, self.err, tag, started.tail), daemon=True
            ),
        ]
        for thread in started.threads:
            thread.start()
        threading.Thread(target=_wait_for_exit, args=(started, self.events), daemon=True).start()
        self.ranks[rank] = started
        return True

    def _supervise(self) -> int:
        """Wait for every rank; escalate drain → SIGTERM → SIGKILL after a failure or a signal."""
        running = set(self.ranks)
        first_failure: _Rank | None = None
        received: int | None = None
        stage, deadline = "running", None  # running | draining | terminating | killing
        while running:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event: int | _Received | None = self.events.get(timeout=wait)
            except queue.Empty:
                event = None
            if isinstance(event, int):
                rank = self.ranks[event]
                # The leader has exited but is not reaped yet, so its pid still names its
                # group: whatever it left running there goes now, and its pipes close.
                rank.signal_group(signal.SIGKILL)
                rank.proc.wait()
                running.discard(event)
                if rank.failed_alone and first_failure is None:
                    first_failure = rank
                    rank.join_output(time.monotonic() + _JOIN_OUTPUT)
                    self.err.line(
                        f"ringlet run: rank {rank.rank} failed first "
                        f"({describe_exit(rank.proc.returncode)})"
                    )
                    if stage == "running":
                        stage, deadline = "draining", time.monotonic() + self.grace
            elif isinstance(event, _Received) and received is None:
                received = event.signum
                self.err.line(
                    f"ringlet run: received {_signal_name(received)}, passing it to every rank"
                )
                self._signal(running, received)
                stage, deadline = "terminating", time.monotonic() + self.grace
            elif isinstance(event, _Received) or stage == "terminating":
                self._signal(running, signal.SIGKILL)  # a second signal, or grace ran out
                stage, deadline = "killing", None
            elif stage == "draining":
                self._signal(running, signal.SIGTERM)
                stage, deadline = "terminating", time.monotonic() + self.grace
        self._join_all_output()
        if first_failure is None and received is None:
            return 0
        self._print_summary(first_failure)
        if first_failure is not None:
            code = first_failure.proc.returncode
            return code if code > 0 else 128 - code
        assert received is not None
        return 128 + received

    def _signal(self, ranks: set[int], signum: int) -> None:
        for index in sorted(ranks):
            rank = self.ranks[index]
            if rank.stopped_with is None or signum == signal.SIGKILL:
                rank.stopped_with = signum
            rank.signal_group(signum)

    def _kill_all(self) -> None:
        for rank in self.ranks.values():
            if rank.proc.returncode is None:
                rank.signal_group(signal.SIGKILL)
                rank.proc.wait()

    def _join_all_output(self) -> None:
        deadline = time.monotonic() + _JOIN_OUTPUT
        for rank in self.ranks.values():
            rank.join_output(deadline)

    def _print_summary(self, first_failure: _Rank | None) -> None:
        lines = ["ringlet run: job summary"]
        for rank in self.ranks.values():  # in rank order, as started
            outcome = describe_exit(rank.proc.returncode)
            if rank.stopped_with is not None:
                sent = _signal_name(rank.stopped_with)
                ended = "" if rank.proc.returncode == -rank.stopped_with else f", then {outcome}"
                outcome = f"terminated by launcher ({sent}{ended})"
            if rank is first_failure:
                outcome += "  <- failed first"
            lines.append(f"  rank {rank.rank}: {outcome}")
        for rank in self.ranks.values():
            if rank.failed_alone and rank.tail:
                lines.append(f"----- rank {rank.rank} stderr, last {len(rank.tail)} lines -----")
                lines.extend(rank.tail)
        self.err.line("\n".join(lines))

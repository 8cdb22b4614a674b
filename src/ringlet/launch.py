"""`ringlet run`: start N local ranks of a command, forward their output, end the job as one.

Every rank gets the RINGLET_* variables that `ringlet.init()` reads, and torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT (and
OMP_NUM_THREADS=1 when several ranks share the node and it is not set), so scripts written for
torchrun run unchanged. MASTER_ADDR:MASTER_PORT is left to torch (``init_process_group`` binds it
on rank 0); ringlet's own store listens on another port (MASTER_PORT + 1 across nodes, unless
--store-port; a free one on one node), given to the ranks as RINGLET_MASTER. torchrun's flag
spellings and Kubeflow's PET_* defaults (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT) are understood. Each rank runs in its own process group, so a
signal reaches the whole tree a rank started. One rank failing ends the job: the others get
`grace` seconds to finish or report their own errors, then SIGTERM, then SIGKILL. Each rank's
stderr is forwarded in blocks (a traceback is never interleaved with another rank's lines) and a
summary names every rank's fate and the rank that caused the end. A watchdog process kills every
rank's group if the launcher itself dies, even by SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import queue
import re
import select
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
_QUIET = 0.05  # a rank's stderr silent this long: what it wrote in the burst goes out as one block
_BLOCK_AGE = 0.5  # ... and never held longer than this
_MAX_BLOCK = 1 << 16
#: The last line of a traceback raised because another rank failed, stopped or left: a victim.
_VICTIM = re.compile(r"^(?:ringlet\.errors\.)?(?:PeerError|CollectiveTimeout|BrokenCommunicator)\b")
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
    store_port: int | None = None,
    job_id: str | None = None,
) -> int:
    """Run `cmd` as ranks node_rank*nproc … node_rank*nproc+nproc-1 of nnodes*nproc; wait for all.

    ``master`` is torch's MASTER_ADDR:MASTER_PORT (the same on every node); ringlet's store takes
    ``store_port`` (default MASTER_PORT + 1; on one node without a master, two free ports).
    A command whose first word ends in `.py` runs with this Python. `env` adds variables to (and
    overrides) the launcher's own environment for every rank. Returns 0 when every rank exits 0,
    else the exit code of the rank that caused the end (128+signal for a signal). Raises
    ValueError for bad arguments, before any rank starts.
    """
    argv = _command(cmd)
    if nproc < 1 or nnodes < 1:
        raise ValueError(
            f"ringlet run: need --nproc-per-node >= 1 and --nnodes >= 1, got {nproc} and {nnodes}"
        )
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"ringlet run: --node-rank must be in [0, {nnodes}), got {node_rank}")
    if grace < 0:
        raise ValueError(f"ringlet run: --grace must be >= 0 seconds, got {grace}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"ringlet run: --timeout must be > 0 seconds, got {timeout}")
    host, port = _master_address(master, nnodes)
    ours = _store_port(host, port, store_port, master is None)
    base = {**os.environ, **(env or {})}
    shared_secret = _resolve_secret(secret or base.get("RINGLET_SECRET"), nnodes)
    store = f"[{host}]:{ours}" if ":" in host else f"{host}:{ours}"
    shared = {
        **base,
        "PYTHONUNBUFFERED": "1",  # ranks' output appears as it is printed, not at exit
        "RINGLET_WORLD_SIZE": str(nnodes * nproc),
        "RINGLET_LOCAL_SIZE": str(nproc),
        "RINGLET_NODE_RANK": str(node_rank),
        "RINGLET_MASTER": store,
        "RINGLET_SECRET": shared_secret,
        "RINGLET_JOB_ID": job_id
        or base.get("RINGLET_JOB_ID")
        or _job_id(shared_secret, host, ours),
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_WORLD_SIZE": str(nnodes * nproc),
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
    }
    if nproc > 1 and not base.get("OMP_NUM_THREADS"):
        shared["OMP_NUM_THREADS"] = "1"  # as torchrun: N ranks x all cores each would thrash
    if timeout is not None:
        shared["RINGLET_TIMEOUT"] = str(timeout)
    if transport is not None:
        shared["RINGLET_TRANSPORT"] = transport
    first = node_rank * nproc
    rank_envs = [
        {**shared, "RINGLET_RANK": str(first + local), "RINGLET_LOCAL_RANK": str(local),
         "RANK": str(first + local), "LOCAL_RANK": str(local), "ROLE_RANK": str(first + local)}
        for local in range(nproc)
    ]  # fmt: skip
    job = _Job(grace, _Sink(sys.stdout), _Sink(sys.stderr), prefix)
    return job.run(argv, rank_envs, first)


def add_arguments(run: argparse.ArgumentParser) -> None:
    """`ringlet run`'s options, in ringlet's and in torchrun's spellings (both `-` and `_`)."""
    run.add_argument(
        "-n", "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", metavar="N",
        help="ranks to start on this node; the job has --nnodes x N ranks, so on one node -n is"
        " the number of ranks, as in `ringlet bench -n` (default: PET_NPROC_PER_NODE)",
    )  # fmt: skip
    run.add_argument("--nnodes", metavar="M", help="nodes in the job: M, or torchrun's M:M"
                     " (default: PET_NNODES, else 1)")  # fmt: skip
    run.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, metavar="K",
                     help="this node's index, 0…M-1 (default: PET_NODE_RANK, else 0)")  # fmt: skip
    run.add_argument(
        "--master", metavar="HOST:PORT",
        help="the same as --master-addr HOST --master-port PORT",
    )  # fmt: skip
    run.add_argument("--master-addr", "--master_addr", dest="master_addr", metavar="HOST",
                     help="node 0's address, reachable from every node (PET_MASTER_ADDR)")  # fmt: skip
    run.add_argument("--master-port", "--master_port", dest="master_port", type=int,
                     metavar="PORT", help="torch's MASTER_PORT; ringlet's store takes the next one"
                     " (PET_MASTER_PORT; one node: a free port)")  # fmt: skip
    run.add_argument("--store-port", dest="store_port", type=int, metavar="PORT",
                     help="the port of ringlet's own store (default MASTER_PORT + 1)")  # fmt: skip
    run.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint",
                     metavar="HOST:PORT", help="torchrun's spelling of --master")  # fmt: skip
    run.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", metavar="ID",
                     help="the job's id, alike on every node (sets RINGLET_JOB_ID)")  # fmt: skip
    run.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend",
                     choices=["static", "c10d"], help="accepted for torchrun's command lines; the"
                     " rendezvous is always ringlet's static one")  # fmt: skip
    run.add_argument("--standalone", action="store_true",
                     help="one node, free ports (the default without --nnodes)")  # fmt: skip
    run.add_argument(
        "--no-prefix",
        dest="prefix",
        action="store_false",
        help="do not prefix each output line with [rRANK]",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="after a failure or a signal, how long ranks get to finish, and again to exit "
        "after SIGTERM before SIGKILL (3.0)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long any blocking call may wait (sets RINGLET_TIMEOUT)",
    )
    run.add_argument(
        "--secret",
        help="the job's shared secret (default: RINGLET_SECRET, else a fresh one on one node); "
        "prefer RINGLET_SECRET, which other users cannot see in the process list",
    )
    run.add_argument("--transport", help="transport to use (sets RINGLET_TRANSPORT)")
    run.add_argument(
        "command", nargs=argparse.REMAINDER, help="script.py and its arguments, or a command"
    )


def _int_option(value: object, flag: str, pet: str) -> int | None:
    """The flag's value, else the PET_* variable Kubeflow sets, as an int; None if neither."""
    text = os.environ.get(pet, "").strip() if value is None else str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        source = pet if value is None else flag
        raise ValueError(f"ringlet run: {source}={text!r} is not an integer") from None


def _nnodes(value: str | None) -> int:
    """--nnodes (or PET_NNODES) as a count: "M" or torchrun's "M:M"; an elastic range is refused."""
    text = (value if value is not None else os.environ.get("PET_NNODES", "")).strip() or "1"
    low, _, high = text.partition(":")
    if not low.isdigit() or (high and not high.isdigit()):
        raise ValueError(f"ringlet run: --nnodes must be M or M:M, got {text!r}")
    if high and int(high) != int(low):
        raise ValueError(
            f"ringlet run: --nnodes {text} is an elastic range; ringlet run starts a fixed number"
            " of nodes. Start elastic jobs with torchrun: ringlet.init() works under it (each"
            " restart is a new job)"
        )
    return int(low)


def _master_option(args: argparse.Namespace) -> str | None:
    """torch's master as host:port from --master, --rdzv-endpoint, --master-addr/-port or PET_*."""
    addr = args.master_addr or os.environ.get("PET_MASTER_ADDR", "").strip() or None
    port = _int_option(args.master_port, "--master-port", "PET_MASTER_PORT")
    endpoint = args.master or args.rdzv_endpoint
    if endpoint is not None:
        if args.master_addr or args.master_port is not None:
            raise ValueError("ringlet run: give --master (or --rdzv-endpoint) or"
                             " --master-addr/--master-port, not both")  # fmt: skip
        return str(endpoint)
    if addr is None and port is None:
        return None
    if addr is None or port is None:
        raise ValueError(
            f"ringlet run: the master needs both an address and a port; got"
            f" --master-addr {addr} --master-port {port} (PET_MASTER_ADDR/PET_MASTER_PORT count)"
        )
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def run_main(args: argparse.Namespace) -> int:
    """Entry point of `ringlet run`: the parsed command line → launch(); 2 on bad arguments."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        nproc = _int_option(args.nproc_per_node, "--nproc-per-node", "PET_NPROC_PER_NODE")
        if nproc is None:
            raise ValueError(
                "ringlet run: how many ranks? give -n N (--nproc-per-node N); usage: ringlet run"
                " -n N script.py args…"
            )
        nnodes = _nnodes(args.nnodes)
        if args.standalone and nnodes != 1:
            raise ValueError("ringlet run: --standalone is one node; drop --nnodes")
        node_rank = _int_option(args.node_rank, "--node-rank", "PET_NODE_RANK") or 0
        return launch(
            command,
            nproc,
            nnodes=nnodes,
            node_rank=node_rank,
            master=None if args.standalone else _master_option(args),
            prefix=args.prefix,
            grace=args.grace,
            secret=args.secret,
            timeout=args.timeout,
            transport=args.transport,
            store_port=args.store_port,
            job_id=args.rdzv_id,
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _store_port(host: str, port: int, given: int | None, picked: bool) -> int:
    """ringlet's store port: ``given``, else a free one when the master was picked, else port + 1."""
    if given is not None:
        if not 0 < given < 65536 or given == port:
            raise ValueError(f"ringlet run: --store-port {given} is not a port other than {port}")
        return given
    if picked:
        while (ours := _free_port()) == port:
            pass
        return ours
    if port + 1 > 65535:
        raise ValueError(
            f"ringlet run: --master-port {port} leaves no next port; pass --store-port"
        )
    return port + 1


def _master_address(master: str | None, nnodes: int) -> tuple[str, int]:
    """(host, port) of torch's master; on one node a free local port is picked when not given."""
    if master is None:
        if nnodes > 1:
            raise ValueError(
                "ringlet run: --nnodes > 1 needs --master-addr HOST --master-port PORT (or"
                " --master HOST:PORT), the same on every node: an address of node 0 that the other"
                " nodes can reach"
            )
        return "127.0.0.1", _free_port()
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


def _pump_blocks(source: IO[bytes], sink: _Sink, prefix: bytes, tail: deque[str]) -> None:
    """Forward a rank's stderr in bursts: lines written together (a traceback) stay together.

    Whatever arrived is written as one block, each line prefixed, once the stream has been quiet
    for 50 ms (or the block is 0.5 s old or 64 KiB), so other ranks' lines never land inside it.
    """
    fd = source.fileno()
    pending, since = b"", 0.0

    def flush(data: bytes, final: bool) -> bytes:
        """Write the complete lines of ``data`` as one block; return the unfinished rest."""
        cut = len(data) if final or len(data) >= _MAX_BLOCK else data.rfind(b"\n") + 1
        body, rest = data[:cut], data[cut:]
        lines = body.split(b"\n")
        if body.endswith(b"\n"):
            lines.pop()
        for line in lines:
            tail.append(line.decode(errors="replace").rstrip("\r"))
        if lines:
            sink.write(b"".join(prefix + line + b"\n" for line in lines))
        return rest

    with source:
        while True:
            wait = None
            if pending:
                wait = max(0.0, min(_QUIET, since + _BLOCK_AGE - time.monotonic()))
            ready, _, _ = select.select([fd], [], [], wait)
            if pending and (not ready or time.monotonic() - since >= _BLOCK_AGE):
                pending = flush(pending, final=False)
                since = time.monotonic()
            if not ready:
                continue
            chunk = os.read(fd, _MAX_BLOCK)
            if not chunk:
                break
            if not pending:
                since = time.monotonic()
            pending += chunk
            if len(pending) >= _MAX_BLOCK:
                pending = flush(pending, final=False)
        if pending:
            flush(pending, final=True)


@dataclass
class _Rank:
    """One started rank: its process, output threads, stderr tail and how it ended."""

    rank: int
    proc: subprocess.Popen[bytes]
    threads: list[threading.Thread] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopped_with: int | None = None  # the signal the launcher sent, if it stopped this rank
    stalled: bool = False  # found stopped (SIGSTOP, ^Z) when another rank failed
    exited_at: float | None = None  # monotonic time it exited

    @property
    def failed_alone(self) -> bool:
        """True when the rank failed by itself, not because the launcher stopped it."""
        return self.proc.returncode not in (None, 0) and self.stopped_with is None

    @property
    def victim(self) -> bool:
        """True when it failed because another rank failed, stopped or left (ringlet says so)."""
        return any(_VICTIM.match(line) for line in list(self.tail)[-30:])

    def is_stopped(self) -> bool:
        """True when the process is stopped (state T): it will never answer the others."""
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{self.proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        return False

    def last_error(self) -> str:
        """The last line of its stderr that looks like an exception, for the summary."""
        for line in reversed(self.tail):
            if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Timeout)\b", line):
                return line
        return ""

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
                target=_pump_blocks, args=(proc.stderr, self.err, tag, started.tail), daemon=True
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
                rank.exited_at = time.monotonic()
                running.discard(event)
                if rank.failed_alone and first_failure is None:
                    first_failure = rank
                    rank.join_output(time.monotonic() + _JOIN_OUTPUT)
                    for other in running:
                        self.ranks[other].stalled = self.ranks[other].is_stopped()
                    how = describe_exit(rank.proc.returncode)
                    self.err.line(
                        f"ringlet run: rank {rank.rank} failed ({how}) because of another rank;"
                        " ending the job"
                        if rank.victim
                        else f"ringlet run: rank {rank.rank} failed first ({how})"
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
        culprit = self._culprit(first_failure)
        self._print_summary(culprit, first_failure)
        if first_failure is not None:
            failed = culprit if culprit is not None and culprit.failed_alone else first_failure
            code = failed.proc.returncode
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

    def _culprit(self, first_failure: _Rank | None) -> _Rank | None:
        """The rank that caused the end: the first to fail by itself, else one that stopped (or
        left early) while the others waited for it; the first failure only when nothing else fits.
        """
        if first_failure is None:
            return None
        failures = sorted(
            (r for r in self.ranks.values() if r.failed_alone and r.exited_at is not None),
            key=lambda r: r.exited_at or 0.0,
        )
        for rank in failures:
            if not rank.victim:
                return rank
        if stalled := [r for r in self.ranks.values() if r.stalled]:
            return stalled[0]
        assert first_failure.exited_at is not None
        left = [r for r in self.ranks.values() if r.proc.returncode == 0 and r.stopped_with is None
                and r.exited_at is not None and r.exited_at <= first_failure.exited_at]  # fmt: skip
        return left[0] if left else first_failure

    def _print_summary(self, culprit: _Rank | None, first_failure: _Rank | None) -> None:
        """Every rank's fate, the rank that caused the end marked; tracebacks are not repeated."""
        lines = ["ringlet run: job summary"]
        for rank in self.ranks.values():  # in rank order, as started
            outcome = describe_exit(rank.proc.returncode)
            if rank.stopped_with is not None:
                sent = _signal_name(rank.stopped_with)
                ended = "" if rank.proc.returncode == -rank.stopped_with else f", then {outcome}"
                outcome = f"terminated by launcher ({sent}{ended})"
            if rank.stalled:
                outcome = f"stopped (not running), {outcome}"
            elif rank.failed_alone and rank.victim:
                kind = rank.last_error().split(":", 1)[0].rsplit(".", 1)[-1]
                outcome += f", because of another rank ({kind})"
            elif rank.failed_alone and (error := rank.last_error()):
                outcome += f": {error if len(error) <= 160 else error[:157] + '...'}"
            if rank is culprit:
                if rank.stalled:
                    outcome += "  <- caused the end: it stalled and the others timed out waiting"
                elif rank.proc.returncode == 0:
                    outcome += "  <- caused the end: it left while the others still needed it"
                else:
                    outcome += "  <- failed first"
            lines.append(f"  rank {rank.rank}: {outcome}")
        if culprit is not None and culprit.failed_alone:
            lines.append(
                f"(rank {culprit.rank}'s traceback is above, in its [r{culprit.rank}] lines)"
            )
        self.err.line("\n".join(lines))

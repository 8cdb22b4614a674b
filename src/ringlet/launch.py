"""`ringlet run`: start N local ranks of a command, forward their output, end the job as one.

Every rank gets the RINGLET_* variables that `ringlet.init()` reads, and torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT (and
OMP_NUM_THREADS=1 when several ranks share the node and it is not set), so scripts written for
torchrun run unchanged. MASTER_ADDR:MASTER_PORT is left to torch (``init_process_group`` binds it
on rank 0); ringlet's own store listens on another port (MASTER_PORT + 1 across nodes, unless
--store-port; a free one on one node), given to the ranks as RINGLET_MASTER and served by node
0's launcher itself, so that losing rank 0 does not take it away. torchrun's flag
spellings and Kubeflow's PET_* defaults (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT) are understood. Each rank runs in its own process group, so a
signal reaches the whole tree a rank started. One rank failing ends the job: the others get
`grace` seconds to finish or report their own errors, then SIGTERM, then SIGKILL. Each rank's
stderr is forwarded in blocks (a traceback is never interleaved with another rank's lines) and a
summary names every rank's fate and the rank that caused the end. With --quiet-others a rank that
failed because of another one (PeerError, CollectiveTimeout, …) or with a traceback another rank
already showed gets one line instead of its traceback. A watchdog process kills every rank's group
if the launcher itself dies, even by SIGKILL.

This module starts and supervises the ranks; beside it, `launch_flags` reads the command line,
`launch_env` decides each rank's environment, `launch_output` forwards the ranks' output and
`launch_outcome` tells how each rank ended and which one caused the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from ringlet.launch_env import command_argv, launcher_store, rank_environments
from ringlet.launch_flags import add_arguments as add_arguments
from ringlet.launch_flags import int_option, master_option, nnodes_option
from ringlet.launch_outcome import TAIL_LINES as TAIL_LINES
from ringlet.launch_outcome import RankProcess, culprit, describe_exit, signal_name, summary
from ringlet.launch_output import QuietOthers, Sink, pump_blocks, pump_lines
from ringlet.rendezvous.env import RESTART_VARIABLE

_JOIN_OUTPUT = 2.0  # seconds to wait for a finished rank's last output to be forwarded
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: A watchdog process: it reads the process group of every rank the launcher starts (``pid``,
#: optionally its start time), and if its input ends without "done" (the launcher died, even by
#: SIGKILL) it kills those groups, except one whose leader's pid now names another process: the
#: rank and its group are gone and the pid reused, and killing it would end a stranger's processes.
_REAPER = """
import os, signal, sys
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return None
groups = {}
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    pid, *start = line.split()
    groups[int(pid)] = start[0] if start else started(pid)
for group, start in groups.items():
    if started(group) not in (None, start):
        continue
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
    max_restarts: int = 0,
    quiet_others: bool = False,
) -> int:
    """Run `cmd` as ranks node_rank*nproc … node_rank*nproc+nproc-1 of nnodes*nproc; wait for all.

    ``master`` is torch's MASTER_ADDR:MASTER_PORT (the same on every node); ringlet's store takes
    ``store_port`` (default MASTER_PORT + 1; on one node without a master, two free ports).
    A command whose first word ends in `.py` runs with this Python. `env` adds variables to (and
    overrides) the launcher's own environment for every rank. ``quiet_others`` shows the first
    failure's traceback in full and one line for each rank failing because of it (or with the
    same traceback). Returns 0 when every rank exits 0,
    else the exit code of the rank that caused the end (128+signal for a signal). Raises
    ValueError for bad arguments, before any rank starts.
    """
    argv = command_argv(cmd)
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
    if max_restarts < 0:
        raise ValueError(f"ringlet run: --max-restarts must be >= 0, got {max_restarts}")
    rank_envs = rank_environments(
        nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        master=master,
        env=env,
        secret=secret,
        timeout=timeout,
        transport=transport,
        store_port=store_port,
        job_id=job_id,
    )
    store = launcher_store(rank_envs, node_rank)  # rank 0 then restarts like any rank
    job = _Job(grace, Sink(sys.stdout), Sink(sys.stderr), prefix, max_restarts)
    job.quiet = QuietOthers() if quiet_others else None
    job.restart_rank_0 = store is not None
    try:
        return job.run(argv, rank_envs, node_rank * nproc)
    finally:
        if store is not None:
            store.close()


def run_main(args: argparse.Namespace) -> int:
    """Entry point of `ringlet run`: the parsed command line → launch(); 2 on bad arguments."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        nproc = int_option(args.nproc_per_node, "--nproc-per-node", "PET_NPROC_PER_NODE")
        if nproc is None:
            raise ValueError(
                "ringlet run: how many ranks? give -n N (--nproc-per-node N); usage: ringlet run"
                " -n N script.py args…"
            )
        nnodes = nnodes_option(args.nnodes)
        if args.standalone and nnodes != 1:
            raise ValueError("ringlet run: --standalone is one node; drop --nnodes")
        node_rank = int_option(args.node_rank, "--node-rank", "PET_NODE_RANK") or 0
        return launch(
            command,
            nproc,
            nnodes=nnodes,
            node_rank=node_rank,
            master=None if args.standalone else master_option(args),
            prefix=args.prefix,
            grace=args.grace,
            secret=args.secret,
            timeout=args.timeout,
            transport=args.transport,
            store_port=args.store_port,
            job_id=args.rdzv_id,
            max_restarts=args.max_restarts,
            quiet_others=args.quiet_others,
        )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2


@dataclass(frozen=True)
class _Received:
    """A signal the launcher received, queued by its handler for the supervising loop."""

    signum: int


def _wait_for_exit(rank: RankProcess, events: queue.SimpleQueue[int | _Received]) -> None:
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

    def __init__(
        self, grace: float, out: Sink, err: Sink, prefix: bool, max_restarts: int = 0
    ) -> None:
        self.grace, self.max_restarts = grace, max_restarts
        self.restarts: dict[int, int] = {}  # rank -> times restarted
        self.started: dict[int, tuple[list[str], dict[str, str]]] = {}  # rank -> argv, env
        self.out, self.err, self.prefix = out, err, prefix
        self.ranks: dict[int, RankProcess] = {}
        self.events: queue.SimpleQueue[int | _Received] = queue.SimpleQueue()
        self.reaper: IO[str] | None = None
        self.quiet: QuietOthers | None = None  # --quiet-others
        self.restart_rank_0 = False  # the store lives here, not in rank 0's process

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
        self.started[rank] = (argv, rank_env)
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
        started = RankProcess(rank, proc)
        if self.reaper is not None:  # the rank leads its own process group: pgid = pid
            with contextlib.suppress(OSError):
                self.reaper.write(f"{proc.pid} {started.start_time}".strip() + "\n")
                self.reaper.flush()
        tag = f"[r{rank}] ".encode() if self.prefix else b""
        assert proc.stdout is not None and proc.stderr is not None
        started.threads = [
            threading.Thread(
                target=pump_lines, args=(proc.stdout, self.out, tag, None), daemon=True
            ),
            threading.Thread(
                target=pump_blocks,
                args=(proc.stderr, self.err, tag, started.tail, self.quiet and (self.quiet, rank)),
                daemon=True,
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
        first_failure: RankProcess | None = None
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
                if rank.failed_alone and stage == "running" and self._restart(rank):
                    running.add(event)
                    continue
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
                    f"ringlet run: received {signal_name(received)}, passing it to every rank"
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
        blamed = culprit(self.ranks, first_failure)
        self._show_held_traceback(blamed)
        self.err.line(summary(self.ranks, blamed))
        if first_failure is not None:
            failed = blamed if blamed is not None and blamed.failed_alone else first_failure
            code = failed.proc.returncode
            return code if code > 0 else 128 - code
        assert received is not None
        return 128 + received

    def _show_held_traceback(self, blamed: RankProcess | None) -> None:
        """--quiet-others, when no rank failed by itself (one stalled or left): the first held-back
        traceback in full after all, so that one failure is always shown whole."""
        if self.quiet is None or (blamed is not None and blamed.failed_alone and not blamed.victim):
            return
        held = self.quiet.held_first()
        if held is not None:
            rank, lines = held
            tag = f"[r{rank}] ".encode() if self.prefix else b""
            self.err.write(b"".join(tag + line + b"\n" for line in lines))

    def _restart(self, rank: RankProcess) -> bool:
        """Start a failed rank again, alone, if it has restarts left (rank 0 only when the store
        lives in the launcher): the others carry on (ringlet.elastic) and the new one rejoins."""
        done = self.restarts.get(rank.rank, 0)
        if (rank.rank == 0 and not self.restart_rank_0) or done >= self.max_restarts:
            return False
        self.restarts[rank.rank] = done + 1
        rank.join_output(time.monotonic() + _JOIN_OUTPUT)
        self.err.line(
            f"ringlet run: rank {rank.rank} failed ({describe_exit(rank.proc.returncode)});"
            f" restarting it ({done + 1} of {self.max_restarts})"
        )
        argv, env = self.started[rank.rank]
        return self._start(rank.rank, argv, {**env, RESTART_VARIABLE: str(done + 1)})

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

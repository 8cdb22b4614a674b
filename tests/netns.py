"""Simulated hosts on one machine: Linux network namespaces joined by a bridge, for multi-host runs.

``with Hosts(3, rate="2gbit") as hosts: hosts.popen(1, [...])`` makes three "hosts", each with its
own network namespace (address 10.77.0.{h+1}/24 on eth0, loopback up), hostname (UTS namespace),
/dev/shm (a fresh tmpfs in its own mount namespace) and System V IPC namespace, so that anything
telling hosts apart by hostname, addresses or shared memory sees three machines. Each host's eth0
is one end of a veth pair whose other end is a port of a Linux bridge in a "switch" namespace;
an optional ``tc tbf`` cap on both ends limits each direction of each host's link. Nothing is
created in the caller's own network namespace, and every name carries the owner's pid, so two
runs at once never meet and a crashed run's leftovers (owner pid gone) are removed by the next.
Needs root, ``ip`` (iproute2), ``tc`` for caps, ``nsenter`` and ``unshare`` (util-linux).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "ringlet"
SUBNET = "10.77.0"  # host h is SUBNET.(h+1); the /24 lives only inside namespaces made here
_NETNS_DIR = Path("/run/netns")
#: Variables a launcher sets; a process started on a simulated host must not inherit the caller's.
LAUNCHER_VARS = ("RINGLET_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_",
                 "SLURM_", "OMPI_", "PMI_", "PMIX_", "HYDRA_", "TORCHELASTIC")  # fmt: skip
#: Holds a host's UTS, IPC and mount namespaces: set the hostname, give it its own /dev/shm, wait.
_HOLDER = 'hostname "$1" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && echo ready && exec sleep infinity'


def unavailable() -> str | None:
    """Why simulated hosts cannot be made here (not root, a tool missing), or None when they can."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CI runs as root)"
    for tool in ("ip", "nsenter", "unshare", "hostname", "sleep"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    """Run one `ip`/`tc` command; raise with its stderr when it fails."""
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces(prefix: str = PREFIX) -> list[str]:
    """Network namespaces named by this module with `prefix` (any owner)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    pattern = re.compile(rf"^{re.escape(prefix)}-\d+-\w+$")
    return [name for line in listed.splitlines() if pattern.match(name := line.split()[0])]


def _remove_namespace(name: str) -> None:
    """Kill what still runs inside network namespace `name` (all started by its owner), delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in (int(p) for p in pids.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Deleting the namespace deletes its interfaces, and with them the veth peers elsewhere.
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces `prefix`-PID-… whose owner PID is gone (a crashed run); return their names."""
    stale = [n for n in namespaces(prefix) if not _pid_alive(int(n.split("-")[-2]))]
    for name in stale:
        _remove_namespace(name)
    return stale


def tbf_args(rate: str, *, burst: str | None = None, latency: str = "20ms") -> list[str]:
    """`tc qdisc … root` arguments capping a link at `rate` (tc syntax: "2gbit").

    The burst must hold at least one GSO segment (64 KiB on veth) or the link stalls; one
    millisecond at the rate, at least 128 KiB, keeps the shaper smooth without letting bursts pass.
    """
    if burst is None:
        bits = _rate_bits(rate)
        burst = f"{max(128 << 10, int(bits / 8 / 1000))}b"
    return ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]


def _rate_bits(rate: str) -> float:
    """'2gbit' → 2e9 bits per second (tc's decimal units)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)bit\s*", rate.lower())
    if match is None:
        raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 500mbit or 2gbit")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without launcher variables, plus `extra` (PATH, PYTHONPATH and the
    venv stay, so the repository's editable install imports inside a host)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    return env | (extra or {})


@dataclass
class Host:
    """One simulated host: its network namespace, hostname, address and the process holding it."""

    index: int
    netns: str
    hostname: str
    address: str
    holder: subprocess.Popen[str]


class Hosts:
    """`count` simulated hosts on one bridge; a context manager that removes everything on exit.

    `rate` (tc syntax, e.g. "2gbit") caps every host's link in both directions: tbf on the host's
    eth0 (what it sends) and on its switch port (what it receives).
    """

    def __init__(
        self, count: int, *, rate: str | None = None, prefix: str = PREFIX, mtu: int | None = None
    ) -> None:
        if not 1 <= count <= 250:
            raise ValueError(f"Hosts: count must be in 1…250, got {count}")
        self.count, self.rate, self.prefix, self.mtu = count, rate, prefix, mtu
        self.tag = f"{prefix}-{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, host: int) -> str:
        """The address of `host` on the bridge."""
        return f"{SUBNET}.{host + 1}"

    def _make(self) -> None:
        cleanup_stale(self.prefix)
        for name in (n for n in namespaces(self.prefix) if n.startswith(self.tag + "-")):
            _remove_namespace(name)  # this pid's own leftovers, from an earlier Hosts that failed
        self._netns(self.switch)
        _ip("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in range(self.count):
            netns, port = f"{self.tag}-h{h}", f"p{h}"
            self._netns(netns)
            _ip("ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                "netns", self.switch)  # fmt: skip
            _ip("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("ip", "-n", netns, "addr", "add", f"{self.address(h)}/24", "dev", "eth0")
            if self.mtu:
                _ip("ip", "-n", netns, "link", "set", "eth0", "mtu", str(self.mtu))
                _ip("ip", "-n", self.switch, "link", "set", port, "mtu", str(self.mtu))
            _ip("ip", "-n", netns, "link", "set", "eth0", "up")
            if self.rate:
                _ip("tc", "-n", netns, "qdisc", "add", "dev", "eth0", *tbf_args(self.rate))
                _ip("tc", "-n", self.switch, "qdisc", "add", "dev", port, *tbf_args(self.rate))
            self.hosts.append(self._hold(h, netns))

    def _netns(self, name: str) -> None:
        _ip("ip", "netns", "add", name)
        self._made.append(name)
        _ip("ip", "-n", name, "link", "set", "lo", "up")

    def _hold(self, h: int, netns: str) -> Host:
        """Start the process whose UTS, IPC and mount namespaces (hostname, /dev/shm) host `h` is."""
        hostname = f"{self.prefix}-h{h}"
        holder = subprocess.Popen(
            ["nsenter", f"--net={_NETNS_DIR / netns}", "unshare", "--uts", "--ipc", "--mount",
             "--propagation", "private", "sh", "-c", _HOLDER, "holder", hostname],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._procs.append(holder)
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            holder.kill()
            _, err = holder.communicate()
            raise RuntimeError(f"could not set up host {h} ({netns}): {err.strip()}")
        return Host(h, netns, hostname, self.address(h), holder)

    def command(self, host: int, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """`argv` wrapped to run inside `host` (its network, UTS, IPC and mount namespaces)."""
        pid = self.hosts[host].holder.pid
        wd = cwd or os.getcwd()
        return ["nsenter", "-t", str(pid), "-n", "-u", "-i", "-m", f"--wd={wd}", "--", *argv]

    def popen(
        self,
        host: int,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` on `host` with `env` (default: `clean_env()`), in its own session so that
        closing the hosts ends everything it started; the caller still waits for it."""
        proc = subprocess.Popen(
            self.command(host, argv, cwd),
            env=clean_env() if env is None else env,
            start_new_session=True,
            **kwargs,
        )
        proc._ringlet_group = True  # type: ignore[attr-defined]  # it leads its own group
        self._procs.append(proc)
        return proc

    def run(
        self, host: int, argv: Sequence[str], *, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on `host` to completion and return its output (text)."""
        proc = self.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        """End every process started here, then delete the namespaces (and with them the veths)."""
        for proc in reversed(self._procs):
            _end(proc)
        self._procs.clear()
        for name in reversed(self._made):
            _remove_namespace(name)
        self._made.clear()
        self.hosts.clear()


def _end(proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL `proc` and, when it leads one, its process group; then reap it."""
    group = proc.pid if getattr(proc, "_ringlet_group", False) else None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM) if group else proc.terminate()
        end = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)  # stragglers the process left in its group
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def layout_hosts(layout: str | Sequence[int]) -> list[int]:
    """The host of each rank: "2+1+1" (ranks per host, filled in order) → [0, 0, 1, 2]; a list such
    as [0, 1, 0, 1] is taken as the host of each rank as it is."""
    if isinstance(layout, str):
        counts = [int(c) for c in layout.split("+")]
        return [h for h, c in enumerate(counts) for _ in range(c)]
    return list(layout)


@dataclass
class RankOutcome:
    """How one rank of a Job ended: its return code (None: killed after the deadline) and output."""

    rank: int
    host: int
    returncode: int | None
    stdout: str
    stderr: str

    def describe(self) -> str:
        """'ok', 'exit code C', 'killed by SIGNAME' or 'timed out' for the report."""
        if self.returncode is None:
            return "timed out (killed)"
        if self.returncode >= 0:
            return "ok" if self.returncode == 0 else f"exit code {self.returncode}"
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"killed by signal {-self.returncode}"


class Job:
    """One process per rank, each on its host; output to files so that nothing blocks on a pipe.

    `envs[r]` is rank r's environment. `wait` ends the job when every rank has exited, when one
    failed and the rest did not follow within `grace` seconds, or at the deadline.
    """

    def __init__(
        self, hosts: Hosts, ranks_hosts: Sequence[int], argv: Sequence[str],
        envs: Sequence[dict[str, str]], logdir: Path,
    ) -> None:  # fmt: skip
        self.hosts, self.ranks_hosts, self.logdir = hosts, list(ranks_hosts), logdir
        self.procs: list[subprocess.Popen[Any]] = []
        for rank, host in enumerate(self.ranks_hosts):
            with (
                open(logdir / f"r{rank}.out", "w") as out,
                open(logdir / f"r{rank}.err", "w") as err,
            ):
                self.procs.append(hosts.popen(host, argv, env=envs[rank], stdout=out, stderr=err,
                                              stdin=subprocess.DEVNULL))  # fmt: skip

    def wait(self, timeout: float, grace: float = 5.0) -> list[RankOutcome]:
        """Wait for every rank (at most `timeout` seconds); kill what is left; every rank's outcome."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(p.poll() is None for p in self.procs):
            if any(p.returncode not in (None, 0) for p in self.procs):
                end = min(end, time.monotonic() + grace)  # one failed: the rest get `grace`
            time.sleep(0.05)
        outcomes = []
        for rank, proc in enumerate(self.procs):
            timed_out = proc.poll() is None
            if timed_out:
                # A stack dump first (faulthandler.register(SIGUSR1) in the worker), then the end.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(0.3)
            _end(proc, grace=0.5)
            outcomes.append(RankOutcome(
                rank, self.ranks_hosts[rank], None if timed_out else proc.returncode,
                (self.logdir / f"r{rank}.out").read_text(errors="replace"),
                (self.logdir / f"r{rank}.err").read_text(errors="replace"),
            ))  # fmt: skip
        return outcomes


def report(outcomes: Sequence[RankOutcome], tail: int = 60) -> str:
    """Every rank's fate and the last `tail` lines of its stderr, prefixed [rankN] as torch does."""
    lines = []
    for o in outcomes:
        lines.append(f"[rank{o.rank}] host {o.host}: {o.describe()}")
        lines += [f"[rank{o.rank}] {line}" for line in o.stderr.splitlines()[-tail:]]
    return "\n".join(lines)


@contextlib.contextmanager
def hosts(count: int, **kwargs: Any) -> Iterator[Hosts]:
    """`with hosts(2, rate="2gbit") as h:` — the same as `with Hosts(…)`."""
    with Hosts(count, **kwargs) as made:
        yield made


if __name__ == "__main__":
    # `python tests/netns.py` removes leftovers of crashed runs and lists what remains.
    removed = cleanup_stale()
    print("removed:", " ".join(removed) or "nothing", "| left:", " ".join(namespaces()) or "none")

"""Surviving a lost rank: the survivors agree on who is alive and carry on in a smaller communicator.

``shrink(comm)`` is an agreement through the rendezvous store, in rounds. In a round, each
survivor registers (with a few bytes of its own, e.g. the steps it has completed); a member that
has not registered is waited for until it registers, until it is *gone* — a connection to its
listener is refused, which a process that exited or was killed always gives and a stopped or slow
one never does — or until the timeout. Then any survivor proposes the registered ranks, and the
store's compare-and-set keeps the first proposal: every survivor reads the same membership. The
members then acknowledge it; a member that dies before acknowledging voids the round (again
decided by compare-and-set) and the next round agrees among the rest. Under ``ringlet run`` the
store lives in the launcher and rank 0 is lost like any rank; elsewhere it lives in global rank
0's process, and if rank 0 is lost shrink cannot agree and raises a PeerError naming it.

``Elastic`` wraps a training loop: it snapshots the state before each step, and when a step fails
on a lost rank it shrinks, rolls every survivor back to the start of the earliest step any
survivor has not completed, rebuilds the model wrapper (e.g. ``DistributedDataParallel``) on the
new communicator, and redoes that step. Replacements for lost ranks (``rejoin``, ``grow``) live in
``ringlet.rejoin`` and are importable from here too.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import socket
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from .comm import WORLD_ID, Communicator
from .errors import CollectiveTimeout, PeerError, RingletError
from .rejoin import RESTART_VARIABLE, _joined, grow, init_or_rejoin, pending, rejoin  # noqa: F401

__all__ = ["Elastic", "elastic", "grow", "init_or_rejoin", "pending", "rejoin", "shrink"]
__all__ += ["torch_ddp"]

#: How often a waiting survivor looks at the store again (seconds).
POLL = 0.005
#: How often a member that has not registered is probed (seconds).
PROBE_EVERY = 0.05
#: Test hooks, by point: "registered" runs right after this rank registered in a round.
FAULTS: dict[str, Callable[[], None]] = {}

_shrunk: weakref.WeakKeyDictionary[Communicator, Communicator] = weakref.WeakKeyDictionary()


def shrink(comm: Communicator, *, timeout: float | None = None) -> Communicator:
    """A new communicator of exactly the members of ``comm`` still alive, in their old order.

    Every surviving member of ``comm`` must call it (typically after a PeerError). A member that
    is slow but alive is waited for up to ``timeout`` (default: the communicator's). Every caller
    gets the same membership, or an error: PeerError if this rank was left out (it came after the
    timeout) or if the rendezvous store is lost with its host (global rank 0, except under
    ``ringlet run``, whose launcher hosts it). A communicator is
    shrunk once (again: RingletError); shrink the new one when it fails in its turn.
    """
    return agree(comm, b"", timeout=timeout)[0]


def agree(
    comm: Communicator, info: bytes, *, timeout: float | None = None
) -> tuple[Communicator, dict[int, bytes]]:
    """``shrink``, also handing every survivor what each member passed as ``info``, by new rank."""
    if comm in _shrunk:
        raise RingletError(f"rank {comm.rank}: this communicator was already shrunk")
    wait = comm.timeout if timeout is None else float(timeout)
    deadline = time.monotonic() + wait
    world, me = comm.world, comm.world.rank
    candidates = list(comm.members)
    probe = _Prober(world)
    try:
        for rnd in range(len(candidates)):
            prefix = f"shrink/{comm.id:x}/{rnd}/"
            world.store.set(f"{prefix}in/{me}", info)
            if (hook := FAULTS.get("registered")) is not None:
                hook()
            members, infos = _decide(world.store, prefix, candidates, probe, deadline)
            if me not in members:
                raise PeerError(
                    f"global rank {me}: the other survivors of communicator {comm.id:#x} agreed "
                    f"on ranks {members} without this rank (it came after the {wait:g} s "
                    "timeout); it cannot rejoin this way",
                    rank=comm.rank,
                )
            world.store.set(f"{prefix}ack/{me}", b"1")
            if _confirmed(world.store, prefix, members, probe, deadline):
                break
            candidates = members
        else:  # pragma: no cover - each round removes a rank, so the loop ends by confirming
            raise RingletError("shrink: no agreement")
    except PeerError as exc:
        if "rendezvous store" in str(exc):
            raise _store_lost(comm, exc) from exc
        raise
    except (OSError, RingletError, TimeoutError) as exc:
        if isinstance(exc, RingletError) and "shrink" in str(exc):
            raise
        raise _store_lost(comm, exc) from exc
    raw = f"{comm.id}/shrink/{rnd}".encode()
    new_id = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2
    new = Communicator(world, new_id, members)
    _shrunk[comm] = new
    if comm.id != WORLD_ID:
        comm.close()  # the world communicator stays open: closing it would leave the job
    return new, {members.index(g): infos[g] for g in members}


def _store_lost(comm: Communicator, exc: BaseException) -> PeerError:
    launcher = comm.world.store_in_launcher
    why = (
        "which `ringlet run` serves, is unreachable: the launcher has ended"
        if launcher
        else "which lives in global rank 0's process, is unreachable. A job that loses rank 0 "
        "cannot shrink; restart it (from a checkpoint), or start it with `ringlet run`"
    )
    zero = comm.members.index(0) if 0 in comm.members and not launcher else None
    return PeerError(
        f"global rank {comm.world.rank}: shrink cannot agree on the survivors: the rendezvous "
        f"store, {why} ({exc}).",
        rank=zero,
    )


class _Prober:
    """Tells a process that is gone (its listener refuses connections) from one that is slow."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self.dead: set[int] = set()
        self._last: dict[int, float] = {}

    def gone(self, g: int) -> bool:
        if g in self.dead:
            return True
        now = time.monotonic()
        if now - self._last.get(g, -1.0) < PROBE_EVERY:
            return False
        self._last[g] = now
        try:
            sock = socket.create_connection(self.world.addresses[g], timeout=0.5)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                self.dead.add(g)
                return True
            return False  # unreachable or slow: only the timeout removes it
        _say_goodbye(sock, self.world.secret)
        return False


def _say_goodbye(sock: socket.socket, secret: bytes) -> None:
    """Finish a probe as an honest peer (so the prober is not logged as a stranger); a stopped
    process cannot answer the handshake, and its listener then drops the probe when it wakes."""
    from .auth import authenticate
    from .transport.tcp_connect import AUTH_CONTEXT, HELLO

    try:
        authenticate(sock, secret, initiator=True, timeout=0.2, context=AUTH_CONTEXT)
        sock.sendall(HELLO.pack(0, 0))  # communicator 0 is never taken: the listener keeps one
    except (OSError, RingletError):
        pass
    finally:
        sock.close()


def _decide(
    store: Any, prefix: str, candidates: list[int], probe: _Prober, deadline: float
) -> tuple[list[int], dict[int, bytes]]:
    """The round's membership: the first proposal of the registered ranks, once every candidate
    registered or is gone (or the time is up)."""
    key = prefix + "members"
    while True:
        held = store.try_get(key)
        if held is None:
            got = {g: v for g in candidates if (v := store.try_get(f"{prefix}in/{g}")) is not None}
            waiting = [g for g in candidates if g not in got and not probe.gone(g)]
            if waiting and time.monotonic() < deadline:
                time.sleep(POLL)
                continue
            proposal = {
                "members": [g for g in candidates if g in got],
                "info": {str(g): v.hex() for g, v in got.items()},
            }
            held = store.compare_set(key, b"", json.dumps(proposal).encode())
        decided = json.loads(held)
        return decided["members"], {int(g): bytes.fromhex(v) for g, v in decided["info"].items()}


def _confirmed(
    store: Any, prefix: str, members: list[int], probe: _Prober, deadline: float
) -> bool:
    """True once every member acknowledged the round; False (the same on every member) when one
    was lost before it did."""
    key = prefix + "outcome"
    while True:
        held = store.try_get(key)
        if held is None:
            unacked = [g for g in members if store.try_get(f"{prefix}ack/{g}") is None]
            if not unacked:
                proposal = b"ok"
            elif any(probe.gone(g) for g in unacked) or time.monotonic() >= deadline:
                proposal = b"retry"
            else:
                time.sleep(POLL)
                continue
            held = store.compare_set(key, b"", proposal)
        return bool(held == b"ok")


# -- training that carries on ------------------------------------------------------------------
class _Snapshot:
    """A copy of the training state: arrays copied, ``state_dict()`` objects deep-copied."""

    def __init__(self, state: Sequence[Any]) -> None:
        self.parts: list[Any] = []
        for item in state:
            if isinstance(item, dict):
                self.parts.append({k: np.array(v, copy=True) for k, v in item.items()})
            elif hasattr(item, "state_dict"):
                self.parts.append(copy.deepcopy(item.state_dict()))
            else:
                raise TypeError(
                    f"elastic state: a dict of arrays or an object with state_dict(), not "
                    f"{type(item).__name__}"
                )

    @classmethod
    def of(cls, parts: list[Any]) -> _Snapshot:
        snap = cls(())
        snap.parts = parts
        return snap

    def restore(self, state: Sequence[Any]) -> None:
        for item, saved in zip(state, self.parts, strict=True):
            if isinstance(item, dict):
                for k, v in saved.items():
                    item[k][...] = v
            else:
                item.load_state_dict(copy.deepcopy(saved))


class Elastic:
    """A training loop that survives lost ranks; see :func:`elastic`."""

    def __init__(
        self,
        comm: Communicator,
        state: Sequence[Any] | dict[str, Any] | Any,
        rebuild: Callable[[Communicator], Any] | None = None,
        *,
        timeout: float | None = None,
        admit_every: int = 1,
    ) -> None:
        self.comm = comm
        self.state = (
            [state] if isinstance(state, dict) or hasattr(state, "state_dict") else list(state)
        )
        self._rebuild = rebuild
        self.timeout = timeout
        self.admit_every = admit_every  # steps between looks for replacements (0: never)
        self.step = 0  # steps completed by this rank
        self.shrinks: list[dict[str, Any]] = []  # one record per recovery: when, who was lost
        self.grows: list[dict[str, Any]] = []  # one record per admission: step, who came back
        self._snaps: dict[int, _Snapshot] = {}
        self._looked: tuple[int, int] | None = None  # (communicator, step) admitted at last
        if comm in _joined:  # a replacement: a member sends the step and the state
            root = comm.members.index(_joined.pop(comm))
            self.step, parts = comm.broadcast_object(None, root=root)
            _Snapshot.of(parts).restore(self.state)
            self._looked = (comm.id, self.step)  # the members looked at this step already
        self.model: Any = rebuild(comm) if rebuild is not None else None

    def steps(self, n: int) -> Iterator[int]:
        """Yield the step numbers 0..n-1 to run, each under :meth:`guard`; a step lost to a dead
        rank is yielded again. Ends with a barrier, so every survivor knows every step completed."""
        while True:
            while self.step < n:
                due = self.admit_every and self.step % self.admit_every == 0
                if due and self._looked != (self.comm.id, self.step):
                    try:
                        self._admit()
                    except RingletError as exc:
                        if not self.comm.failed:
                            raise
                        self._recover(exc)
                        continue
                self._snaps[self.step] = _Snapshot(self.state)
                self._snaps.pop(self.step - 2, None)
                yield self.step
            try:
                self.comm.barrier()
                return
            except RingletError as exc:
                try:
                    self._recover(exc)
                except PeerError:
                    # A rank that entered the barrier had completed every step, and rank 0 (the
                    # store) may have finished and left: this rank's steps are all done too.
                    if self.step == n and not isinstance(exc, CollectiveTimeout):
                        return
                    raise

    def guard(self) -> _Guard:
        """Context manager around one step's body: completes the step, or, when a rank is lost,
        recovers (shrink, roll back) and swallows the error so ``steps`` yields the step again."""
        return _Guard(self)

    def run(self, body: Callable[[int, Communicator], Any], n: int) -> None:
        """Run ``body(step, comm)`` for n steps, redoing a step a lost rank interrupted."""
        for step in self.steps(n):
            with self.guard():
                body(step, self.comm)

    def _admit(self) -> None:
        """Grow to the replacements waiting, hand them the step and the state, rebuild."""
        old, new = self.comm, grow(self.comm)
        self._looked = (new.id, self.step)
        if new is old:
            return
        self.comm = new
        root = new.members.index(old.members[0])  # not a replacement (global rank 0 may be one)
        new.broadcast_object((self.step, _Snapshot(self.state).parts), root=root)
        self._rebuilt(new)
        self.grows.append({"step": self.step, "members": new.members, "at": time.time()})

    def _rebuilt(self, new: Communicator) -> None:
        if self._rebuild is not None:
            # The old wrapper must not average on the old communicator: its gradient hooks stay on
            # the parameters while anything (a traceback, a graph) keeps it alive.
            for handle in getattr(self.model, "_hooks", ()):  # ringlet DDP's
                handle.remove()
            if hasattr(self.model, "_remove_autograd_hooks"):  # torch DDP's reducer, which would
                self.model._remove_autograd_hooks()  # reduce into a failed group (a crash)
            self.model = self._rebuild(new)

    def _recover(self, exc: BaseException) -> None:
        """Shrink, agree on the step to redo (the earliest any survivor has not completed) and
        roll this rank's state back to that step's start."""
        lost_at = time.time()
        old = self.comm
        new, infos = agree(old, str(self.step).encode(), timeout=self.timeout)
        redo = min(int(v) for v in infos.values())
        self._snaps[redo].restore(self.state)
        for k in [k for k in self._snaps if k > redo]:
            del self._snaps[k]
        self.comm, self.step = new, redo
        self._rebuilt(new)
        self.shrinks.append(
            {
                "error": f"{type(exc).__name__}: {exc}",
                "redo": redo,
                "at": lost_at,
                "members": new.members,
                "lost": [g for g in old.members if g not in new.members],
            }
        )

    def __enter__(self) -> Elastic:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Guard:
    def __init__(self, job: Elastic) -> None:
        self.job = job

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            self.job.step += 1
            return False
        if not self.job.comm.failed:  # a bug, not a lost rank
            return False
        self.job._recover(exc)
        return True


def elastic(
    comm: Communicator,
    state: Sequence[Any] | dict[str, Any] | Any,
    rebuild: Callable[[Communicator], Any] | None = None,
    *,
    timeout: float | None = None,
    admit_every: int = 1,
) -> Elastic:
    """A training loop that carries on when ranks are lost.

    ``state`` is what a step changes (a dict of NumPy arrays, or objects with ``state_dict()`` /
    ``load_state_dict()`` such as a torch module and its optimizer, or a list of them).
    ``rebuild(comm)`` makes what the step uses on a communicator — e.g.
    ``lambda c: DistributedDataParallel(model, comm=c)`` — once now and again after every shrink;
    its result is ``job.model``. Every ``admit_every`` steps the members admit replacements
    waiting in :func:`rejoin` (one small broadcast); a replacement calls ``elastic`` on the
    communicator ``rejoin`` returned and starts with the members' step and state. The body reads
    ``job.comm`` for the current communicator::

        job = ringlet.elastic(comm, [model, opt], lambda c: DistributedDataParallel(model, comm=c))
        for step in job.steps(100):
            with job.guard():
                opt.zero_grad(); loss_fn(job.model(x[step]), y[step]).backward(); opt.step()
    """
    return Elastic(comm, state, rebuild, timeout=timeout, admit_every=admit_every)


def torch_ddp(model: Any, comm: Communicator, **kwargs: Any) -> Any:
    """torch's own ``DistributedDataParallel`` of ``model`` on a RingletProcessGroup over ``comm``
    (no ``init_process_group``), for ``elastic``'s rebuild: ``lambda c: torch_ddp(model, c)``.

    It averages gradients through a Python comm hook: torch's built-in C++ averaging crashes the
    process (SIGSEGV, torch 2.13) when a Python process group's all_reduce fails, as it does when a
    rank is lost; through a hook the loss is an exception that ``elastic`` recovers from. Keyword
    arguments go to torch's constructor. For a hook of your own (a Python hook, torch's included,
    is safe), build torch's DDP the same way and register yours instead.
    """
    import torch
    from torch.distributed import GradBucket  # type: ignore[attr-defined]
    from torch.nn.parallel import DistributedDataParallel

    from .torch import RingletProcessGroup

    # torch compares a hook's annotations with its classes; in this module they are strings
    _average.__annotations__.update(bucket=GradBucket, group=Any)
    _average.__annotations__["return"] = torch.futures.Future[torch.Tensor]
    group = RingletProcessGroup(comm)
    ddp = DistributedDataParallel(model, process_group=group, **kwargs)
    ddp.register_comm_hook(group, _average)
    return ddp


def _average(group: Any, bucket: Any) -> Any:
    """A DDP comm hook: the bucket summed over the group, divided by its size (torch's default)."""
    size = group.size()
    summed = group.allreduce([bucket.buffer()]).get_future()
    return summed.then(lambda f: f.value()[0].div_(size))

"""ringlet as a ray.util.collective backend, on a real local Ray cluster (CPU), against NumPy.

One Ray cluster and one pool of three actors serve the module (starting Ray and its workers is
the slow part); each test forms its own collective group over some of them. Every actor call is
awaited with a timeout, and a failure reports every rank: its remote traceback or "timed out".
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'ringlet[ray]'")
import ray.util.collective as col  # noqa: E402
from ray import cloudpickle  # noqa: E402  (Ray vendors it)

import ringlet  # noqa: E402
import ringlet.ray  # noqa: E402

pytestmark = pytest.mark.ray
# actors defined here travel by value: Ray's workers cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CALL_TIMEOUT = 60.0
STARTUP_TIMEOUT = 240.0
OPS = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def _data(rank: int, salt: int = 0, n: int = 6) -> np.ndarray:
    """Small integers, distinct per rank and element, as float64: every reduction is exact."""
    return (np.arange(n, dtype=np.float64) * 3 + rank * 7 + salt) % 5 + 1


@ray.remote(num_cpus=0)
class Member:
    """One rank of the groups formed in a test; runs every collective and returns what it got."""

    def __init__(self) -> None:
        import ringlet.ray  # noqa: F401  registers the backend in this actor's process

    def ops(self, group: str, kind: str) -> dict[str, Any]:
        as_t = _as_torch if kind == "torch" else (lambda a: a)
        col.barrier(group)  # forms the group in this actor (Ray creates it on first use)
        rank, n = col.get_rank(group), col.get_collective_group_size(group)
        out: dict[str, Any] = {"rank": rank, "size": n}
        for name, op in (
            ("sum", col.types.ReduceOp.SUM),
            ("max", col.types.ReduceOp.MAX),
            ("min", col.types.ReduceOp.MIN),
            ("prod", col.types.ReduceOp.PRODUCT),
        ):
            x = as_t(_data(rank))
            col.allreduce(x, group, op)
            out[f"allreduce_{name}"] = x
        outs = [as_t(np.zeros(6)) for _ in range(n)]
        col.allgather(outs, as_t(_data(rank)), group)
        out["allgather"] = outs
        x = as_t(_data(rank))
        col.broadcast(x, n - 1, group)
        out["broadcast"] = x
        x = as_t(_data(rank))
        col.reduce(x, 1, group, col.types.ReduceOp.SUM)
        out["reduce"] = x
        parts = [as_t(_data(rank, salt=j)) for j in range(n)]
        res = as_t(np.zeros(6))
        col.reducescatter(res, parts, group, col.types.ReduceOp.MAX)
        out["reducescatter"] = res
        out["reducescatter_inputs"] = parts
        got = as_t(np.zeros(6))
        # a chain 0 -> 1 -> ... -> n-1 -> 0, each passing on what it got plus its rank
        if rank == 0:
            col.send(as_t(_data(0)), 1, group)
            col.recv(got, n - 1, group)
        else:
            col.recv(got, rank - 1, group)
            col.send(got + rank, (rank + 1) % n, group)
        out["chain"] = got
        comm = ringlet.ray.communicator(group)
        out["all_to_all"] = comm.all_to_all(
            as_t(np.repeat(np.float64(rank), n) * 10 + np.arange(n))
        )
        col.barrier(group)
        return {k: _plain(v) for k, v in out.items()}

    def ready(self) -> bool:
        return True

    def allreduce(self, group: str, value: float) -> np.ndarray:
        x = np.full(4, value)
        col.allreduce(x, group)
        return x

    def destroy(self, group: str) -> bool:
        col.destroy_collective_group(group)
        return col.is_group_initialized(group)

    def join(self, name: str, rank: int, size: int) -> np.ndarray:
        """ringlet.ray.init outside any collective group, as in a Ray Train worker."""
        with ringlet.ray.init(name, rank, size, timeout=CALL_TIMEOUT) as comm:
            return comm.all_gather(np.array([comm.rank, comm.size]))

    def join_alone(self, timeout: float) -> str:
        """Rank 0 of a world of 2 whose rank 1 never comes: must fail within ``timeout``."""
        start = time.monotonic()
        try:
            ringlet.ray.init("nobody-else", 0, 2, timeout=timeout)
        except TimeoutError as exc:  # ringlet.CollectiveTimeout is one
            return f"{time.monotonic() - start:.1f}s {exc}"
        return "joined"


def _as_torch(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(a.copy())


def _plain(v: Any) -> Any:
    """Results as NumPy for the driver; a tensor is marked so the test sees torch came back."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if type(v).__module__.startswith("torch"):
        return ("torch", v.numpy())
    return v


def _numpy(v: Any, kind: str) -> Any:
    if isinstance(v, list):
        return [_numpy(x, kind) for x in v]
    if kind == "torch" and isinstance(v, np.ndarray):
        raise AssertionError("a torch tensor came back as a NumPy array")
    return v[1] if isinstance(v, tuple) else v


def _get_all(refs: list[Any], timeout: float = CALL_TIMEOUT) -> list[Any]:
    """Every rank's result; on any failure one AssertionError naming each rank's outcome."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    outcome = []
    for ref in refs:
        if ref not in ready:
            outcome.append(("timed out", f"no answer in {timeout} s"))
            continue
        try:
            outcome.append(("ok", ray.get(ref)))
        except Exception as exc:
            outcome.append(("error", str(exc)))
    if any(status != "ok" for status, _ in outcome):
        report = "\n".join(
            f"===== rank {r}: {status if status == 'ok' else f'{status}: {value}'}"
            for r, (status, value) in enumerate(outcome)
        )
        raise AssertionError(f"{len(refs)} ranks:\n{report}")
    return [value for _, value in outcome]


@pytest.fixture(scope="module")
def members() -> Iterator[list[Any]]:
    """A local Ray cluster and three actors that register the backend as they start.

    Ray's driver installs its own SIGINT/SIGTERM handlers, after which Ctrl-C and a CI timeout's
    SIGTERM no longer stop pytest: the test process's handlers are put back at once.
    """
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        pool = [Member.remote() for _ in range(3)]
        # starting a worker imports torch (ray.util.collective does): slow on a busy machine, and
        # not what the per-call timeouts of the tests are about
        _get_all([m.ready.remote() for m in pool], timeout=STARTUP_TIMEOUT)
        yield pool
    finally:
        ray.shutdown()


#: the test process's handlers, read when this module is imported, before any Ray driver starts
_HANDLERS = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def test_a_ray_driver_leaves_the_test_process_stoppable(members: list[Any]) -> None:
    """After ray.init (which installs a SIGTERM handler of its own), SIGINT and SIGTERM still stop pytest."""
    assert {sig: signal.getsignal(sig) for sig in _HANDLERS} == _HANDLERS


def _form(actors: list[Any], group: str) -> None:
    col.create_collective_group(
        actors, len(actors), list(range(len(actors))), backend="ringlet", group_name=group
    )


@pytest.mark.parametrize(("n", "kind"), [(2, "numpy"), (3, "numpy"), (3, "torch")])
def test_collectives_match_numpy(members: list[Any], n: int, kind: str) -> None:
    if kind == "torch":
        pytest.importorskip("torch")
    group = f"ops-{n}-{kind}"
    _form(members[:n], group)
    results = _get_all([m.ops.remote(group, kind) for m in members[:n]])
    inputs = [_data(r) for r in range(n)]
    for r, res in enumerate(results):
        got = {k: _numpy(v, kind) for k, v in res.items()}
        assert (got["rank"], got["size"]) == (r, n)
        for name, fold in OPS.items():
            np.testing.assert_array_equal(got[f"allreduce_{name}"], fold.reduce(inputs), name)
        for src in range(n):
            np.testing.assert_array_equal(got["allgather"][src], inputs[src])
        np.testing.assert_array_equal(got["broadcast"], inputs[n - 1])
        np.testing.assert_array_equal(got["reduce"], sum(inputs) if r == 1 else inputs[r])
        want = np.maximum.reduce([_data(q, salt=r) for q in range(n)])
        np.testing.assert_array_equal(got["reducescatter"], want)
        for j, part in enumerate(got["reducescatter_inputs"]):
            np.testing.assert_array_equal(part, _data(r, salt=j))  # inputs left as they were
        chain = inputs[0] + sum(range(1, n))
        np.testing.assert_array_equal(
            got["chain"], chain if r == 0 else inputs[0] + sum(range(1, r))
        )
        np.testing.assert_array_equal(got["all_to_all"], np.arange(n) * 10.0 + r)


def test_destroy_and_create_again(members: list[Any]) -> None:
    pair = members[:2]
    for value in (1.0, 2.0):
        _form(pair, "again")
        for x in _get_all([m.allreduce.remote("again", value) for m in pair]):
            np.testing.assert_array_equal(x, np.full(4, 2 * value))
        assert _get_all([m.destroy.remote("again") for m in pair]) == [False, False]
        end = time.monotonic() + 10  # the group's declaration actor goes away asynchronously
        while time.monotonic() < end:
            try:
                ray.get_actor("info_again")
            except ValueError:
                break
            time.sleep(0.05)


def test_init_without_a_group(members: list[Any]) -> None:
    got = _get_all([m.join.remote("plain", r, 3) for r, m in enumerate(members)])
    for res in got:
        np.testing.assert_array_equal(res, [0, 3, 1, 3, 2, 3])


def test_rank_that_never_comes_times_out(members: list[Any]) -> None:
    (message,) = _get_all([members[2].join_alone.remote(2.0)])
    seconds, _, text = message.partition("s ")
    assert float(seconds) < 10, message
    assert "1" in text, message  # names what rank 1 never did


def _train_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker: ringlet.ray.init() takes rank and size from Ray Train's context."""
    import ringlet.ray as rr

    with rr.init() as comm:
        x = np.full(4, float(comm.rank + 1))
        comm.all_reduce(x)
        want = comm.size * (comm.size + 1) / 2
        if comm.size != config["n"] or not np.array_equal(x, np.full(4, want)):
            raise AssertionError(f"rank {comm.rank} of {comm.size}: got {x}, want {want}")


@pytest.mark.slow
@pytest.mark.long  # ~14 s; the other tests here run ringlet.ray's collective groups by default
def test_init_in_ray_train_workers(members: list[Any]) -> None:
    """Only where ray[train] is installed (.ci/run does not: pandas and pyarrow, ~30 s, 250 MB)."""
    # ray.train is in every ray wheel; without ray[train]'s pandas and pyarrow it raises ImportError
    pytest.importorskip("ray.train", reason="needs ray[train]", exc_type=ImportError)
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainer = DataParallelTrainer(
        _train_loop, train_loop_config={"n": 2}, scaling_config=ScalingConfig(num_workers=2)
    )
    trainer.fit()  # raises (WorkerGroupError) with each worker's traceback if a check failed


def test_dead_actor_is_a_peer_error(members: list[Any]) -> None:
    """Kills the pool's last actor: keep this test last in the module."""
    pair = members[1:]
    _form(pair, "doomed")
    _get_all([m.allreduce.remote("doomed", 1.0) for m in pair])
    ray.kill(pair[1], no_restart=True)
    start = time.monotonic()
    ref = pair[0].allreduce.remote("doomed", 1.0)
    ready, _ = ray.wait([ref], timeout=CALL_TIMEOUT)
    assert ready, f"allreduce with a dead peer still running after {CALL_TIMEOUT} s"
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(ref)
    assert isinstance(info.value.as_instanceof_cause(), ringlet.RingletError), info.value
    assert "rank 1" in str(info.value), info.value
    assert time.monotonic() - start < 30

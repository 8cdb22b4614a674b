"""torch's DDP on backend "ringlet" and ringlet's own DDP train exactly like one process on the whole batch.

The reference trains one model in one process on the loss every rank would compute, averaged
over ranks — for equal shards that is the full-batch loss. Each rank compares its parameters
after a few steps with the reference it computes itself.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="ringlet.torch needs PyTorch (pip install 'ringlet[torch]')"
)
import spmd  # noqa: E402
import torch_group  # noqa: E402

BATCH, STEPS = 12, 3


class Net(torch.nn.Module):
    """A small MLP with a branch only rank 0 uses (when asked) and a layer nobody uses."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16)
        )
        self.head = torch.nn.Linear(16, 2)
        self.branch = torch.nn.Linear(16, 2)
        self.never = torch.nn.Linear(3, 3)

    def forward(self, x: Any, use_branch: bool = False) -> Any:
        h = self.body(x)
        return self.head(h) + (self.branch(h) if use_branch else 0)


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 2, generator=g)


def _loss(model: Any, x: Any, y: Any, rank: int, branch: bool) -> Any:
    return torch.nn.functional.mse_loss(model(x, use_branch=branch and rank == 0), y)


def _reference(n: int, optimizer: str, branch: bool = False, micro: int = 1) -> dict[str, Any]:
    """One process: each step's loss is the average over ranks (and micro-batches) of their losses."""
    model = Net(seed=0)
    opt = _optimizer(optimizer, model)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        shards = list(zip(x.chunk(n * micro), y.chunk(n * micro), strict=True))
        total = sum(_loss(model, xs, ys, k // micro, branch) for k, (xs, ys) in enumerate(shards))
        (total / (n * micro)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _optimizer(kind: str, model: Any) -> Any:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if kind == "momentum" else 0.0)


def _train(
    ddp: Any, rank: int, n: int, optimizer: str, branch: bool = False, micro: int = 1
) -> Any:
    """``micro`` > 1: accumulate micro-batches under no_sync, sync on the last one."""
    opt = _optimizer(optimizer, ddp.module)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        shards = list(zip(x.chunk(n * micro), y.chunk(n * micro), strict=True))
        mine = shards[rank * micro : (rank + 1) * micro]
        for k, (xs, ys) in enumerate(mine):
            loss = _loss(ddp, xs, ys, rank, branch) / micro
            if k < micro - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        opt.step()
    return ddp.module


def _compare(bad: list[str], name: str, model: Any, want: dict[str, Any], tol: float) -> None:
    for key, value in model.state_dict().items():
        if not torch.allclose(value, want[key], atol=tol, rtol=tol):
            diff = (value - want[key]).abs().max().item()
            bad.append(f"{name}: {key} differs from single-process training by {diff:.2e}")


class Transposed(torch.nn.Module):
    """A parameter that is a transposed view: its gradient is not contiguous either."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(5, 3).t())

    def forward(self, x: Any) -> Any:
        return x @ self.w


def _transposed_parameter(me: int, n: int) -> list[str]:
    """A direct bucket whose gradient cannot be viewed flat is averaged through a spare buffer."""
    import ringlet.torch as rt

    def local_grad(rank: int) -> Any:
        net = Transposed()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank))
        (net(x) ** 2).sum().backward()
        return net.w.grad

    ddp = rt.DistributedDataParallel(Transposed(), direct_mb=1e-6)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(me))
    (ddp(x) ** 2).sum().backward()
    want = sum(local_grad(r) for r in range(n)) / n
    got = ddp.module.w.grad
    if got is None or got.is_contiguous() or not torch.allclose(got, want, atol=1e-6):
        return [f"transposed parameter: gradient {got} is not the average {want}"]
    return []


def ddp_cases(comm: Any, port: int) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    import ringlet.torch as rt

    n, me = comm.size, comm.rank
    torch_group.init(comm, port)
    bad: list[str] = []
    try:
        # torch's own DDP on backend "ringlet" (its default hook, then torch's fp16 hook)
        model = _train(TorchDDP(Net(seed=0), find_unused_parameters=True), me, n, "sgd")
        _compare(bad, "torch DDP", model, _reference(n, "sgd"), 1e-5)
        ddp = TorchDDP(Net(seed=0), find_unused_parameters=True)
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        _compare(bad, "torch DDP fp16 hook", _train(ddp, me, n, "sgd"), _reference(n, "sgd"), 2e-3)

        # ringlet's DDP: rank 0's initial parameters win (other ranks start from other seeds)
        model = _train(
            rt.DistributedDataParallel(Net(seed=me), find_unused_parameters=True), me, n, "sgd"
        )
        _compare(bad, "ringlet DDP", model, _reference(n, "sgd"), 1e-5)
        if model.never.weight.grad is not None:
            bad.append("ringlet DDP: a parameter no rank used got a gradient")
        # several buckets, grads as bucket views, Adam, the communicator given explicitly
        ddp = rt.DistributedDataParallel(
            Net(seed=me),
            bucket_cap_mb=0.001,
            first_bucket_cap_mb=0.0005,
            gradient_as_bucket_view=True,
            comm=rt.communicator(),
            find_unused_parameters=True,
            overlap=True,
        )
        _compare(
            bad,
            "ringlet DDP buckets+views+adam",
            _train(ddp, me, n, "adam"),
            _reference(n, "adam"),
            1e-5,
        )
        trace = ddp.last_trace
        if (
            trace is None
            or len(trace.buckets) < 3
            or trace.buckets[0].launched >= trace.backward_end
        ):
            bad.append(f"ringlet DDP: first bucket not launched during backward: {trace}")
        # no_sync: two micro-batches per step, momentum
        ddp = rt.DistributedDataParallel(Net(seed=0), find_unused_parameters=True)
        _compare(
            bad,
            "ringlet DDP no_sync",
            _train(ddp, me, n, "momentum", micro=2),
            _reference(n, "momentum", micro=2),
            1e-5,
        )
        # a branch only rank 0 uses: averaged with zeros from the other ranks
        ddp = rt.DistributedDataParallel(
            Net(seed=0), find_unused_parameters=True, bucket_cap_mb=0.001
        )
        _compare(
            bad,
            "ringlet DDP unused on some ranks",
            _train(ddp, me, n, "sgd", branch=True),
            _reference(n, "sgd", branch=True),
            1e-5,
        )
        # compression hooks
        for hook, tol in ((rt.fp16_compress_hook, 2e-3), (rt.bf16_compress_hook, 3e-2)):
            ddp = rt.DistributedDataParallel(
                Net(seed=0), find_unused_parameters=True, comm_hook=hook
            )
            _compare(
                bad,
                f"ringlet DDP {hook.__name__}",
                _train(ddp, me, n, "sgd"),
                _reference(n, "sgd"),
                tol,
            )
        # gradients averaged in place in param.grad (direct buckets): every parameter direct,
        # then a mix of direct and packed; with unused parameters, no_sync and a hook
        for direct_mb, micro, branch, hook in (
            (1e-6, 1, False, None),
            (3e-4, 2, True, None),
            (1e-6, 1, True, rt.fp16_compress_hook),
        ):
            ddp = rt.DistributedDataParallel(
                Net(seed=me), find_unused_parameters=True, direct_mb=direct_mb, comm_hook=hook
            )
            kinds = {b.direct for b in ddp._buckets}
            if kinds != ({True} if direct_mb < 1e-5 else {True, False}):
                bad.append(f"direct_mb={direct_mb}: bucket kinds {kinds}")
            _compare(
                bad,
                f"ringlet DDP direct_mb={direct_mb} micro={micro} branch={branch} hook={hook}",
                _train(ddp, me, n, "momentum", branch=branch, micro=micro),
                _reference(n, "momentum", branch=branch, micro=micro),
                2e-3 if hook else 1e-5,
            )
            if ddp.module.never.weight.grad is not None:
                bad.append(f"direct_mb={direct_mb}: a parameter no rank used got a gradient")
        bad += _transposed_parameter(me, n)
        # the default overlaps unless shared memory and compute threads already fill the cores
        comm_ = rt.communicator()
        full = comm_.local_size * torch.get_num_threads() >= len(os.sched_getaffinity(0))
        want_overlap = comm_.transport == "tcp" or not full
        if rt.DistributedDataParallel(Net(seed=0)).overlap != want_overlap:
            bad.append(f"default overlap is not {want_overlap} ({comm_.transport}, full={full})")
        # without overlap every bucket starts when backward ends
        ddp = rt.DistributedDataParallel(
            Net(seed=me), find_unused_parameters=True, bucket_cap_mb=0.001, overlap=False
        )
        _compare(
            bad, "ringlet DDP overlap=False", _train(ddp, me, n, "sgd"), _reference(n, "sgd"), 1e-5
        )
        trace = ddp.last_trace
        if trace is None or min(b.launched for b in trace.buckets) < trace.backward_end:
            bad.append(f"ringlet DDP overlap=False: a bucket started during backward: {trace}")
        # a dropped wrapper stops averaging: the bare module's gradients stay local
        net = Net(seed=0)
        rt.DistributedDataParallel(net, find_unused_parameters=True)
        gc.collect()
        x, y = _batch(0)
        _loss(net, x[me::n], y[me::n], me, False).backward()
        local = Net(seed=0)
        _loss(local, x[me::n], y[me::n], me, False).backward()
        if not torch.equal(net.head.weight.grad, local.head.weight.grad):
            bad.append("a dropped ringlet DDP wrapper still averaged gradients")
        # without find_unused_parameters an unused parameter is an error, after a full sync
        ddp = rt.DistributedDataParallel(Net(seed=0))
        try:
            _loss(ddp, *_batch(0), me, False).backward()
            bad.append(
                "ringlet DDP: unused parameters without find_unused_parameters did not raise"
            )
        except RuntimeError as exc:
            if "find_unused_parameters" not in str(exc):
                bad.append(f"ringlet DDP: unhelpful error {exc}")
    finally:
        dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize("transport", ["tcp", "auto"])
@pytest.mark.parametrize("n", [2, 3])
def test_ddp_matches_single_process(n: int, transport: str) -> None:
    env = {"RINGLET_TRANSPORT": transport}
    results = spmd.run(ddp_cases, n, spmd.free_port(), env=env, timeout=120)
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:40])

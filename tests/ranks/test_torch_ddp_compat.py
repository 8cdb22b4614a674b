"""ringlet's DistributedDataParallel as a drop-in for torch's: torch's constructor arguments,
torch's comm hooks through register_comm_hook (allreduce, fp16/bf16 compress, PowerSGD), join()
for uneven inputs and static_graph — each trained against one process on the same batches.

One job per world size (2, 3 and 4 ranks: about 20, 30 and 40 s here) runs every case; each rank
computes the single-process reference itself.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="ringlet.torch needs PyTorch (pip install 'ringlet[torch]')"
)
import spmd  # noqa: E402
import torch_group  # noqa: E402

TRANSPORT = {"RINGLET_TRANSPORT": os.environ.get("RINGLET_TRANSPORT", "tcp")}
STEPS = 3


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3)
        self.spare = torch.nn.Linear(2, 2)  # never used: static_graph / find_unused_parameters

    def forward(self, x: Any) -> Any:
        return self.b(torch.tanh(self.a(x)))


def _batch(step: int, rank: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(97 * step + rank)
    return torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)


def _loss(model: Any, step: int, rank: int) -> Any:
    x, y = _batch(step, rank)
    return torch.nn.functional.mse_loss(model(x), y)


def _reference(counts: list[int], divide_by_all: bool = True) -> Any:
    """One process: step s averages the losses of the ranks that still have a batch s."""
    model, n = Net(), len(counts)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(max(counts)):
        active = [r for r in range(n) if step < counts[r]]
        opt.zero_grad()
        total = sum(_loss(model, step, r) for r in active)
        (total / (n if divide_by_all else len(active))).backward()
        opt.step()
    return model


def _train(ddp: Any, me: int, steps: int) -> Any:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    for step in range(steps):
        opt.zero_grad()
        _loss(ddp, step, me).backward()
        opt.step()
    return ddp.module


def _compare(bad: list[str], name: str, got: Any, want: Any, tol: float) -> None:
    for (key, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        if not torch.allclose(p.detach(), q.detach(), atol=tol, rtol=0):
            err = (p - q).abs().max().item()
            bad.append(f"{name}: {key} differs from one process by {err:.2e} (tol {tol})")


def _errors(bad: list[str]) -> None:
    import ringlet.torch as rt

    for kwargs in ({"device_ids": [0]}, {"output_device": 0}, {"mixed_precision": object()}):
        try:
            rt.DistributedDataParallel(Net(), **kwargs)
            bad.append(f"DDP({kwargs}) did not raise")
        except ValueError as exc:
            if "ringlet" not in str(exc):
                bad.append(f"DDP({kwargs}): unclear error {exc}")
    ddp = rt.DistributedDataParallel(Net(), init_sync=False, find_unused_parameters=True)
    ddp.register_comm_hook(None, lambda state, bucket: None)
    try:
        ddp.register_comm_hook(None, lambda state, bucket: None)
        bad.append("register_comm_hook twice did not raise")
    except RuntimeError:
        pass


def ddp_cases(comm: Any, port: int) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    import ringlet.torch as rt

    n, me = comm.size, comm.rank
    torch_group.init(comm, port)
    warnings.filterwarnings("ignore")
    bad: list[str] = []
    even = [STEPS] * n
    try:
        _errors(bad)
        # torch's arguments, in torch's order; static_graph tolerates the spare layer
        ddp = rt.DistributedDataParallel(
            Net(), None, None, 0, True, True, dist.group.WORLD, None, static_graph=True
        )
        _compare(
            bad, "torch's arguments + static_graph", _train(ddp, me, STEPS), _reference(even), 1e-5
        )
        if ddp.module.spare.weight.grad is not None:
            bad.append("static_graph: a parameter no rank used got a gradient")
        sub = dist.new_group(list(range(n)))
        hooks = [
            ("allreduce_hook", None, default_hooks.allreduce_hook, 1e-5),
            ("fp16_compress_hook", sub, default_hooks.fp16_compress_hook, 5e-3),
            ("bf16_compress_hook", None, default_hooks.bf16_compress_hook, 3e-2),
            (
                "powerSGD_hook",
                powerSGD_hook.PowerSGDState(
                    sub, matrix_approximation_rank=8, start_powerSGD_iter=2, min_compression_rate=0
                ),
                powerSGD_hook.powerSGD_hook,
                1e-4,
            ),
        ]
        for name, state, hook, tol in hooks:
            ddp = rt.DistributedDataParallel(Net(), find_unused_parameters=True)
            ddp.register_comm_hook(state, hook)
            _compare(bad, name, _train(ddp, me, STEPS), _reference(even), tol)
        # join(): rank r has STEPS + r batches; the joined ranks shadow the others' steps
        counts = [STEPS - 1 + r for r in range(n)]
        for divide_by_all in (True, False):
            ddp = rt.DistributedDataParallel(Net(), find_unused_parameters=True)
            with ddp.join(divide_by_initial_world_size=divide_by_all):
                model = _train(ddp, me, counts[me])
            _compare(
                bad,
                f"join divide_by_all={divide_by_all}",
                model,
                _reference(counts, divide_by_all),
                1e-5,
            )
    finally:
        dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize("n", [2, 3, 4])
def test_ddp_like_torch(n: int) -> None:
    results = spmd.run(ddp_cases, n, spmd.free_port(), env=TRANSPORT, timeout=90 + 30 * n)
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:40])

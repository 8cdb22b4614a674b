"""all_gather_with_grad: forward is the concatenation, backward the rank's rows summed over ranks.

Rank r holds rows_r rows (uneven, zero allowed) and computes its own loss of the gathered batch;
the reference differentiates the sum of every rank's loss in one process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="ringlet.torch needs PyTorch (pip install 'ringlet[torch]')"
)
import spmd  # noqa: E402

TRANSPORT = {"RINGLET_TRANSPORT": os.environ.get("RINGLET_TRANSPORT", "tcp")}
#: Row counts per rank: the first pads a reduce_scatter, the second falls back to all_reduce.
LAYOUTS = [lambda r, n: r + 1, lambda r, n: 7 if r == n - 1 else (0 if r == 0 else 1)]


def _rows(rank: int, count: int, salt: int) -> Any:
    g = torch.Generator().manual_seed(100 * rank + salt)
    return torch.randn(count, 4, generator=g, dtype=torch.float64)


def _rank_loss(gathered: Any, rank: int) -> Any:
    """A loss that weighs every row differently on every rank, like a contrastive loss's logits."""
    g = torch.Generator().manual_seed(7 + rank)
    weights = torch.randn(gathered.shape, generator=g, dtype=gathered.dtype)
    return (torch.tanh(gathered) * weights).sum()


def _reference(n: int, me: int, counts: list[int], salt: int) -> tuple[Any, Any]:
    leaves = [_rows(r, c, salt).requires_grad_() for r, c in enumerate(counts)]
    gathered = torch.cat(leaves)
    sum(_rank_loss(gathered, r) for r in range(n)).backward()
    return gathered.detach(), leaves[me].grad


def _case(
    bad: list[str], name: str, n: int, me: int, salt: int, counts: list[int], **kw: Any
) -> None:
    from ringlet.torch import all_gather_with_grad

    mine = _rows(me, counts[me], salt).requires_grad_()
    gathered = all_gather_with_grad(mine, **kw)
    _rank_loss(gathered, me).backward()
    want_out, want_grad = _reference(n, me, counts, salt)
    if not torch.equal(gathered.detach(), want_out):
        bad.append(f"{name} counts {counts}: forward differs")
    if mine.grad is None or not torch.allclose(mine.grad, want_grad, rtol=1e-12, atol=1e-12):
        bad.append(f"{name} counts {counts}: gradient differs from the single-process one")


def autograd_cases(comm: Any, ports: tuple[int, int]) -> list[str]:
    import torch.distributed as dist

    n, me = comm.size, comm.rank
    bad: list[str] = []
    for k, layout in enumerate(LAYOUTS):
        counts = [layout(r, n) for r in range(n)]
        _case(bad, "ringlet comm", n, me, k, counts, comm=comm)
    # through torch.distributed on gloo (pure torch calls), and on backend "ringlet"
    for k, backend in enumerate(("gloo", "ringlet")):
        import ringlet.torch  # noqa: F401 - registers the backend

        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{ports[k]}",
            rank=me,
            world_size=n,
            timeout=timedelta(seconds=60),
        )
        try:
            counts = [LAYOUTS[1](r, n) for r in range(n)]
            _case(bad, f"torch group {backend}", n, me, 10 + k, counts)
        finally:
            dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize("n", [2, 3])
def test_all_gather_with_grad_uneven(n: int) -> None:
    results = spmd.run(
        autograd_cases, n, (spmd.free_port(), spmd.free_port()), env=TRANSPORT, timeout=120
    )
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:40])

"""Today's torch.distributed on backend "ringlet": Work completion, group names, DeviceMesh,
functional collectives, DTensor redistribution, FSDP2, HSDP and composable replicate training.

One job per world size runs every case (spawning ranks and importing torch is the slow part).
References are computed on each rank without communication: every rank rebuilds every rank's
inputs, and FSDP2/HSDP training is compared with one process training on the global batch.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="ringlet.torch needs PyTorch (pip install 'ringlet[torch]')"
)
import spmd  # noqa: E402
import torch_group  # noqa: E402

TRANSPORT = {"RINGLET_TRANSPORT": os.environ.get("RINGLET_TRANSPORT", "tcp")}
STEPS, BATCH, TOL = 4, 12, 1e-5


def _data(rank: int, shape: tuple[int, ...], salt: int = 0, dtype: Any = None) -> Any:
    g = torch.Generator().manual_seed(1000 * rank + salt)
    return torch.randint(1, 4, shape, generator=g).to(dtype or torch.float32)


def _check(bad: list[str], name: str, got: Any, want: Any, tol: float = 0.0) -> None:
    got = torch.as_tensor(got)
    ok = got.shape == want.shape and got.dtype == want.dtype
    ok = ok and (torch.equal(got, want) if tol == 0 else torch.allclose(got, want, atol=tol))
    if not ok:
        bad.append(
            f"{name}: got {got.flatten()[:6].tolist()} {got.dtype} {tuple(got.shape)}, "
            f"want {want.flatten()[:6].tolist()} {want.dtype} {tuple(want.shape)}"
        )


def _works(bad: list[str], n: int, me: int) -> None:
    """A Work is completed, and successful, as soon as wait() returned (it raced its callback)."""
    import torch.distributed as dist

    late = 0
    for i in range(60):
        t = torch.ones(3 + i % 5)
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        if not (work.is_completed() and work.is_success() and work.exception() is None):
            late += 1
        work = dist.all_gather_into_tensor(torch.empty(n * 2), torch.ones(2), async_op=True)
        work.get_future().wait()
        late += not work.is_completed()
    if late:
        bad.append(f"Work: {late} of 120 calls were not completed right after wait()")


def _names(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    world = dist.group.WORLD
    if (
        not world.group_name
        or dist.distributed_c10d._resolve_process_group(world.group_name) is not world
    ):
        bad.append(f"default group name {world.group_name!r} does not resolve to the group")
    sub = dist.new_group(list(range(n)), group_desc="everyone")
    if sub.group_desc != "everyone" or sub.group_name == world.group_name:
        bad.append(f"new_group: name {sub.group_name!r} desc {sub.group_desc!r}")


def _functional(bad: list[str], n: int, me: int, group: Any, ranks: list[int]) -> None:
    """all_reduce, all_gather_tensor, reduce_scatter_tensor, all_to_all_single over ``group``."""
    import torch.distributed._functional_collectives as fc

    k, pos = len(ranks), ranks.index(me)
    ins = {r: _data(r, (k * 2, 3), salt=7) for r in ranks}
    got = fc.wait_tensor(fc.all_reduce(ins[me], "sum", group))
    _check(bad, f"fc.all_reduce {ranks}", got, sum(ins.values()))
    got = fc.wait_tensor(fc.all_reduce(ins[me], "avg", group))
    _check(bad, f"fc.all_reduce avg {ranks}", got, sum(ins.values()) / k, 1e-6)
    got = fc.wait_tensor(fc.all_gather_tensor(ins[me], 1, group))
    _check(bad, f"fc.all_gather_tensor dim 1 {ranks}", got, torch.cat([ins[r] for r in ranks], 1))
    got = fc.wait_tensor(fc.reduce_scatter_tensor(ins[me], "sum", 0, group))
    _check(bad, f"fc.reduce_scatter_tensor {ranks}", got, sum(ins.values())[2 * pos : 2 * pos + 2])
    got = fc.wait_tensor(fc.all_to_all_single(ins[me], None, None, group))
    want = torch.cat([ins[r][2 * pos : 2 * pos + 2] for r in ranks])
    _check(bad, f"fc.all_to_all_single {ranks}", got, want)
    # differentiable variant: the gradient of an all_gather is the reduce_scatter of the grads
    x = ins[me].clone().requires_grad_()
    fc.all_gather_tensor_autograd(x, 0, group).sum().backward()
    _check(bad, f"fc.all_gather_tensor_autograd grad {ranks}", x.grad, torch.full_like(x, k))


def _mesh(bad: list[str], n: int, me: int) -> Any:
    """An n-D DeviceMesh, its sub-groups by dimension, functional collectives and DTensor on it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    shape = (2, n // 2) if n % 2 == 0 else (n,)
    names = ("dp", "tp")[: len(shape)]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    grid = torch.arange(n).reshape(shape)
    for d, name in enumerate(names):
        # the ranks that share every coordinate but dimension d with this rank
        coord = [int(c) for c in (grid == me).nonzero()[0]]
        index: list[Any] = list(coord)
        index[d] = slice(None)
        ranks = grid[tuple(index)].tolist()
        group = mesh.get_group(name)
        if dist.get_process_group_ranks(group) != ranks or mesh[name].get_group() is not group:
            bad.append(f"mesh dim {name}: ranks {dist.get_process_group_ranks(group)} != {ranks}")
        _functional(bad, n, me, mesh[name] if d else group, ranks)  # a group or a 1-D mesh
    _functional(bad, n, me, dist.group.WORLD, list(range(n)))
    # DTensor: every redistribution between shard, replicate and partial placements
    full = torch.arange(4.0 * n * n * 3).reshape(2 * n, 2 * n * 3)
    last = len(shape) - 1
    for src, dst in [
        ([Shard(0)], [Replicate()]),
        ([Shard(0)], [Shard(1)]),
        ([Replicate()], [Shard(1)]),
    ]:
        pre = [Replicate()] * last
        dt = distribute_tensor(full, mesh, pre + src).redistribute(mesh, pre + dst)
        _check(bad, f"DTensor {src} -> {dst}", dt.full_tensor(), full)
    if len(shape) == 2:
        dt = distribute_tensor(full, mesh, [Shard(0), Shard(1)])
        _check(bad, "DTensor (S0, S1) -> (R, R)", dt.full_tensor(), full)
        _check(
            bad,
            "DTensor (S0, S1) -> (S1, S0)",
            dt.redistribute(mesh, [Shard(1), Shard(0)]).full_tensor(),
            full,
        )
    # Partial → Replicate is an all_reduce, Partial → Shard a reduce_scatter
    from torch.distributed.tensor import DTensor

    local = _data(me, (2 * n, 3), salt=9)
    whole = sum(_data(r, (2 * n, 3), salt=9) for r in range(n))
    flat = init_device_mesh("cpu", (n,))
    part = DTensor.from_local(local, flat, [Partial()])
    _check(
        bad,
        "DTensor Partial -> Replicate",
        part.redistribute(flat, [Replicate()]).to_local(),
        whole,
    )
    _check(
        bad,
        "DTensor Partial -> Shard(0)",
        part.redistribute(flat, [Shard(0)]).to_local(),
        whole[2 * me : 2 * me + 2],
    )
    return mesh


def _surface(bad: list[str], n: int, me: int) -> None:
    """What Gloo answers besides the plain collectives: coalesced calls, the coalescing manager,
    ``_allgather_base``/``_reduce_scatter_base``, batches of isend/irecv to every peer."""
    import torch.distributed as dist

    pg = dist.group.WORLD
    R = dist.ReduceOp
    ins = [[_data(r, (3,), salt=20), _data(r, (2, 2), salt=21)] for r in range(n)]
    outs = [
        [torch.empty(3) for _ in range(n)],
        [torch.empty(2, 2) for _ in range(n)],
    ]
    dist.all_gather_coalesced(outs, ins[me])
    for k in range(2):
        _check(
            bad, f"all_gather_coalesced {k}", torch.stack(outs[k]), torch.stack([i[k] for i in ins])
        )
    mine = [t.clone() for t in ins[me]]
    dist.all_reduce_coalesced(mine, op=R.MAX)
    for k in range(2):
        _check(
            bad, f"all_reduce_coalesced MAX {k}", mine[k], torch.stack([i[k] for i in ins]).amax(0)
        )
    # the coalescing manager: torch's fast path (one coalesced call) and its device path
    for device in (None, torch.device("cpu")):
        a, b = ins[me][0].clone(), _data(me, (4,), salt=22)
        with dist._coalescing_manager(device=device, async_ops=True) as cm:
            dist.all_reduce(a)
            dist.all_reduce(b)
        cm.wait()
        _check(bad, f"coalescing all_reduce {device}", a, sum(i[0] for i in ins))
        _check(
            bad,
            f"coalescing all_reduce {device} 2",
            b,
            sum(_data(r, (4,), salt=22) for r in range(n)),
        )
        gathered = [torch.empty(3 * n), torch.empty(4 * n)]
        with dist._coalescing_manager(device=device, async_ops=True) as cm:
            dist.all_gather_into_tensor(gathered[0], ins[me][0], async_op=True)
            dist.all_gather_into_tensor(gathered[1], b, async_op=True)
        cm.wait()
        _check(bad, f"coalescing all_gather {device}", gathered[0], torch.cat([i[0] for i in ins]))
        scattered = torch.empty(2)
        with dist._coalescing_manager(device=device, async_ops=True) as cm:
            dist.reduce_scatter_tensor(
                scattered, _data(me, (2 * n,), salt=23), op=R.AVG, async_op=True
            )
        cm.wait()
        want = sum(_data(r, (2 * n,), salt=23) for r in range(n)) / n
        _check(
            bad,
            f"coalescing reduce_scatter AVG {device}",
            scattered,
            want[2 * me : 2 * me + 2],
            1e-6,
        )
    out = torch.empty(n * 3)
    pg._allgather_base(out, ins[me][0]).wait()
    _check(bad, "_allgather_base", out, torch.cat([i[0] for i in ins]))
    got = torch.empty(2)
    opts = dist.ReduceScatterOptions()
    opts.reduceOp = R.MIN
    pg._reduce_scatter_base(got, _data(me, (2 * n,), salt=24), opts).wait()
    want = torch.stack([_data(r, (2 * n,), salt=24) for r in range(n)]).amin(0)[2 * me : 2 * me + 2]
    _check(bad, "_reduce_scatter_base MIN", got, want)
    # batch_isend_irecv with every peer at once, tags differing per direction
    peers = [r for r in range(n) if r != me]
    got_from = {r: torch.empty(r + 2) for r in peers}
    ops = [
        dist.P2POp(dist.isend, torch.full((me + 2,), float(me * 10 + r)), r, tag=me) for r in peers
    ]
    ops += [dist.P2POp(dist.irecv, got_from[r], r, tag=r) for r in peers]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    for r in peers:
        _check(
            bad,
            f"batch_isend_irecv from {r}",
            got_from[r],
            torch.full((r + 2,), float(r * 10 + me)),
        )


def _any_source(bad: list[str], n: int, me: int) -> None:
    """recv / irecv without src return the rank the message came from."""
    import torch.distributed as dist

    if me != 0:
        dist.send(torch.full((2,), float(me)), dst=0, tag=5)
        if me == 1:
            dist.send(torch.full((2,), 10.0), dst=0, tag=6)
            dist.send(torch.full((2,), 11.0), dst=0, tag=6)
        return
    seen = set()
    for k in range(n - 1):
        t = torch.empty(2)
        if k % 2:
            work = dist.irecv(t, tag=5)
            work.wait()
            src = work._source_rank()
        else:
            src = dist.recv(t, tag=5)
        seen.add(src)
        _check(bad, f"recv from any source ({src})", t, torch.full((2,), float(src)))
    if seen != set(range(1, n)):
        bad.append(f"recv from any source: sources {sorted(seen)}")
    t = torch.empty(2)
    dist.recv(t, src=1, tag=6)  # takes the first; the any-source recv gets the second
    _check(bad, "recv src=1 before any source", t, torch.full((2,), 10.0))
    if dist.recv(t, tag=6) != 1:
        bad.append("recv from any source after recv src=: wrong source")
    _check(bad, "recv from any source after recv src=", t, torch.full((2,), 11.0))


def _failures(bad: list[str], n: int, me: int) -> None:
    """Last, since they leave ranks out: monitored_barrier names who is missing; per-call
    timeouts end a call that not every rank makes."""
    import time

    import torch.distributed as dist

    import ringlet.torch as rt

    rt.monitored_barrier(timeout=timedelta(seconds=30))  # everyone: passes
    missing = [r for r in range(1, n) if r % 2 == 1]  # 1 (and 3)
    if me not in missing:
        try:
            rt.monitored_barrier(timeout=timedelta(seconds=1), wait_all_ranks=True)
            bad.append("monitored_barrier with missing ranks did not raise")
        except RuntimeError as exc:
            named = ", ".join(map(str, missing))
            if me == 0 and f"{named} failed to pass monitoredBarrier" not in str(exc):
                bad.append(f"monitored_barrier on rank 0: {exc}")
    dist.barrier()  # the communicator is unharmed
    sub = dist.new_group(list(range(n)))
    if me == 0:  # the others never join this all_reduce
        opts = dist.AllreduceOptions()
        opts.timeout = timedelta(seconds=0.5)
        start = time.monotonic()
        try:
            sub.allreduce([torch.ones(2)], opts).wait()
            bad.append("all_reduce with a 0.5 s timeout that only rank 0 called did not raise")
        except RuntimeError:
            if time.monotonic() - start > 10:
                bad.append(f"per-call timeout of 0.5 s took {time.monotonic() - start:.1f} s")
    t = torch.ones(1)
    dist.all_reduce(t)
    _check(
        bad,
        "all_reduce on WORLD after a timed-out call on another group",
        t,
        torch.tensor([float(n)]),
    )


class Net(torch.nn.Module):
    """A tiny MLP whose sizes do not divide by 3 or 4 (FSDP2 pads uneven shards)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 7)
        self.b = torch.nn.Linear(7, 6)
        self.c = torch.nn.Linear(6, 2)

    def forward(self, x: Any) -> Any:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 2, generator=g)


def _train(model: Any, shard: int, shards: int) -> Any:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x.chunk(shards)[shard], y.chunk(shards)[shard]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _fsdp(bad: list[str], n: int, me: int, mesh: Any, name: str, mixed: bool = False) -> None:
    """fully_shard on ``mesh`` trains like one process on the global batch."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    want = _train(Net(), 0, 1)
    for policy in (None, MixedPrecisionPolicy(reduce_dtype=torch.float64))[: 1 + mixed]:
        model = Net()
        kw = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
        for layer in (model.a, model.b, model.c):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        _train(model, me, n)
        for (key, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
            _check(bad, f"{name} {key} {policy}", p.full_tensor(), q.detach(), TOL)


def _replicate(bad: list[str], n: int, me: int, mesh: Any) -> None:
    """torch's composable replicate, the DDP one and the one built on FSDP2 (per layer, on a 1-D
    mesh), trains like one process on the global batch."""
    from torch.distributed._composable import replicate
    from torch.distributed._composable.replicate_with_fsdp import replicate as replicate_fsdp

    want = _train(Net(), 0, 1)
    for name in ("replicate", "replicate_with_fsdp"):
        model = Net()
        if name == "replicate":
            replicate(model)
        else:
            for layer in (model.a, model.b, model.c):
                replicate_fsdp(layer, mesh=mesh)
            replicate_fsdp(model, mesh=mesh)
        _train(model, me, n)
        for (key, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            _check(bad, f"{name} {key}", full.detach(), q.detach(), TOL)


def torch_cases(comm: Any, port: int) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import ringlet.torch  # noqa: F401

    n, me = comm.size, comm.rank
    torch_group.init(comm, port)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    bad: list[str] = []
    try:
        _works(bad, n, me)
        _names(bad, n, me)
        _surface(bad, n, me)
        _any_source(bad, n, me)
        _mesh(bad, n, me)
        _fsdp(bad, n, me, init_device_mesh("cpu", (n,)), "FSDP2", mixed=True)
        _replicate(bad, n, me, init_device_mesh("cpu", (n,), mesh_dim_names=("replicate",)))
        if n % 2 == 0:
            hsdp = init_device_mesh("cpu", (2, n // 2), mesh_dim_names=("replicate", "shard"))
            _fsdp(bad, n, me, hsdp, "HSDP")
        _failures(bad, n, me)
    finally:
        dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.long), 4])  # 3: -m long
def test_mesh_fsdp(n: int) -> None:
    results = spmd.run(torch_cases, n, spmd.free_port(), env=TRANSPORT, timeout=150)
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:40])

"""torch.distributed on backend "ringlet": every call against a reference computed on each rank.

One job per world size runs every case (spawning ranks and importing torch is the slow part);
each rank rebuilds every rank's inputs locally, so the references need no communication.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="ringlet.torch needs PyTorch (pip install 'ringlet[torch]')"
)
import spmd  # noqa: E402
import torch_group  # noqa: E402

TRANSPORT = {"RINGLET_TRANSPORT": os.environ.get("RINGLET_TRANSPORT", "tcp")}


def _data(rank: int, shape: tuple[int, ...], dtype: Any, salt: int = 0) -> Any:
    """Small integers per rank and element, so every reduction is exact in any order."""
    g = torch.Generator().manual_seed(1000 * rank + salt)
    values = torch.randint(1, 4, shape, generator=g)
    return values.to(dtype)


def _single(kind: str) -> Any:
    """torch 2.13's ``all_gather_single``/``reduce_scatter_single`` (older: ``*_tensor``)."""
    import torch.distributed as dist

    old = "all_gather_into_tensor" if kind == "all_gather" else "reduce_scatter_tensor"
    return getattr(dist, f"{kind}_single", getattr(dist, old))


def _check(bad: list[str], name: str, got: Any, want: Any) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        bad.append(
            f"{name}: got {got.flatten()[:6].tolist()} {got.dtype} {tuple(got.shape)}, "
            f"want {want.flatten()[:6].tolist()} {want.dtype} {tuple(want.shape)}"
        )


def _reductions(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    R = dist.ReduceOp
    cases = [
        (R.SUM, torch.float32),
        (R.SUM, torch.int64),
        (R.SUM, torch.float16),
        (R.SUM, torch.bfloat16),
        (R.AVG, torch.float64),
        (R.PRODUCT, torch.int32),
        (R.MIN, torch.float32),
        (R.MAX, torch.int16),
        (R.BAND, torch.int32),
        (R.BOR, torch.uint8),
        (R.BXOR, torch.int64),
    ]
    fold = {
        R.SUM: torch.add,
        R.AVG: torch.add,
        R.PRODUCT: torch.mul,
        R.MIN: torch.minimum,
        R.MAX: torch.maximum,
        R.BAND: torch.bitwise_and,
        R.BOR: torch.bitwise_or,
        R.BXOR: torch.bitwise_xor,
    }
    for k, (op, dtype) in enumerate(cases):
        inputs = [_data(r, (5, 3), dtype, salt=k) for r in range(n)]
        want = inputs[0].clone()
        for x in inputs[1:]:
            want = fold[op](want, x)
        if op == R.AVG:
            want = want / n
        got = inputs[me].clone()
        dist.all_reduce(got, op=op)
        _check(bad, f"all_reduce {op} {dtype}", got, want)
        got = inputs[me].clone()
        work = dist.all_reduce(got, op=op, async_op=True)
        _check(bad, f"all_reduce async {op} {dtype}", work.get_future().wait()[0], want)
        root = (k + 1) % n
        got = inputs[me].clone()
        dist.reduce(got, dst=root, op=op)
        _check(bad, f"reduce {op} {dtype} root {root}", got, want if me == root else inputs[me])
    # PREMUL_SUM(f): the sum of f·x
    premul = dist._make_nccl_premul_sum(0.5)
    got = _data(me, (4,), torch.float32, salt=50)
    dist.all_reduce(got, op=premul)
    want = sum(_data(r, (4,), torch.float32, salt=50) for r in range(n)) * 0.5
    _check(bad, "all_reduce PREMUL_SUM", got, want)
    # coalesced: one all_reduce over the concatenation; complex: torch reduces its real view
    pair = [_data(me, (3,), torch.float32, salt=52), _data(me, (2, 2), torch.float32, salt=53)]
    dist.all_reduce_coalesced(pair)
    for k, got in enumerate(pair):
        want = sum(_data(r, tuple(got.shape), torch.float32, salt=52 + k) for r in range(n))
        _check(bad, f"all_reduce_coalesced {k}", got, want)
    got = torch.complex(
        _data(me, (3,), torch.float32, salt=54), _data(me, (3,), torch.float32, salt=55)
    )
    dist.all_reduce(got)
    want = sum(
        torch.complex(
            _data(r, (3,), torch.float32, salt=54), _data(r, (3,), torch.float32, salt=55)
        )
        for r in range(n)
    )
    _check(bad, "all_reduce complex", got, want)
    # a non-contiguous tensor is reduced through a staging copy and written back
    base = _data(me, (4, 6), torch.float32, salt=51)
    view = base[:, ::2]
    dist.all_reduce(view)
    want = sum(_data(r, (4, 6), torch.float32, salt=51) for r in range(n))[:, ::2]
    _check(bad, "all_reduce non-contiguous", view, want)


def _gathers(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    parts = [_data(r, (2, 3), torch.float32, salt=60) for r in range(n)]
    outs = [torch.empty(2, 3) for _ in range(n)]
    dist.all_gather(outs, parts[me])
    _check(bad, "all_gather", torch.stack(outs), torch.stack(parts))
    uneven = [_data(r, (r + 1,), torch.int64, salt=61) for r in range(n)]
    outs = [torch.empty(r + 1, dtype=torch.int64) for r in range(n)]
    dist.all_gather(outs, uneven[me])
    _check(bad, "all_gather uneven", torch.cat(outs), torch.cat(uneven))
    out = torch.empty(2 * n, 3)
    dist.all_gather_into_tensor(out, parts[me])
    _check(bad, "all_gather_into_tensor", out, torch.cat(parts))
    out = torch.empty(n, 2, 3, dtype=torch.bfloat16)
    work = _single("all_gather")(out, parts[me].to(torch.bfloat16), async_op=True)
    work.wait()
    _check(bad, "all_gather_into_tensor bf16 async", out, torch.stack(parts).to(torch.bfloat16))
    root = n - 1
    outs = [torch.empty(2, 3) for _ in range(n)] if me == root else None
    dist.gather(parts[me], outs, dst=root)
    if me == root:
        _check(bad, "gather", torch.stack(outs), torch.stack(parts))
    whole = [_data(r, (2, 2), torch.int32, salt=62) for r in range(n)]
    got = torch.empty(2, 2, dtype=torch.int32)
    dist.scatter(got, whole if me == 0 else None, src=0)
    _check(bad, "scatter", got, whole[me])
    src = n // 2
    got = _data(me, (3,), torch.float64, salt=63)
    dist.broadcast(got, src=src)
    _check(bad, "broadcast", got, _data(src, (3,), torch.float64, salt=63))


def _scatters(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    lists = [[_data(r, (3,), torch.float32, salt=70 + j) for j in range(n)] for r in range(n)]
    got = torch.empty(3)
    dist.reduce_scatter(got, lists[me])
    _check(bad, "reduce_scatter", got, sum(lists[r][me] for r in range(n)))
    uneven = [[_data(r, (j + 1,), torch.int64, salt=80 + j) for j in range(n)] for r in range(n)]
    got = torch.empty(me + 1, dtype=torch.int64)
    dist.reduce_scatter(got, uneven[me], op=dist.ReduceOp.MAX)
    want = uneven[0][me]
    for r in range(1, n):
        want = torch.maximum(want, uneven[r][me])
    _check(bad, "reduce_scatter uneven MAX", got, want)
    flat = [_data(r, (n * 4,), torch.float32, salt=90) for r in range(n)]
    before = flat[me].clone()
    got = torch.empty(4)
    dist.reduce_scatter_tensor(got, flat[me])
    _check(bad, "reduce_scatter_tensor", got, sum(flat)[me * 4 : (me + 1) * 4])
    _check(bad, "reduce_scatter_tensor leaves its input", flat[me], before)
    got = torch.empty(4)
    _single("reduce_scatter")(got, flat[me], op=dist.ReduceOp.AVG)
    _check(bad, "reduce_scatter_tensor AVG", got, (sum(flat) / n)[me * 4 : (me + 1) * 4])


def _all_to_all(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    ins = [_data(r, (2 * n, 3), torch.float32, salt=100) for r in range(n)]
    got = torch.empty(2 * n, 3)
    dist.all_to_all_single(got, ins[me])
    want = torch.cat([ins[r][2 * me : 2 * me + 2] for r in range(n)])
    _check(bad, "all_to_all_single even", got, want)
    # rank r sends (r + j) % 3 + 1 rows... to rank j: uneven both ways, zero rows allowed
    splits = [[(r + j) % 3 for j in range(n)] for r in range(n)]
    ins = [_data(r, (sum(splits[r]), 2), torch.int64, salt=101) for r in range(n)]
    out_splits = [splits[r][me] for r in range(n)]
    got = torch.empty(sum(out_splits), 2, dtype=torch.int64)
    dist.all_to_all_single(got, ins[me], out_splits, splits[me])
    want = torch.cat([ins[r].split(splits[r])[me] for r in range(n)])
    _check(bad, "all_to_all_single uneven", got, want)
    ins_list = [
        [_data(r, (j + 1,), torch.float64, salt=102 + j) for j in range(n)] for r in range(n)
    ]
    outs = [torch.empty(me + 1, dtype=torch.float64) for _ in range(n)]
    dist.all_to_all(outs, ins_list[me])
    _check(
        bad, "all_to_all list", torch.stack(outs), torch.stack([ins_list[r][me] for r in range(n)])
    )


def _point_to_point(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    right, left = (me + 1) % n, (me - 1) % n
    got = torch.empty(5)
    reqs = [
        dist.isend(_data(me, (5,), torch.float32, salt=110), right, tag=3),
        dist.irecv(got, left, tag=3),
    ]
    for req in reqs:
        req.wait()
    _check(bad, "isend/irecv ring", got, _data(left, (5,), torch.float32, salt=110))
    if me == 0:
        dist.send(torch.arange(4), dst=n - 1)
    elif me == n - 1:
        got = torch.empty(4, dtype=torch.int64)
        dist.recv(got, src=0)
        _check(bad, "send/recv", got, torch.arange(4))
    ops = [
        dist.P2POp(dist.isend, _data(me, (3,), torch.float32, salt=111), right),
        dist.P2POp(dist.irecv, got := torch.empty(3), left),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    _check(bad, "batch_isend_irecv", got, _data(left, (3,), torch.float32, salt=111))


def _groups_and_objects(bad: list[str], n: int, me: int) -> None:
    import torch.distributed as dist

    members = list(range(1, n)) if n > 2 else [0, 1]
    sub = dist.new_group(members)
    if me in members:
        got = torch.tensor([float(me)])
        dist.all_reduce(got, group=sub)
        _check(bad, "new_group all_reduce", got, torch.tensor([float(sum(members))]))
        got = torch.empty(len(members), dtype=torch.int64)
        dist.all_gather_into_tensor(got, torch.tensor([me]), group=sub)
        _check(bad, "new_group all_gather", got, torch.tensor(members))
    objs: list[Any] = [None] * n
    dist.all_gather_object(objs, {"rank": me, "name": "r" * (me + 1)})
    if objs != [{"rank": r, "name": "r" * (r + 1)} for r in range(n)]:
        bad.append(f"all_gather_object: {objs}")
    box = [("hello", me)] if me == 1 else [None]
    dist.broadcast_object_list(box, src=1)
    if box != [("hello", 1)]:
        bad.append(f"broadcast_object_list: {box}")
    gathered = [None] * n if me == 0 else None
    dist.gather_object(me * 10, gathered, dst=0)
    if me == 0 and gathered != [r * 10 for r in range(n)]:
        bad.append(f"gather_object: {gathered}")
    out: list[Any] = [None]
    dist.scatter_object_list(out, [f"to {r}" for r in range(n)] if me == 0 else None, src=0)
    if out != [f"to {me}"]:
        bad.append(f"scatter_object_list: {out}")
    dist.barrier()


def _errors(bad: list[str], n: int, me: int) -> None:
    """Unsupported or wrong calls raise torch's usual error types, on every rank, before moving data."""
    import torch.distributed as dist

    def expect(name: str, kind: type[BaseException], fn: Any) -> None:
        try:
            fn()
        except kind:
            return
        except Exception as exc:
            bad.append(f"{name}: raised {type(exc).__name__}: {exc}")
            return
        bad.append(f"{name}: did not raise")

    expect(
        "PREMUL_SUM on ints",
        ValueError,
        lambda: dist.all_reduce(
            torch.ones(2, dtype=torch.int32), op=dist._make_nccl_premul_sum(2.0)
        ),
    )
    expect(
        "all_gather_single size",
        ValueError,
        lambda: _single("all_gather")(torch.empty(n + 1), torch.ones(1)),
    )
    expect(
        "reduce_scatter_single size",
        ValueError,
        lambda: _single("reduce_scatter")(torch.empty(2), torch.ones(2 * n + 1)),
    )
    expect(
        "all_to_all_single bad splits",
        ValueError,
        lambda: dist.all_to_all_single(torch.empty(n), torch.ones(n), [1] * n, [2] * n),
    )
    # the group still works after local argument errors
    got = torch.ones(1)
    dist.all_reduce(got)
    _check(bad, "all_reduce after errors", got, torch.tensor([float(n)]))


def _nested_callbacks(bad: list[str], n: int, me: int) -> None:
    """Future callbacks that each issue a call and wait for the next level's callback, 12 deep
    (PowerSGD's pattern, nested): each level holds a resolver thread while it waits, so a fixed
    pool of a few threads deadlocked here. Afterwards the extra threads end."""
    import torch.distributed as dist

    from ringlet.torch import resolvers

    depth, deepest = 12, [0]

    def level(k: int) -> Any:
        fut = dist.all_reduce(torch.full((2,), float(k + me)), async_op=True).get_future()
        if k == depth:
            return fut.then(lambda f: [f.value()[0].sum().item()])

        def callback(f: Any) -> list[float]:
            deepest[0] = max(deepest[0], resolvers.threads())
            return [f.value()[0].sum().item(), *level(k + 1).wait()]

        return fut.then(callback)

    got = level(0).wait()
    want = [2.0 * (n * k + n * (n - 1) / 2) for k in range(depth + 1)]
    if got != want:
        bad.append(f"nested callbacks: got {got}, want {want}")
    if deepest[0] <= 4:  # a level whose call finished before then() runs inline: fewer threads
        bad.append(f"nested callbacks held only {deepest[0]} resolver threads: not nested enough")
    end = time.monotonic() + resolvers.IDLE_SECONDS + 10
    while resolvers.threads() > resolvers.KEEP and time.monotonic() < end:
        time.sleep(0.2)
    if resolvers.threads() > resolvers.KEEP:
        bad.append(f"{resolvers.threads()} resolver threads stayed after the nesting ended")


def backend_cases(comm: Any, init: str, port: int) -> list[str]:
    """Initialize torch.distributed on "ringlet" with ``init`` and run every case on this rank."""
    import torch.distributed as dist

    import ringlet.torch

    n, me = comm.size, comm.rank
    if init == "env":  # torchrun's variables; torch's own store takes MASTER_PORT
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(me),
                "WORLD_SIZE": str(n),
            }
        )
        dist.init_process_group("ringlet")
    else:
        torch_group.init(comm, port)
    bad: list[str] = []
    warnings.filterwarnings("ignore", message=".*is deprecated", category=FutureWarning)
    try:
        if dist.get_backend() != "ringlet" or ringlet.torch.communicator().size != n:
            bad.append(f"backend is {dist.get_backend()!r}")
        for cases in (
            _reductions,
            _gathers,
            _scatters,
            _all_to_all,
            _point_to_point,
            _groups_and_objects,
            _nested_callbacks,
            _errors,
        ):
            cases(bad, n, me)
    finally:
        dist.destroy_process_group()
    return bad


@pytest.mark.torch
@pytest.mark.parametrize(("n", "init"), [(2, "env"), (3, "tcp")])
def test_every_torch_distributed_call(n: int, init: str) -> None:
    results = spmd.run(backend_cases, n, init, spmd.free_port(), env=TRANSPORT, timeout=120)
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:40])

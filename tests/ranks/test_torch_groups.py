"""Making groups on backend "ringlet" as on Gloo: ProcessGroup.split_group, new_subgroups,
new_subgroups_by_enumeration, new_group with local synchronization or unsorted ranks,
merge_remote_group, and what torch asks a group about its backend (devices, splitting, store).

Every rank runs the same script twice in one job, on Gloo and then on ringlet, and the two
answers must match; sums are also checked against the value every rank computes by itself.
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


def _sum(group: Any, rank: int, direct: bool = False) -> float:
    """All-reduce ``rank + 1`` over ``group`` (``direct``: through the group's own method, as for
    a group torch did not register)."""
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    if direct:
        group.allreduce([t]).wait()
    else:
        dist.all_reduce(t, group=group)
    return float(t.item())


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # the type and message, compared between backends
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _cases(n: int, me: int) -> dict[str, Any]:
    """What this rank sees of each way of making a group (the same keys on every backend)."""
    import torch.distributed as dist

    world = dist.group.WORLD
    got: dict[str, Any] = {}
    cpu = world._get_backend(torch.device("cpu"))
    got["backend"] = (
        torch.device("cpu") in world._device_types,
        cpu.supports_splitting,
        cpu.supports_shrinking,
        world.get_group_store() is not None,
        cpu.options._timeout,
        dist.distributed_c10d._get_pg_default_device(world).type,
    )
    got["unsupported"] = [_error(getattr(cpu, m)).split(":")[0] for m in ("suspend", "resume")]
    # ProcessGroup.split_group: every rank calls it; the first half gets a group, the rest None
    # (both splits before either group is used: Gloo connects a split's ranks lazily)
    half = list(range((n + 1) // 2))
    part = world.split_group(half, timeout=timedelta(seconds=30), group_name=f"half{n}")
    rest = world.split_group(list(range(len(half), n)), group_name=f"rest{n}")
    got["split"] = None if part is None else (part.size(), part.rank(), _sum(part, me, True))
    got["split rest"] = None if rest is None else (rest.size(), rest.rank(), _sum(rest, me, True))
    if part is not None:
        got["split name"] = part.group_name
        inner = part.split_group([len(half) - 1], group_name=f"last{n}")  # a split of a split
        got["split of split"] = None if inner is None else (inner.size(), _sum(inner, me, True))
    # dist.split_group needs an accelerator device bound to the default group
    got["dist.split_group"] = _error(lambda: dist.split_group(split_ranks=[half]))
    if n % 2 == 0:
        sub, subs = dist.new_subgroups(2)
        got["new_subgroups"] = (sub.size(), sub.rank(), len(subs), _sum(sub, me))
        got["object on subgroup"] = [None, None]
        dist.all_gather_object(got["object on subgroup"], {"rank": me}, group=sub)
    odd, evens = [r for r in range(n) if r % 2], [r for r in range(n) if r % 2 == 0]
    mine, enum = dist.new_subgroups_by_enumeration([evens, odd] if odd else [evens])
    got["by enumeration"] = (mine.size(), mine.rank(), len(enum), _sum(mine, me))
    local = dist.new_group(odd if me % 2 else evens, use_local_synchronization=True)
    got["local sync"] = (local.size(), _sum(local, me))
    backwards = dist.new_group(list(reversed(range(n))), sort_ranks=False)
    got["unsorted"] = (
        backwards.rank(),
        dist.get_process_group_ranks(backwards),
        _sum(backwards, me),
    )
    got["default device"] = dist.distributed_c10d._get_pg_default_device(local).type
    # merge_remote_group: every process meets in a store and takes the next rank of the new group
    meeting = dist.PrefixStore("merge-test/", dist.distributed_c10d._get_default_store())
    merged = world.merge_remote_group(meeting, n, timedelta(seconds=30), f"merged{n}")
    got["merged"] = (merged.size(), _sum(merged, merged.rank(), True))
    got["merged rank"] = merged.rank()  # in store order: compared as a set below
    merged.shutdown()
    return got


def groups_like_gloo(
    comm: Any, ports: list[int], backends: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist

    import ringlet.torch  # noqa: F401  registers the backend

    n, me = comm.size, comm.rank
    out = {}
    for backend, port in zip(backends, ports, strict=False):
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=me,
            world_size=n,
            timeout=timedelta(seconds=60),
        )
        try:
            out[backend] = _cases(n, me)
        finally:
            dist.destroy_process_group()
    return out


def _expected(n: int, me: int) -> dict[str, Any]:
    """The sums (and sizes) each rank computes alone."""
    half = (n + 1) // 2
    first = me < half
    members = list(range(half)) if first else list(range(half, n))
    odd = [r for r in range(n) if r % 2]
    same_parity = [r for r in range(n) if r % 2 == me % 2]
    want: dict[str, Any] = {
        "split": (half, me, float(sum(r + 1 for r in members))) if first else None,
        "split rest": None if first else (n - half, me - half, float(sum(r + 1 for r in members))),
        "by enumeration": (
            len(same_parity),
            same_parity.index(me),
            2 if odd else 1,
            float(sum(r + 1 for r in same_parity)),
        ),
        "local sync": (len(same_parity), float(sum(r + 1 for r in same_parity))),
        "unsorted": (n - 1 - me, list(reversed(range(n))), float(n * (n + 1) // 2)),
        "merged": (n, float(n * (n + 1) // 2)),
    }
    if first:
        want["split of split"] = (1, float(half)) if me == half - 1 else None
    if n % 2 == 0:
        pair = [me - me % 2, me - me % 2 + 1]
        want["new_subgroups"] = (2, me % 2, n // 2, float(sum(r + 1 for r in pair)))
        want["object on subgroup"] = [{"rank": r} for r in pair]
    return want


@pytest.mark.torch
@pytest.mark.parametrize("n", [2, 3, 4])
def test_groups_like_gloo(n: int) -> None:
    # Gloo's own split groups hang now and then on this 2-core machine (at 4 ranks in 2 of 3
    # runs, at 2 ranks once in CI: ranks never return from a split's first all_reduce), which no
    # timeout of ours can catch; so by default ringlet is checked against the expected groups and
    # sums alone, and RINGLET_TEST_GLOO_GROUPS=1 also compares every case with Gloo.
    with_gloo = os.environ.get("RINGLET_TEST_GLOO_GROUPS") == "1"
    backends = ("gloo", "ringlet") if with_gloo else ("ringlet",)
    ports = [spmd.free_port(), spmd.free_port()]
    results = spmd.run(groups_like_gloo, n, ports, backends, env=TRANSPORT, timeout=150)
    failures = []
    for me, got in enumerate(results):
        ours = got["ringlet"]
        gloo = got.get("gloo", ours)
        for key in sorted((set(gloo) | set(ours)) - {"merged rank"}):
            if gloo.get(key) != ours.get(key):
                failures.append(
                    f"rank {me} {key}: gloo {gloo.get(key)!r}, ringlet {ours.get(key)!r}"
                )
        for key, want in _expected(n, me).items():
            if ours.get(key) != want:
                failures.append(f"rank {me} {key}: ringlet {ours.get(key)!r}, want {want!r}")
    merged = sorted(got["ringlet"]["merged rank"] for got in results)
    if merged != list(range(n)):
        failures.append(f"merge_remote_group gave ranks {merged}")
    assert not failures, "\n".join(failures)

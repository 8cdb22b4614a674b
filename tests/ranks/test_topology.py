"""Communicators that span hosts: shared memory inside a host and TCP between hosts in one call.

Hosts are simulated with RINGLET_HOST_ID (ranks with different ids never share memory); the same
layouts across real network namespaces are in tests/multihost. Every op, every algorithm and the
default choice run against NumPy; deterministic mode gives the same bits on every layout.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_collectives import run_cases

import spmd

LAYOUTS = {
    "2+2": (0, 0, 1, 1),
    "3+1": (0, 0, 0, 1),
    "2+1+1": (0, 0, 1, 2),
    "1+1": (0, 1),
    "interleaved 2+2": (0, 1, 0, 1),
    "3+2": (0, 0, 0, 1, 1),
    "4+4": (0, 0, 0, 0, 1, 1, 1, 1),
}


def hosted(layout: tuple[int, ...]) -> dict[str, object]:
    """spmd.run keywords that put rank r on simulated host ``layout[r]``."""
    return {"per_rank_env": lambda r: {"RINGLET_HOST_ID": f"h{layout[r]}"}}


def _seen(comm) -> tuple[tuple[int, ...], str, int, int]:  # type: ignore[no-untyped-def]
    return comm.hosts, comm.transport, comm.local_rank, comm.local_size


@pytest.mark.parametrize("name", ["2+2", "3+1", "2+1+1", "interleaved 2+2"])
def test_communicator_knows_its_hosts(name: str) -> None:
    layout = LAYOUTS[name]
    seen = spmd.run(_seen, len(layout), **hosted(layout))
    numbered = tuple(sorted(set(layout)).index(h) for h in layout)
    for r, (hosts, transport, local_rank, local_size) in enumerate(seen):
        assert hosts == numbered
        assert local_size == layout.count(layout[r])
        assert local_rank == layout[:r].count(layout[r])
        assert transport == ("shm+tcp" if local_size > 1 else "tcp")


@pytest.mark.parametrize(
    "name", ["2+2", "3+1", "2+1+1", *(pytest.param(n, marks=pytest.mark.long) for n in ("3+2", "4+4"))]
)
def test_every_collective_across_hosts(name: str) -> None:
    """1+1 and the interleaved 2+2 run across real namespaced hosts in tests/multihost; the 5- and
    8-rank layouts only with -m long (CI), the 4-rank ones by default."""
    layout = LAYOUTS[name]
    results = spmd.run(run_cases, len(layout), True, timeout=600, **hosted(layout))
    failures = [f"rank {r}: {b}" for r, bad in enumerate(results) for b in bad]
    assert not failures, "\n".join(failures[:50])


def _float_results(comm) -> bytes:  # type: ignore[no-untyped-def]
    """Reductions of random floats, where the fold order changes the bits."""
    n, me = comm.size, comm.rank
    out = []
    for count in (1, 1000, 300_001):
        for dt in (np.float32, np.float16):
            x = np.random.default_rng(me * 31 + count).standard_normal(count * n).astype(dt)
            out.append(comm.all_reduce(x[:count].copy()))
            got = comm.reduce(x[:count].copy(), root=n - 1)
            out.append(got if me == n - 1 else np.zeros(0, dt))
            out.append(comm.reduce_scatter(x.copy()))
    return b"".join(a.tobytes() for a in out)


def _left_fold(n: int) -> list[bytes]:
    """What every rank must get: each element folded in rank order by NumPy."""
    per_rank: list[list[np.ndarray]] = [[] for _ in range(n)]
    for count in (1, 1000, 300_001):
        for dt in (np.float32, np.float16):
            xs = [
                np.random.default_rng(r * 31 + count).standard_normal(count * n).astype(dt)
                for r in range(n)
            ]
            full = functools.reduce(np.add, [x[:count] for x in xs])
            scattered = functools.reduce(np.add, xs)
            for r in range(n):
                per_rank[r] += [
                    full,
                    full if r == n - 1 else np.zeros(0, dt),
                    scattered[r * count : (r + 1) * count],
                ]
    return [b"".join(a.tobytes() for a in arrays) for arrays in per_rank]


@pytest.mark.parametrize("n", [3, 4])
def test_deterministic_bits_do_not_depend_on_transport_or_layout(n: int) -> None:
    det = {"RINGLET_DETERMINISTIC": "1"}
    runs = {
        "shm": spmd.run(_float_results, n, env=det),
        "tcp": spmd.run(_float_results, n, env={**det, "RINGLET_TRANSPORT": "tcp"}),
        "mixed": spmd.run(
            _float_results, n, env=det, **hosted((0, 0, 1, 1)[:n] if n == 4 else (0, 0, 1))
        ),
    }
    want = _left_fold(n)
    for name, got in runs.items():
        assert got == want, f"{name}: deterministic results differ from the rank-order fold"


def _recorded(comm) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    comm.all_reduce(np.ones(1 << 18, np.float32))
    comm.all_gather(np.ones(10, np.float32))
    comm.broadcast(np.ones(5), root=0, algo="tree")
    return [(e.call.kind, e.algorithm, e.transport) for e in comm._recorder.entries]


def test_recorder_names_algorithm_and_transport_of_every_call() -> None:
    layout = (0, 0, 1, 1)
    for (kind, algo, transport), ref in zip(
        spmd.run(_recorded, 4, **hosted(layout))[0],
        ["all_reduce", "all_gather", "broadcast"],
        strict=True,
    ):
        assert kind == ref and algo and transport in ("shm", "tcp", "shm+tcp"), (kind, algo)
    one_host = spmd.run(_recorded, 2)[0]
    assert all(algo and transport == "shm" for _, algo, transport in one_host), one_host
    # the shm group names the way each call went: 1 MiB by single copy (or staged where
    # cross-memory attach is refused), 40 bytes in one step, with the row counts (eager)
    assert one_host[0][1] in ("shm_group/single_copy", "shm_group/staged"), one_host
    assert one_host[1][1] == "eager/shm_group/one_step", one_host
    assert one_host[-1][1] == "tree"  # a forced algorithm runs as a schedule over shared memory


def _init_only(comm) -> str:  # type: ignore[no-untyped-def]
    return "started"


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_unknown_forced_algorithm_is_an_error_on_every_rank(transport: str) -> None:
    env = {"RINGLET_ALGO": "no_such_algorithm", "RINGLET_TRANSPORT": transport}
    outcomes = spmd.run(_init_only, 2, env=env, expect_failure=True)
    for status, value in outcomes:
        assert status == "error" and "no_such_algorithm" in value, value

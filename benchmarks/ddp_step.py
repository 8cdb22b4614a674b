"""DDP training step time: ringlet's DDP, torch's DDP on backend "ringlet", torch's DDP on Gloo.

The same MLP (default 6 × Linear(2048, 2048): 25.2M parameters, 100 MB of float32 gradients)
trains with SGD on every rank; each configuration is timed in the same run, in rounds that rotate
their order, so a busy machine slows them alike. A step's time is the slowest rank's (forward,
backward with gradient averaging, optimizer step); the table shows the median over every timed
step, and "per round" the median and range of Gloo's step over this one's round by round (each
round times every configuration once, so a round's ratio holds up better when other work on the
machine comes and goes). "local" is the same step without any communication: the floor.
"torch DDP, no-op hook" is torch's DDP with a communication hook that does nothing: what torch's
reducer costs by itself (it copies every gradient into its buckets and back), the floor of any
backend under it.
", views" rows pass gradient_as_bucket_view=True (no copy back) and compare with Gloo so set.
"ringlet DDP, overlap" starts each bucket's averaging during backward (overlap=True), "no
overlap" when backward ends (overlap=False); the line under the table says which ringlet's DDP
picks by default here.

Run (2 ranks):
    ringlet run -n 2 benchmarks/ddp_step.py
    python benchmarks/ddp_step.py            # starts 2 ranks itself
Options: --layers, --hidden, --batch, --steps, --rounds, --threads, --bucket-cap-mb, --json FILE,
--config NAME (repeatable: time only these configurations, and Gloo's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as TorchDDP

import ringlet.torch as rt

CONFIGS = (
    "local",
    "torch DDP, no-op hook",
    "ringlet DDP, overlap",
    "ringlet DDP, no overlap",
    "torch DDP on ringlet",
    "torch DDP on gloo",
    "torch DDP on ringlet, views",
    "torch DDP on gloo, views",
)
BASELINE = "torch DDP on gloo"


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _no_op(state, bucket):  # type: ignore[no-untyped-def]  # torch rejects string annotations
    """A DDP communication hook that leaves the bucket as it is: torch DDP's own cost."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def wrap(name: str, model: torch.nn.Module, gloo: Any, args: argparse.Namespace) -> torch.nn.Module:
    cap = args.bucket_cap_mb
    if name.startswith("ringlet DDP"):
        return rt.DistributedDataParallel(
            model, bucket_cap_mb=cap, comm=rt.communicator(), overlap=name.endswith(", overlap")
        )
    if name == "local":
        return model
    views = name.endswith(", views")  # torch's gradient_as_bucket_view: no copy back to .grad
    group = gloo if "on gloo" in name else None
    ddp = TorchDDP(model, bucket_cap_mb=cap, process_group=group, gradient_as_bucket_view=views)
    if name == "torch DDP, no-op hook":
        ddp.register_comm_hook(None, _no_op)
    return ddp


def time_steps(model: torch.nn.Module, args: argparse.Namespace, rank: int) -> list[float]:
    """Warm up, then time ``args.steps`` training steps on this rank (seconds each)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.hidden, generator=g)
    y = torch.randn(args.batch, args.hidden, generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def slowest_rank(comm: Any, times: list[float]) -> list[float]:
    """Per step, the slowest rank's time (every rank gets the list)."""
    everyone = comm.all_gather(np.array([times], np.float64))
    return [float(t) for t in everyone.max(axis=0)]


def chosen(args: argparse.Namespace) -> tuple[str, ...]:
    """The configurations ``--config`` names (all by default); Gloo's rows always run."""
    if not args.config:
        return CONFIGS
    names = set(args.config)
    if unknown := names - set(CONFIGS):
        raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {CONFIGS}")
    names.add(BASELINE)
    if any(name.endswith(", views") for name in names):
        names.add(BASELINE + ", views")
    return tuple(name for name in CONFIGS if name in names)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("ringlet")
    comm = rt.communicator()
    gloo = dist.new_group(list(range(comm.size)), backend="gloo")
    configs = chosen(args)
    steps: dict[str, list[float]] = {name: [] for name in configs}
    overlap = ""
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
        for name in order:
            model = wrap(name, build_model(args), gloo, args)
            comm.barrier()
            steps[name] += slowest_rank(comm, time_steps(model, args, comm.rank))
            if isinstance(model, rt.DistributedDataParallel) and model.overlap and model.last_trace:
                overlap = model.last_trace.summary()
            del model
    default_overlap = rt.DistributedDataParallel(torch.nn.Linear(1, 1), comm=comm).overlap
    if comm.rank == 0:
        report(args, comm, steps, overlap, default_overlap)
    dist.destroy_process_group()


def paired(gloo: list[float], mine: list[float], per_round: int) -> list[float]:
    """Gloo's median step over this configuration's, round by round: the two ran minutes apart at
    most, so a load that drifts over the run moves both alike (the column's median and range)."""
    cut = range(0, len(mine), per_round)
    return [
        statistics.median(gloo[i : i + per_round]) / statistics.median(mine[i : i + per_round])
        for i in cut
    ]


def report(
    args: argparse.Namespace,
    comm: Any,
    steps: dict[str, list[float]],
    overlap: str,
    default_overlap: bool,
) -> None:
    params = sum(p.numel() for p in build_model(args).parameters())
    median = {name: statistics.median(times) for name, times in steps.items()}
    print(
        f"DDP step, {params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB of gradients), "
        f"batch {args.batch}/rank, {comm.size} ranks, {args.threads} torch thread(s)/rank, "
        f"ringlet transport {os.environ.get('RINGLET_TRANSPORT', 'auto')}, "
        f"{len(steps[BASELINE])} timed steps per configuration, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'configuration':<30}{'median step':>14}{'gloo / this':>14}{'per round':>24}")
    for name in steps:
        base = BASELINE if not name.endswith(", views") else BASELINE + ", views"
        rounds = paired(steps[base], steps[name], args.steps)
        spread = f"{statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
        print(
            f"{name:<30}{median[name] * 1e3:>11.1f} ms{median[base] / median[name]:>13.2f}x"
            f"{spread:>24}"
        )
    print(f"ringlet DDP's default here: {'overlap' if default_overlap else 'no overlap'}")
    print(f"ringlet DDP with overlap, last step: {overlap}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "params": params,
                        "ranks": comm.size,
                        "args": vars(args),
                        "median_s": median,
                        "steps_s": steps,
                        "overlap": overlap,
                    }
                )
                + "\n"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    run(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per configuration and round"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--ranks", type=int, default=2, help="ranks to start when not launched")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    parser.add_argument(
        "--config",
        action="append",
        help="a configuration to time, named as in the table (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    chosen(args)  # unknown names: exit before any rank starts
    if "RANK" in os.environ:
        run(args)
        return
    spawn: Callable[..., Any] = torch.multiprocessing.spawn
    spawn(_spawned, args=(args.ranks, _free_port(), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()

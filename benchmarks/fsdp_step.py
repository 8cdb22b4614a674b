"""FSDP2 training step time: ``fully_shard`` over a mesh of backend "ringlet" and over Gloo.

The same MLP (default 6 × Linear(1024, 1024): 6.3M parameters) is sharded layer by layer with
torch's FSDP2 (``fully_shard`` on each Linear and on the root) and trains with Adam. Each step
all-gathers every layer's parameters in forward and again in backward and reduce-scatters its
gradients. Both configurations run in the same job, in rounds that rotate their order, so a busy
machine slows them alike. A step's time is the slowest rank's; the table shows the median over
every timed step. "local" is one unsharded model with no communication: the floor.

Run (2 ranks):
    ringlet run -n 2 benchmarks/fsdp_step.py
    python benchmarks/fsdp_step.py            # starts 2 ranks itself
Options: --layers, --hidden, --batch, --steps, --rounds, --threads, --ranks, --json FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

import ringlet.torch as rt

CONFIGS = ("local", "FSDP2 on ringlet", "FSDP2 on gloo")
BASELINE = "FSDP2 on gloo"


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def wrap(name: str, model: torch.nn.Module, meshes: dict[str, DeviceMesh]) -> torch.nn.Module:
    if name == "local":
        return model
    mesh = meshes["gloo" if name.endswith("gloo") else "ringlet"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def time_steps(model: torch.nn.Module, args: argparse.Namespace, rank: int) -> list[float]:
    """Warm up, then time ``args.steps`` training steps on this rank (seconds each)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
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
    everyone = comm.all_gather(np.array([times], np.float64))
    return [float(t) for t in everyone.max(axis=0)]


def run(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dist.init_process_group("ringlet")
    comm = rt.communicator()
    gloo = dist.new_group(list(range(comm.size)), backend="gloo")
    meshes = {
        "ringlet": init_device_mesh("cpu", (comm.size,)),
        "gloo": DeviceMesh.from_group(gloo, "cpu"),
    }
    steps: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        order = CONFIGS[round_ % len(CONFIGS) :] + CONFIGS[: round_ % len(CONFIGS)]
        for name in order:
            model = wrap(name, build_model(args), meshes)
            comm.barrier()
            steps[name] += slowest_rank(comm, time_steps(model, args, comm.rank))
            del model
    if comm.rank == 0:
        report(args, comm, steps)
    dist.destroy_process_group()


def report(args: argparse.Namespace, comm: Any, steps: dict[str, list[float]]) -> None:
    params = sum(p.numel() for p in build_model(args).parameters())
    median = {name: statistics.median(times) for name, times in steps.items()}
    print(
        f"FSDP2 step, {params / 1e6:.1f}M parameters in {args.layers} sharded layers, "
        f"batch {args.batch}/rank, {comm.size} ranks, {args.threads} torch thread(s)/rank, "
        f"ringlet transport {os.environ.get('RINGLET_TRANSPORT', 'auto')} "
        f"({comm.transport}), {len(steps['local'])} timed steps per configuration, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'configuration':<22}{'median step':>14}{'gloo / this':>14}")
    for name in CONFIGS:
        print(f"{name:<22}{median[name] * 1e3:>11.1f} ms{median[BASELINE] / median[name]:>13.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            record = {"params": params, "ranks": comm.size, "args": vars(args), "steps_s": steps}
            f.write(json.dumps(record | {"median_s": median}) + "\n")


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
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per configuration and round"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--ranks", type=int, default=2, help="ranks to start when not launched")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        run(args)
        return
    spawn: Callable[..., Any] = torch.multiprocessing.spawn
    spawn(_spawned, args=(args.ranks, _free_port(), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()

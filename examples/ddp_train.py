"""Data-parallel training with ringlet's DistributedDataParallel, two micro-batches per step.

Gradients are averaged in buckets while backward is still running; rank 0 prints how much of the
communication started before backward ended. At the end every rank holds the same parameters.

Run: ringlet run -n 2 examples/ddp_train.py
"""

import numpy as np
import torch

import ringlet
from ringlet.torch import DistributedDataParallel


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the step's batch: a noisy linear target the MLP can learn."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(64, 128, generator=g)
    return x, x[:, :8].sum(dim=1, keepdim=True) + 0.01 * torch.randn(64, 1, generator=g)


with ringlet.init() as comm:
    torch.manual_seed(comm.rank)  # rank 0's initial parameters are broadcast to everyone
    mlp = torch.nn.Sequential(
        torch.nn.Linear(128, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    )
    # overlap=True: average each bucket while backward still runs. The default (None) decides
    # from the cores: with every core computing, shared-memory averaging only slows backward.
    model = DistributedDataParallel(mlp, comm=comm, bucket_cap_mb=0.1, overlap=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(30):
        x, y = batch(comm.rank, step)
        optimizer.zero_grad()
        with model.no_sync():  # first micro-batch: gradients accumulate locally
            torch.nn.functional.mse_loss(model(x[:32]), y[:32]).div(2).backward()
        loss = torch.nn.functional.mse_loss(model(x[32:]), y[32:]).div(2)
        loss.backward()  # second: the accumulated gradients are averaged over ranks
        optimizer.step()
        if step % 10 == 0 or step == 29:
            mean = float(comm.all_reduce(loss.detach().reshape(1) * 2, op="mean"))
            if comm.rank == 0:
                print(f"step {step:2d}: loss {mean:.4f}; {model.last_trace.summary()}")
    # Every rank must end with identical parameters.
    flat = torch.cat([p.detach().reshape(-1) for p in mlp.parameters()]).numpy()
    digests = comm.all_gather(np.frombuffer(flat.tobytes(), np.uint8)[None, :4096])
    assert all(np.array_equal(digests[0], d) for d in digests), "parameters differ between ranks"
    if comm.rank == 0:
        print(f"{comm.size} ranks hold identical parameters")

"""A CLIP-style contrastive loss over the global batch, with gradients flowing back to every rank.

Each rank embeds its own image/text pairs (batch sizes differ between ranks), gathers everyone's
embeddings with ``all_gather_with_grad``, and scores its rows against the whole global batch: the
other ranks' pairs are the negatives. Gradients of the gathered rows flow back to the ranks that
produced them, and DistributedDataParallel averages the parameter gradients.

Run: ringlet run -n 2 examples/clip_all_gather.py
"""

import torch
import torch.nn.functional as F

import ringlet
from ringlet.torch import DistributedDataParallel, all_gather_with_grad

TEMPERATURE = 0.1


class DualEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
        )
        self.text = torch.nn.Sequential(
            torch.nn.Linear(24, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
        )

    def forward(
        self, images: torch.Tensor, texts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1)


def pairs(rank: int, step: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and their captions: captions are a fixed (shared) projection of the images plus noise."""
    projection = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(count, 32, generator=g)
    return images, images @ projection + 0.1 * torch.randn(count, 24, generator=g)


with ringlet.init() as comm:
    torch.manual_seed(comm.rank)  # different initial weights: DDP starts everyone from rank 0's
    model = DistributedDataParallel(DualEncoder(), comm=comm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    counts = [8 + r for r in range(comm.size)]  # uneven local batches
    first = sum(counts[: comm.rank])  # where this rank's rows sit in the global batch
    labels = torch.arange(first, first + counts[comm.rank])
    losses = []
    for step in range(30):
        image_emb, text_emb = model(*pairs(comm.rank, step, counts[comm.rank]))
        all_images = all_gather_with_grad(image_emb, comm=comm)  # (sum(counts), 16) on every rank
        all_texts = all_gather_with_grad(text_emb, comm=comm)
        loss = (
            F.cross_entropy(image_emb @ all_texts.T / TEMPERATURE, labels)
            + F.cross_entropy(text_emb @ all_images.T / TEMPERATURE, labels)
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(comm.all_reduce(loss.detach().reshape(1), op="mean")))
    if comm.rank == 0:
        print(
            f"global batch {sum(counts)} from {comm.size} ranks; contrastive loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    assert losses[-1] < losses[0] / 2, losses

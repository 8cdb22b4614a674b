"""The torch.distributed default group a test rank starts on backend "ringlet" (tcp:// here)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def init(comm: Any, port: int) -> None:
    """Join ``comm``'s ranks in torch's default group on ringlet through ``tcp://127.0.0.1:port``."""
    import torch.distributed as dist

    import ringlet.torch  # noqa: F401  registers the backend

    dist.init_process_group(
        "ringlet",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=comm.rank,
        world_size=comm.size,
        timeout=timedelta(seconds=60),
    )

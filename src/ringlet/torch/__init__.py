"""ringlet for PyTorch: the torch.distributed backend "ringlet", DDP with overlap, all_gather with grad.

Importing this module registers the backend, so ``dist.init_process_group("ringlet")`` works
(env://, tcp:// and file:// init methods, torchrun's variables) and torch's own
DistributedDataParallel runs on it. The core package never imports torch; this module does.
"""

from __future__ import annotations

try:
    import torch.distributed as _dist
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ringlet.torch needs PyTorch: pip install 'ringlet[torch]' (tested with torch==2.13.0)"
    ) from exc

if not _dist.is_available():  # pragma: no cover - torch built without distributed
    raise ImportError("ringlet.torch needs a PyTorch build with torch.distributed")

from .autograd import all_gather_with_grad
from .backend import RingletProcessGroup, create_process_group, monitored_barrier
from .ddp import DistributedDataParallel
from .groups import communicator_for as communicator
from .hooks import allreduce_hook, bf16_compress_hook, fp16_compress_hook

BACKEND = "ringlet"


def _register() -> None:
    if BACKEND not in _dist.Backend.backend_list:
        _dist.Backend.register_backend(
            BACKEND, create_process_group, extended_api=True, devices=["cpu"]
        )


_register()

__all__ = [
    "BACKEND",
    "DistributedDataParallel",
    "RingletProcessGroup",
    "all_gather_with_grad",
    "allreduce_hook",
    "bf16_compress_hook",
    "communicator",
    "fp16_compress_hook",
    "monitored_barrier",
]

"""ringlet: collectives for Python processes — shared memory on one host, TCP across hosts.

The public names load on first use (PEP 562), so `ringlet run`, `ringlet --version` and the
launcher, which need none of them, do not import the communicator, its transports and NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .comm import Communicator
    from .errors import (
        BrokenCommunicator,
        CollectiveTimeout,
        MismatchError,
        PeerError,
        RingletError,
    )
    from .ops import ReduceOp
    from .survive import Elastic, elastic, shrink
    from .work import Work
    from .world import init

__version__ = "0.1.0"

__all__ = [
    "BrokenCommunicator",
    "CollectiveTimeout",
    "Communicator",
    "Elastic",
    "MismatchError",
    "PeerError",
    "ReduceOp",
    "RingletError",
    "Work",
    "__version__",
    "elastic",
    "init",
    "shrink",
]

#: The submodule each public name comes from.
_HOME = {
    "Communicator": "comm",
    "BrokenCommunicator": "errors",
    "CollectiveTimeout": "errors",
    "MismatchError": "errors",
    "PeerError": "errors",
    "RingletError": "errors",
    "ReduceOp": "ops",
    "Elastic": "survive",
    "elastic": "survive",
    "shrink": "survive",
    "Work": "work",
    "init": "world",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule the first time it is asked for."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'ringlet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

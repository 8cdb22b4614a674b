"""ringlet: collectives for Python processes — shared memory on one host, TCP across hosts."""

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

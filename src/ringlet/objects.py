"""The *_object collectives: pickle to bytes, move the bytes with the array collectives, unpickle.

Pickle runs only on data that arrived over connections authenticated with the job's secret (or
through this job's shared memory), never on anything from an unauthenticated peer. Each function
takes the communicator and uses only its public collectives.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .comm import Communicator


def _dumps(obj: Any) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)


def _loads(raw: np.ndarray) -> Any:
    return pickle.loads(raw.tobytes())


def broadcast_object(comm: Communicator, obj: Any, root: int = 0) -> Any:
    """Every rank gets root's ``obj`` (others' ``obj`` is ignored)."""
    length = np.array([0], np.int64)
    raw = _dumps(obj) if comm.rank == root else None
    if raw is not None:
        length[0] = raw.size
    comm.broadcast(length, root)
    buf = raw.copy() if raw is not None else np.empty(int(length[0]), np.uint8)
    comm.broadcast(buf, root)
    return obj if comm.rank == root else _loads(buf)


def _lengths(comm: Communicator, raw: np.ndarray) -> list[int]:
    return [int(n) for n in comm.all_gather(np.array([raw.size], np.int64))]


def all_gather_object(comm: Communicator, obj: Any) -> list[Any]:
    """Every rank gets the list of every rank's ``obj``, in rank order."""
    raw = _dumps(obj)
    lengths = _lengths(comm, raw)
    joined = comm.all_gather(raw)
    return [_loads(p) for p in np.split(joined, np.cumsum(lengths)[:-1])]


def gather_object(comm: Communicator, obj: Any, root: int = 0) -> list[Any] | None:
    """Root gets the list of every rank's ``obj``; the others get None."""
    raw = _dumps(obj)
    lengths = _lengths(comm, raw)
    joined = comm.gather(raw, root)
    if joined is None:
        return None
    return [_loads(p) for p in np.split(joined, np.cumsum(lengths)[:-1])]


def scatter_object(comm: Communicator, objs: list[Any] | None, root: int = 0) -> Any:
    """Root passes one object per rank; rank i gets ``objs[i]``."""
    if comm.rank == root:
        ok = objs is not None and len(objs) == comm.size
        parts = [_dumps(o) for o in objs] if ok and objs is not None else None
        return _loads(comm.scatter(parts if parts is not None else objs, root))
    return _loads(comm.scatter(None, root))

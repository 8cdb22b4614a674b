"""Which parameters a step can give a gradient: DDP's ``find_unused_parameters`` and ``static_graph``.

A parameter the forward did not use gets no gradient in backward, so its bucket would never be
complete and the ranks' calls would part ways. With ``find_unused_parameters`` DDP walks the
autograd graph of the forward's outputs once per step to find the parameters it can reach; the
others count as zero. The walk is here, apart from DDP's bucket bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["reachable_params"]


def reachable_params(outputs: Any) -> set[int]:
    """ids of the parameters autograd can reach from ``outputs`` (AccumulateGrad nodes' variables)."""
    roots: list[Any] = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen: set[Any] = set()
    found: set[int] = set()
    while roots:
        node = roots.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        roots.extend(fn for fn, _ in node.next_functions)
    return found


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)

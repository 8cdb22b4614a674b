"""What users pass in, as NumPy: arrays, CPU torch tensors and buffer-protocol objects.

Everything is viewed, never copied, so an in-place collective writes straight into the
caller's memory. torch is imported only when the caller already has it loaded: a tensor
cannot exist otherwise; ml_dtypes (bfloat16, ~1 s to import) only for a bfloat16 tensor.

Non-contiguous arrays (slices with steps, transposes) cannot be viewed flat; :func:`staged`
copies them into a contiguous buffer and back out after the collective.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["flat", "from_numpy_like", "is_torch", "staged", "to_numpy"]

_PASS_AN_ARRAY = "pass a NumPy array or a torch tensor (for a scalar or list: np.asarray(x))"


def _prefix(call: str) -> str:
    return f"{call}: " if call else ""


def is_torch(x: object) -> bool:
    """True for a torch.Tensor; never imports torch (if it is not loaded, x is no tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x: object, *, call: str = "", writable: bool = False) -> np.ndarray:
    """View ``x`` as a NumPy array sharing its memory.

    - np.ndarray: returned as is.
    - torch tensor on the CPU: a zero-copy view (bfloat16 through ml_dtypes.bfloat16); a tensor
      that requires grad is detached first (same storage).
    - other buffer-protocol objects (bytearray, memoryview, array.array, bytes): a view.

    ``writable=True`` is for arrays a collective writes into: a read-only array is a ValueError.
    Raises TypeError for tensors off the CPU, sparse tensors, Python scalars and lists.
    """
    if isinstance(x, np.ndarray):
        array = x
    elif is_torch(x):
        array = _torch_to_numpy(x, call=call, writable=writable)
    elif isinstance(x, (np.generic, int, float, complex, bool, list, tuple, str)):
        # np.generic has the buffer protocol but is immutable: treat it as the scalar it is.
        raise TypeError(f"{_prefix(call)}got {type(x).__name__}; {_PASS_AN_ARRAY}")
    else:
        try:
            view = memoryview(x)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{_prefix(call)}got {type(x).__name__}; {_PASS_AN_ARRAY}") from None
        try:
            array = np.asarray(view)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise TypeError(
                f"{_prefix(call)}cannot view {type(x).__name__} with buffer format "
                f"{view.format!r} as a NumPy array ({e}); {_PASS_AN_ARRAY}"
            ) from None
    if writable and not array.flags.writeable:
        raise ValueError(
            f"{_prefix(call)}the {type(x).__name__} passed is read-only but this call writes "
            "its result into it; pass a writable array (for example a copy)"
        )
    return array


def _torch_to_numpy(tensor: Any, *, call: str, writable: bool) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (torch is loaded: the caller holds a tensor)."""
    import torch

    if tensor.device.type != "cpu":
        raise TypeError(
            f"{_prefix(call)}tensor is on {tensor.device}; ringlet moves CPU memory only: "
            "pass t.cpu() and copy the result back"
        )
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{_prefix(call)}tensor has layout {tensor.layout}; pass a dense tensor (t.to_dense())"
        )
    if tensor.requires_grad:
        tensor = tensor.detach()  # same storage; a collective is not part of the graph
    if tensor.is_conj() or tensor.is_neg():
        if writable:
            raise TypeError(
                f"{_prefix(call)}tensor has its lazy conjugate/negative bit set, so its memory "
                "does not hold its values; call t.resolve_conj() / t.resolve_neg() first"
            )
        tensor = tensor.resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16: view the same bits as int16, then as ml_dtypes.bfloat16.
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # type: ignore[no-any-return]
    try:
        return tensor.numpy()  # type: ignore[no-any-return]
    except (TypeError, RuntimeError) as e:
        raise TypeError(
            f"{_prefix(call)}torch dtype {tensor.dtype} has no NumPy equivalent ({e})"
        ) from None


def flat(a: np.ndarray) -> np.ndarray | None:
    """A 1-D view of ``a`` sharing its memory, or None when ``a`` is not C-contiguous.

    A 0-d array gives a view of shape (1,); an empty array a view of shape (0,).
    """
    if not a.flags.c_contiguous:
        return None
    return a.reshape(-1)  # a view: reshaping C-contiguous memory never copies


def from_numpy_like(template: object, a: np.ndarray) -> object:
    """Return the new array ``a`` as the caller's type: a torch tensor for torch input.

    The tensor shares ``a``'s memory (bfloat16 comes back as torch.bfloat16). For any other
    template ``a`` itself is returned.
    """
    if not is_torch(template):
        return a
    import torch

    if a.dtype.name == "bfloat16":  # only ml_dtypes' bfloat16 has that name
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _nothing() -> None:
    """The write-back of a view that already is the caller's memory."""


def staged(a: np.ndarray, *, copy_in: bool = True) -> tuple[np.ndarray, Callable[[], None]]:
    """A flat contiguous working array for ``a`` and a function that writes it back into ``a``.

    When ``a`` is C-contiguous the working array is a view and the write-back does nothing.
    Otherwise ``a`` is copied in (skipped with ``copy_in=False``, for arrays that are only
    written, like a broadcast's receivers) and the write-back copies the result out.
    """
    view = flat(a)
    if view is not None:
        return view, _nothing
    work = np.ascontiguousarray(a).reshape(-1) if copy_in else np.empty(a.size, a.dtype)

    def write_back() -> None:
        np.copyto(a, work.reshape(a.shape))

    return work, write_back

"""Views of user arrays: NumPy, buffer-protocol objects and CPU torch tensors share memory."""

from __future__ import annotations

import array
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ringlet.arrays import flat, from_numpy_like, is_torch, staged, to_numpy
from ringlet.ops import ReduceOp, combine


@pytest.fixture
def torch() -> ModuleType:
    return pytest.importorskip("torch", reason="PyTorch is not installed")


# ---------------------------------------------------------------- NumPy and buffers


def test_ndarray_is_returned_itself() -> None:
    a = np.arange(4.0)
    assert to_numpy(a) is a
    assert to_numpy(a, writable=True) is a


def test_read_only_array_is_refused_only_for_writing() -> None:
    a = np.arange(4.0)
    a.flags.writeable = False
    assert to_numpy(a) is a
    with pytest.raises(ValueError, match=r"broadcast: .*read-only"):
        to_numpy(a, call="broadcast", writable=True)


def test_buffer_protocol_objects_are_views() -> None:
    data = bytearray(b"\x01\x02\x03")
    view = to_numpy(data, writable=True)
    assert view.dtype == np.uint8 and view.shape == (3,)
    view[0] = 9
    assert data[0] == 9

    numbers = array.array("d", [1.0, 2.0])
    view = to_numpy(numbers, writable=True)
    assert view.dtype == np.float64
    view[1] = 5.0
    assert numbers[1] == 5.0

    ints = array.array("i", [1, 2, 3])
    shaped = to_numpy(memoryview(ints).cast("B").cast("i", (3, 1)))
    assert shaped.shape == (3, 1) and shaped.dtype == np.intc
    ints[2] = 7
    assert shaped[2, 0] == 7


def test_bytes_are_readable_not_writable() -> None:
    assert to_numpy(b"ab").tolist() == [97, 98]
    with pytest.raises(ValueError, match="read-only"):
        to_numpy(b"ab", writable=True)


@pytest.mark.parametrize("x", [3, 2.5, 1j, True, [1, 2], (1, 2), "abc", np.float32(1), None, {}])
def test_non_arrays_are_refused(x: Any) -> None:
    with pytest.raises(TypeError, match=r"all_reduce: got .*pass a NumPy array or a torch tensor"):
        to_numpy(x, call="all_reduce")


# ---------------------------------------------------------------- flat and staged


def test_flat_views_contiguous_memory() -> None:
    a = np.arange(12.0).reshape(3, 4)
    view = flat(a)
    assert view is not None and view.shape == (12,)
    view[5] = -1
    assert a[1, 1] == -1

    scalar = np.array(3.0)
    view = flat(scalar)
    assert view is not None and view.shape == (1,)
    view[0] = 4.0
    assert scalar.item() == 4.0

    empty = flat(np.zeros((0, 3)))
    assert empty is not None and empty.shape == (0,)


@pytest.mark.parametrize(
    "make",
    [lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1], lambda a: np.asfortranarray(a)],
    ids=["step", "transpose", "reversed", "fortran"],
)
def test_flat_refuses_non_contiguous(make: Any) -> None:
    assert flat(make(np.arange(12.0).reshape(3, 4))) is None


def test_staged_contiguous_is_the_memory_itself() -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    work, write_back = staged(a)
    assert np.shares_memory(work, a)
    combine(ReduceOp.SUM, work, np.ones(6, np.int32))
    assert a.tolist() == [[1, 2, 3], [4, 5, 6]]
    write_back()  # nothing to do, and harmless
    assert a.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    "make",
    [lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1, 1:3]],
    ids=["step", "transpose", "reversed"],
)
def test_staged_non_contiguous_round_trip(make: Any) -> None:
    parent = np.arange(24.0).reshape(4, 6)
    original = parent.copy()
    target = make(parent)
    expected_order = make(original).reshape(-1).tolist()  # C order of the logical array
    work, write_back = staged(target)
    assert not np.shares_memory(work, parent)
    assert work.shape == (target.size,) and work.flags.c_contiguous
    assert work.tolist() == expected_order  # copied in
    combine(ReduceOp.PROD, work, np.full(work.size, -1.0))
    assert np.array_equal(parent, original)  # nothing lands before write_back
    write_back()
    want = original.copy()
    make(want)[...] *= -1
    assert np.array_equal(parent, want)  # the view's elements changed, the others did not


def test_staged_without_copy_in() -> None:
    parent = np.zeros((3, 4))
    target = parent[:, 1::2]
    work, write_back = staged(target, copy_in=False)
    work[...] = np.arange(work.size)
    write_back()
    assert target.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert parent[:, 0::2].sum() == 0


def test_staged_zero_d_and_empty() -> None:
    scalar = np.array(2.0)
    work, write_back = staged(scalar)
    work[0] = 5.0
    write_back()
    assert scalar.item() == 5.0
    empty = np.zeros((4, 0))[::2]
    work, write_back = staged(empty)
    assert work.shape == (0,)
    write_back()


def test_from_numpy_like_without_torch_is_the_array() -> None:
    a = np.arange(3)
    assert from_numpy_like(np.zeros(1), a) is a
    assert from_numpy_like(bytearray(1), a) is a


# ---------------------------------------------------------------- torch


TORCH_DTYPES = ["float32", "int64", "bfloat16", "float16", "bool", "uint8", "complex64"]


@pytest.mark.torch
@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_torch_tensors_are_zero_copy_views(torch: ModuleType, name: str) -> None:
    dtype = getattr(torch, name)
    t = torch.zeros(5, dtype=dtype)
    assert is_torch(t)
    a = to_numpy(t, writable=True)
    expected = ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
    assert a.dtype == expected and a.shape == (5,)
    a[2] = 1  # numpy → tensor
    assert t[2].item() == 1 and t.sum().item() == 1
    t[4] = 1  # tensor → numpy
    assert a[4] == 1


@pytest.mark.torch
def test_torch_bfloat16_values_survive(torch: ModuleType) -> None:
    t = torch.tensor([1.5, -2.25, 3e38, float("inf")], dtype=torch.bfloat16)
    a = to_numpy(t)
    assert a.astype(np.float64).tolist() == t.to(torch.float64).tolist()


@pytest.mark.torch
def test_torch_requires_grad_is_detached_in_place(torch: ModuleType) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    a = to_numpy(param, writable=True)
    a[...] = 7.0
    assert param.detach().tolist() == [7.0, 7.0, 7.0]
    assert param.requires_grad  # the caller's tensor is untouched otherwise


@pytest.mark.torch
def test_torch_non_contiguous_tensor_staged(torch: ModuleType) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    target = t.t()
    a = to_numpy(target, writable=True)
    assert flat(a) is None
    work, write_back = staged(a)
    combine(ReduceOp.SUM, work, np.ones(work.size, np.float32))
    write_back()
    assert t.tolist() == (torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1).tolist()


@pytest.mark.torch
def test_torch_0d_and_empty(torch: ModuleType) -> None:
    scalar = torch.tensor(2.0)
    a = to_numpy(scalar, writable=True)
    assert a.shape == ()
    view = flat(a)
    assert view is not None
    view[0] = 3.0
    assert scalar.item() == 3.0
    assert to_numpy(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.torch
def test_torch_refusals(torch: ModuleType) -> None:
    with pytest.raises(TypeError, match="meta"):
        to_numpy(torch.zeros(2, device="meta"), call="all_reduce")
    with pytest.raises(TypeError, match="layout"):
        to_numpy(torch.zeros(2, 2).to_sparse())
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        to_numpy(torch.zeros(2, dtype=torch.float8_e4m3fn))


@pytest.mark.torch
def test_torch_conjugate_view(torch: ModuleType) -> None:
    c = torch.tensor([1 + 2j, 3 - 1j]).conj()
    assert to_numpy(c).tolist() == [1 - 2j, 3 + 1j]  # read: resolved into a copy
    with pytest.raises(TypeError, match="resolve_conj"):
        to_numpy(c, writable=True)  # written: a copy would lose the result


@pytest.mark.torch
@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_from_numpy_like_returns_torch_for_torch(torch: ModuleType, name: str) -> None:
    template = torch.zeros(2, dtype=getattr(torch, name))
    expected = torch.arange(6).reshape(3, 2).to(template.dtype)
    result = from_numpy_like(template, to_numpy(expected.clone()))
    assert isinstance(result, torch.Tensor)
    assert result.dtype == template.dtype and torch.equal(result, expected)
    source = to_numpy(expected)
    array_out = source.copy()
    tensor_out = from_numpy_like(template, array_out)
    array_out[0, 0] = 1
    assert tensor_out[0, 0].item() == 1  # shares the array's memory

"""Collectives that copy straight between the ranks' own buffers with cross-memory attach.

Each rank publishes the address of its buffer on arrival; peers then read (or, for reduce, write)
it with one kernel copy, no staging. A rank's buffer must stay untouched until every peer is done
with it, so every algorithm ends with a step all ranks publish after their last access. Reductions
go through two private scratch buffers of ``scratch_bytes`` so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ringlet.ops import Binary

from .cma import CrossMemory
from .shm_channel import Channel, Finish
from .shm_segment import ADDR_A, ADDR_B

Read = Callable[[int, int, np.ndarray], None]  # (peer, element offset, into)


class Scratch:
    """Two private byte buffers the reductions fold through, allocated on first use."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._bufs: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, dtype: np.dtype, count: int) -> tuple[np.ndarray, np.ndarray]:
        if self._bufs is None:
            self._bufs = (np.empty(self.nbytes, np.uint8), np.empty(self.nbytes, np.uint8))
        size = count * dtype.itemsize
        return self._bufs[0][:size].view(dtype), self._bufs[1][:size].view(dtype)


def _addresses(ch: Channel, word: int) -> list[int]:
    return [ch.word(q, word) for q in range(ch.size)]


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _fold_remote(
    ch: Channel,
    f: Binary,
    read: Read,
    start: int,
    own: np.ndarray,
    dest: np.ndarray,
    in_place: bool,
    scratch: Scratch,
) -> None:
    """dest = op(x_0, …, x_{N-1}) over elements [start, start + len(own)) in rank order, where
    x_rank is ``own`` and the peers' parts are read through ``read``. ``in_place``: dest is own."""
    acc_tmp, incoming = scratch.get(own.dtype, own.size)
    acc: np.ndarray | None = None
    for q in range(ch.size):
        if q == ch.rank:
            if acc is None:
                if not in_place:
                    np.copyto(dest, own)
            else:
                f(acc, own, dest)
            acc = dest
        elif acc is None:  # rank 0's part starts the fold; read it straight where it is kept
            acc = acc_tmp if in_place else dest
            read(q, start, acc)
        else:
            read(q, start, incoming)
            f(acc, incoming, acc)


def _chunks(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def all_reduce(
    ch: Channel,
    cma: CrossMemory,
    buf: np.ndarray,
    f: Binary,
    sig: int,
    deadline: float,
    scratch: Scratch,
    finish: Finish | None = None,
) -> None:
    """Rank r folds piece r of everyone's buffer into its own, a chunk at a time, applies
    ``finish`` and writes the chunk into every peer's buffer while it is still in cache.

    Only rank r reads or writes piece r of a peer's buffer (it reads each chunk before it
    overwrites it), so one step after the arrival is enough: when every rank has published it,
    every piece has landed everywhere and no buffer is read any more. Per rank that is one read
    of its own piece and the peers', one write of its piece everywhere: no reduced piece is read
    back from memory.
    """
    r, size, n, isz = ch.rank, ch.size, buf.size, buf.dtype.itemsize
    ch.arrive("all_reduce", sig, n, deadline, addr_a=_address(buf))
    addrs = _addresses(ch, ADDR_A)

    def read(q: int, offset: int, into: np.ndarray) -> None:
        cma.read(q, addrs[q] + offset * isz, into)

    piece = -(-n // size)
    for a, b in _chunks(r * piece, min((r + 1) * piece, n), scratch.nbytes // isz):
        done = buf[a:b]
        _fold_remote(ch, f, read, a, done, done, True, scratch)
        if finish is not None:
            finish(done)
        for i in range(1, size):  # start at the next rank so the ranks write different peers
            q = (r + i) % size
            cma.write(q, addrs[q] + a * isz, done)
    ch.advance(deadline, "reduced")


def reduce(
    ch: Channel,
    cma: CrossMemory,
    buf: np.ndarray,
    out: np.ndarray | None,
    root: int,
    f: Binary,
    sig: int,
    deadline: float,
    scratch: Scratch,
) -> None:
    """Rank r folds piece r of everyone's buffer and writes it into the root's ``out``."""
    r, size, n, isz = ch.rank, ch.size, buf.size, buf.dtype.itemsize
    out_addr = _address(out) if out is not None else 0
    ch.arrive("reduce", sig, n, deadline, addr_a=_address(buf), addr_b=out_addr)
    addrs = _addresses(ch, ADDR_A)
    root_out = ch.word(root, ADDR_B)

    def read(q: int, offset: int, into: np.ndarray) -> None:
        cma.read(q, addrs[q] + offset * isz, into)

    piece = -(-n // size)
    in_place = out is not None and _address(out) == _address(buf)
    for a, b in _chunks(r * piece, min((r + 1) * piece, n), scratch.nbytes // isz):
        if out is not None:
            _fold_remote(ch, f, read, a, buf[a:b], out[a:b], in_place, scratch)
        else:
            result = scratch.get(buf.dtype, b - a)[0]
            _fold_remote(ch, f, read, a, buf[a:b], result, False, scratch)
            cma.write(root, root_out + a * isz, result)
    ch.advance(deadline, "reduced")


def broadcast(
    ch: Channel, cma: CrossMemory, buf: np.ndarray, root: int, sig: int, deadline: float
) -> None:
    """Every rank reads the root's buffer."""
    ch.arrive("broadcast", sig, buf.size, deadline, addr_a=_address(buf))
    if ch.rank != root and buf.size:
        cma.read(root, ch.word(root, ADDR_A), buf)
    ch.advance(deadline, "copied")


def gather(
    ch: Channel,
    cma: CrossMemory,
    inp: np.ndarray,
    out: np.ndarray | None,
    counts: Sequence[int],
    root: int | None,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """The root (every rank for all_gather, root None) reads each peer's input into place."""
    r, size = ch.rank, ch.size
    kind = "all_gather" if root is None else "gather"
    ch.arrive(kind, sig, layout, deadline, addr_a=_address(inp))
    if out is not None and (root is None or root == r):
        displs = np.cumsum([0, *counts]).tolist()
        for i in range(1, size):
            q = (r + i) % size
            if counts[q]:
                cma.read(q, ch.word(q, ADDR_A), out[displs[q] : displs[q + 1]])
        np.copyto(out[displs[r] : displs[r + 1]], inp)
    ch.advance(deadline, "copied")


def scatter(
    ch: Channel,
    cma: CrossMemory,
    inp: np.ndarray | None,
    out: np.ndarray,
    counts: Sequence[int],
    root: int,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """Every rank reads its part of the root's input."""
    r = ch.rank
    ch.arrive("scatter", sig, layout, deadline, addr_a=_address(inp) if inp is not None else 0)
    start = sum(counts[:r])
    if r == root:
        if inp is not None:
            np.copyto(out, inp[start : start + counts[r]])
    elif counts[r]:
        cma.read(root, ch.word(root, ADDR_A) + start * out.dtype.itemsize, out)
    ch.advance(deadline, "copied")


def reduce_scatter(
    ch: Channel,
    cma: CrossMemory,
    inp: np.ndarray,
    out: np.ndarray,
    counts: Sequence[int],
    f: Binary,
    sig: int,
    layout: int,
    deadline: float,
    scratch: Scratch,
) -> None:
    """Rank r folds its part of everyone's input into ``out``."""
    r, isz = ch.rank, inp.dtype.itemsize
    ch.arrive("reduce_scatter", sig, layout, deadline, addr_a=_address(inp))
    addrs = _addresses(ch, ADDR_A)

    def read(q: int, offset: int, into: np.ndarray) -> None:
        cma.read(q, addrs[q] + offset * isz, into)

    start = sum(counts[:r])
    for a, b in _chunks(0, counts[r], scratch.nbytes // isz):
        _fold_remote(ch, f, read, start + a, inp[start + a : start + b], out[a:b], False, scratch)
    ch.advance(deadline, "reduced")

"""Collectives through the staging buffers of the segment, one chunk per step, double-buffered.

Every algorithm here writes the data of step t into its own staging buffer of parity t % 2 before
publishing t, and after the wait of step t reads the peers' buffers of that parity (see
shm_channel). Memory stays at 2 x stage_bytes per rank whatever the message size. With one
step these are the small-message ("flat") paths: the first step is the call's arrival.

Chunks are counted in elements; a staging buffer of ``stage_bytes`` holds ``stage_bytes //
itemsize`` of them, or is split into sub-slots, one per receiving peer, for the ops where each
rank sends different data to different peers (scatter, reduce_scatter).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringlet.ops import Binary, fold

from .shm_channel import Channel, Finish

ALIGN = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _displacements(counts: Sequence[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


def _sub_slot(stage_bytes: int, slots: int, itemsize: int) -> int:
    """Elements per sub-slot when a staging buffer is split ``slots`` ways (64-byte aligned)."""
    return max(stage_bytes // max(slots, 1) // ALIGN * ALIGN // itemsize, 1)


def _virtual(writer: int, reader: int) -> int:
    """Index of ``reader``'s sub-slot in ``writer``'s buffer: the peers in rank order, skipping
    the writer itself."""
    return reader if reader < writer else reader - 1


def _piece(j: int, per_step: int, count: int) -> tuple[int, int]:
    """Element range of step ``j`` in a block of ``count`` elements sent ``per_step`` at a time."""
    return min(j * per_step, count), min((j + 1) * per_step, count)


def flat_reduce(
    ch: Channel,
    buf: np.ndarray,
    out: np.ndarray | None,
    f: Binary,
    sig: int,
    deadline: float,
    kind: str,
    finish: Finish | None = None,
) -> None:
    """One step: every rank stages all of ``buf``; each rank with an ``out`` folds all stages in
    rank order (all_reduce: every rank, out is buf; reduce: the root), then applies ``finish``."""
    views = ch.flat_views(buf.dtype, buf.size)[ch.parity]
    np.copyto(views[ch.rank], buf)
    ch.arrive(kind, sig, buf.size, deadline)
    if out is not None:
        fold(f, views, out)
        if finish is not None:
            finish(out)


def pipelined_reduce(
    ch: Channel,
    buf: np.ndarray,
    out: np.ndarray | None,
    f: Binary,
    sig: int,
    deadline: float,
    kind: str,
    finish: Finish | None = None,
) -> None:
    """Reduce-scatter then all-gather, one chunk per step. A chunk is cut into N pieces; rank r
    reduces piece r. At step j a rank stages the other ranks' pieces of chunk j (one sub-slot
    each), folds piece r of chunk j from those sub-slots and its own ``buf`` into the result
    sub-slot of its other buffer (published with step j + 1) and into ``out``, and copies the
    others' results of chunk j - 1 into ``out``. ``out`` is None on reduce's non-roots (``buf``
    stays unchanged) and may be ``buf``. ``finish`` is applied to each folded piece before it
    is published, so every rank copies the finished values. K chunks take K + 1 steps; per chunk
    of c bytes a rank copies about 2c bytes and reads c from the fold."""
    r, n, size, dt = ch.rank, buf.size, ch.size, buf.dtype
    per_slot = _sub_slot(ch.stage_bytes, size, dt.itemsize)
    result_slot = (size - 1) * per_slot  # after the N - 1 incoming pieces
    chunk = per_slot * size
    chunks = _ceil_div(n, chunk)
    for j in range(chunks + 1):
        p = ch.parity
        start, stop = min(j * chunk, n), min((j + 1) * chunk, n)
        piece = _ceil_div(stop - start, size)
        if j < chunks:
            for q in range(size):
                a, b = _piece(q, piece, stop - start)
                if q != r and b > a:
                    stage = ch.stage(r, p, dt, _virtual(r, q) * per_slot, b - a)
                    np.copyto(stage, buf[start + a : start + b])
        if j == 0:
            ch.arrive(kind, sig, n, deadline)
        else:
            ch.advance(deadline)
        if j > 0 and out is not None:  # the others' reduced pieces of the previous chunk
            prev = (j - 1) * chunk
            length = min(chunk, n - prev)
            for q in range(size):
                a, b = _piece(q, _ceil_div(length, size), length)
                if q != r and b > a:
                    np.copyto(out[prev + a : prev + b], ch.stage(q, p, dt, result_slot, b - a))
        a, b = _piece(r, piece, stop - start)
        if j < chunks and b > a:  # fold this rank's piece; the others copy it next step
            sources = [
                buf[start + a : start + b]
                if q == r
                else ch.stage(q, p, dt, _virtual(q, r) * per_slot, b - a)
                for q in range(size)
            ]
            result = ch.stage(r, p ^ 1, dt, result_slot, b - a)
            fold(f, sources, result)
            if finish is not None:
                finish(result)
            if out is not None:
                np.copyto(out[start + a : start + b], result)


def broadcast(ch: Channel, buf: np.ndarray, root: int, sig: int, deadline: float) -> None:
    """Root stages chunk j at step j; the others copy it out."""
    r, n, dt = ch.rank, buf.size, buf.dtype
    chunk = ch.stage_bytes // dt.itemsize
    for j in range(max(_ceil_div(n, chunk), 1)):
        p = ch.parity
        start, stop = _piece(j, chunk, n)
        if r == root:
            np.copyto(ch.stage(r, p, dt, 0, stop - start), buf[start:stop])
        if j == 0:
            ch.arrive("broadcast", sig, n, deadline)
        else:
            ch.advance(deadline)
        if r != root:
            np.copyto(buf[start:stop], ch.stage(root, p, dt, 0, stop - start))


def flat_gather(
    ch: Channel,
    inp: np.ndarray,
    out: np.ndarray | None,
    counts: tuple[int, ...],
    displs: Sequence[int],
    root: int | None,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """:func:`gather` when every rank's input fits a staging buffer: one step, cached views."""
    r = ch.rank
    views = ch.flat_parts(inp.dtype, counts)[ch.parity]
    if r != root:
        np.copyto(views[r], inp)
    ch.arrive("all_gather" if root is None else "gather", sig, layout, deadline)
    if out is not None:
        for q, view in enumerate(views):
            np.copyto(out[displs[q] : displs[q] + counts[q]], inp if q == r else view)


def gather(
    ch: Channel,
    inp: np.ndarray,
    out: np.ndarray | None,
    counts: Sequence[int],
    root: int | None,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """Every rank stages piece j of its input at step j; the root (or, with root None, every
    rank: all_gather) copies the peers' pieces into place in ``out``."""
    r, size, dt = ch.rank, ch.size, inp.dtype
    chunk = ch.stage_bytes // dt.itemsize
    displs = _displacements(counts)
    kind = "all_gather" if root is None else "gather"
    readers = range(size) if root is None else (root,)
    for j in range(max(_ceil_div(max(counts, default=0), chunk), 1)):
        p = ch.parity
        start, stop = _piece(j, chunk, counts[r])
        if r != root and stop > start:
            np.copyto(ch.stage(r, p, dt, 0, stop - start), inp[start:stop])
        if j == 0:
            ch.arrive(kind, sig, layout, deadline)
        else:
            ch.advance(deadline)
        if r in readers and out is not None:
            for q in range(size):
                a, b = _piece(j, chunk, counts[q])
                if q != r and b > a:
                    np.copyto(out[displs[q] + a : displs[q] + b], ch.stage(q, p, dt, 0, b - a))
    if r in readers and out is not None:
        np.copyto(out[displs[r] : displs[r] + counts[r]], inp)


def flat_scatter(
    ch: Channel,
    inp: np.ndarray | None,
    out: np.ndarray,
    displs: Sequence[int],
    total: int,
    root: int,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """:func:`scatter` when the root's whole input fits a staging buffer: one step."""
    r, dt, p = ch.rank, out.dtype, ch.parity
    if r == root and inp is not None:
        np.copyto(ch.flat_views(dt, total)[p][r], inp)
    ch.arrive("scatter", sig, layout, deadline)
    if r == root and inp is not None:
        np.copyto(out, inp[displs[r] : displs[r] + out.size])
    else:
        np.copyto(out, ch.part_views(dt, displs[r], out.size)[p][root])


def scatter(
    ch: Channel,
    inp: np.ndarray | None,
    out: np.ndarray,
    counts: Sequence[int],
    root: int,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """Root stages piece j of every other rank's part at step j, one sub-slot each."""
    r, size, dt = ch.rank, ch.size, out.dtype
    per_step = _sub_slot(ch.stage_bytes, size - 1, dt.itemsize)
    displs = _displacements(counts)
    steps = max([_ceil_div(c, per_step) for q, c in enumerate(counts) if q != root] + [1])
    for j in range(steps):
        p = ch.parity
        if r == root and inp is not None:
            _stage_parts(ch, inp, counts, displs, per_step, j, p)
        if j == 0:
            ch.arrive("scatter", sig, layout, deadline)
        else:
            ch.advance(deadline)
        a, b = _piece(j, per_step, counts[r])
        if r != root and b > a:
            np.copyto(out[a:b], ch.stage(root, p, dt, _virtual(root, r) * per_step, b - a))
    if r == root and inp is not None:
        np.copyto(out, inp[displs[r] : displs[r] + counts[r]])


def flat_reduce_scatter(
    ch: Channel,
    inp: np.ndarray,
    out: np.ndarray,
    displs: Sequence[int],
    f: Binary,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """:func:`reduce_scatter` when a whole input fits a staging buffer: every rank stages all of
    it and folds its own part from every stage, in one step."""
    r, dt, p = ch.rank, inp.dtype, ch.parity
    np.copyto(ch.flat_views(dt, inp.size)[p][r], inp)
    ch.arrive("reduce_scatter", sig, layout, deadline)
    fold(f, ch.part_views(dt, displs[r], out.size)[p], out)


def reduce_scatter(
    ch: Channel,
    inp: np.ndarray,
    out: np.ndarray,
    counts: Sequence[int],
    f: Binary,
    sig: int,
    layout: int,
    deadline: float,
) -> None:
    """Every rank stages piece j of each peer's part in that peer's sub-slot; each rank folds
    its part's pieces from all ranks (its own straight from ``inp``) into ``out``."""
    r, size, dt = ch.rank, ch.size, inp.dtype
    per_step = _sub_slot(ch.stage_bytes, size - 1, dt.itemsize)
    displs = _displacements(counts)
    for j in range(max(_ceil_div(max(counts, default=0), per_step), 1)):
        p = ch.parity
        _stage_parts(ch, inp, counts, displs, per_step, j, p)
        if j == 0:
            ch.arrive("reduce_scatter", sig, layout, deadline)
        else:
            ch.advance(deadline)
        a, b = _piece(j, per_step, counts[r])
        if b > a:
            sources = [
                inp[displs[r] + a : displs[r] + b]
                if q == r
                else ch.stage(q, p, dt, _virtual(q, r) * per_step, b - a)
                for q in range(size)
            ]
            fold(f, sources, out[a:b])


def _stage_parts(
    ch: Channel,
    inp: np.ndarray,
    counts: Sequence[int],
    displs: Sequence[int],
    per_step: int,
    j: int,
    p: int,
) -> None:
    """Stage piece j of each peer's part of ``inp`` (``counts``/``displs`` per peer) in that
    peer's sub-slot of this rank's buffer of parity ``p``."""
    r, dt = ch.rank, inp.dtype
    for q in range(ch.size):
        a, b = _piece(j, per_step, counts[q])
        if q != r and b > a:
            slot = _virtual(r, q) * per_step
            np.copyto(ch.stage(r, p, dt, slot, b - a), inp[displs[q] + a : displs[q] + b])

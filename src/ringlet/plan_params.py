"""The cost model's parameters: a link (seconds per round, per byte), local rates, presets.

:class:`Params` is what :mod:`ringlet.plan` times schedules with; :mod:`ringlet.calibrate`
measures it on this machine, and :data:`LINKS` holds the documented presets (docs/plan.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

#: What the engine and the call path do, mirrored by the model: folded messages are cut into
#: segments of SEGMENT_BYTES (engine.py); a reduce or reduce_scatter above PIECE_BYTES runs in
#: pieces (path.py); shm messages from DIRECT_MIN_BYTES take one cross-memory copy
#: (transport/shm_mailboxes.py), and where every peer is one such copy away (one host), folded
#: messages are cut in DIRECT_SEGMENT_BYTES. tests/unit/test_plan.py checks they agree.
SEGMENT_BYTES = 1 << 20
DIRECT_SEGMENT_BYTES = 4 << 20
PIECE_BYTES = 16 << 20
DIRECT_MIN_BYTES = 128 << 10


@dataclass(frozen=True)
class Link:
    """One kind of link: ``alpha`` seconds per message round, ``beta`` seconds per byte."""

    alpha: float
    beta: float

    @property
    def bandwidth(self) -> float:
        return 1.0 / self.beta if self.beta > 0 else math.inf


@dataclass(frozen=True)
class Params:
    """Everything the model needs: the link inside a host, a host's NIC, and local rates.

    The fields after ``cores`` are the engine's and the machine's details (each 0 or None:
    left out, the textbook alpha-beta model); :func:`params_for` sets them as ringlet runs."""

    local: Link  # between ranks of one host (shared memory, or loopback TCP)
    net: Link  # one NIC per host, shared by the host's ranks
    reduce: float = 2.5e-10  # seconds per byte folded into a result (NumPy add, float32)
    copy: float = 1.0e-10  # seconds per byte of a local copy
    call: float = 30e-6  # fixed cost of a call: dispatch and the progress thread's wake-up
    gap: float = 2e-6  # each message of a round past the first (posting it, completing it)
    source: str = "defaults"
    cores: int = 0  # CPU cores per host (0: at least one per rank); fewer stretch local work
    seg: int = 0  # bytes a segment: a longer folded message is cut, each segment an exchange
    piece: int = 0  # a reduce / reduce_scatter above this many bytes runs piece by piece
    direct: Link | None = None  # local messages of direct_min bytes or more: one kernel copy
    direct_min: int = 0
    cache: int = 0  # vectors above this many bytes run at the out-of-cache rates below
    reduce_cold: float | None = None  # seconds per byte folded out of cache
    copy_cold: float | None = None  # seconds per byte copied out of cache
    local_copies: int = 0  # memory copies a byte takes on the local link (mailbox, TCP: 2)
    wake: float = 0.0  # a round's wake-up of a rank that waited, when ranks outnumber cores

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Params:
        """The inverse of :meth:`to_json` (fields it does not know are ignored)."""
        kw = {k: v for k, v in data.items() if k in {f.name for f in fields(Params)}}
        for name in ("local", "net", "direct"):
            if isinstance(kw.get(name), dict):
                kw[name] = Link(**kw[name])
        return Params(**kw)

    def rates(self, nbytes: int) -> tuple[float, float, float]:
        """(fold, copy, extra seconds per byte and memory copy) for a call moving ``nbytes``:
        out of cache a message's copies run at the cold copy rate, not the warm one."""
        if not self.cache or nbytes <= self.cache:
            return self.reduce, self.copy, 0.0
        copy = self.copy_cold if self.copy_cold is not None else self.copy
        fold = self.reduce_cold if self.reduce_cold is not None else self.reduce
        return fold, copy, max(0.0, copy - self.copy)

    def local_link(self, biggest: int) -> tuple[Link, int]:
        """The local link of a round whose largest local message is ``biggest`` bytes, and the
        memory copies a byte takes on it (one for a cross-memory copy)."""
        if self.direct is not None and biggest >= self.direct_min:
            return self.direct, 1
        return self.local, self.local_copies


#: Documented presets (docs/plan.md). shm and tcp are one host (loopback) on a typical
#: x86 server; the Gbit links are a host's NIC with a kernel TCP stack's per-message latency.
LINKS: dict[str, Link] = {
    "shm": Link(4e-6, 1 / 6e9),
    "tcp": Link(40e-6, 1 / 1.5e9),
    "1gbit": Link(50e-6, 1 / 0.117e9),
    "10gbit": Link(25e-6, 1 / 1.17e9),
    "25gbit": Link(20e-6, 1 / 2.9e9),
    "100gbit": Link(15e-6, 1 / 11e9),
}


def params_for(
    link: str,
    local: str = "shm",
    calibration: dict[str, Any] | None = None,
    one_host: bool = False,
) -> Params:
    """The parameters of a layout whose hosts are joined by ``link`` (a preset name or a
    bandwidth like ``40gbit``) and whose ranks share a host over ``local`` (shm or tcp);
    measured values from ``calibration`` (:func:`ringlet.calibrate.load`) replace the presets
    they cover, and the engine's segments and pieces are in (``one_host``: every rank on one
    host, as the engine cuts it). Raises ValueError for an unknown link."""
    cal = calibration or {}
    links = {**LINKS, **{k: Link(**v) for k, v in cal.get("links", {}).items()}}
    if local not in links:
        raise ValueError(f"unknown local link {local!r}; choose shm or tcp")
    net = links.get(link.lower()) or _gbit(link)
    rates: dict[str, Any] = {
        k: cal[k]
        for k in ("reduce", "copy", "gap", "reduce_cold", "copy_cold", "cache")
        if k in cal
    }
    call = cal.get("call_by_link", {}).get(local, cal.get("call"))
    if call is not None:
        rates["call"] = call
    if local == "shm" and "direct" in cal:  # large messages: one cross-memory copy
        rates["direct"] = Link(**cal["direct"])
        rates["direct_min"] = DIRECT_MIN_BYTES
    rates["wake"] = cal.get("wake_by_link", {}).get(local, 0.0)
    source = str(cal.get("source", "file")) if cal else "defaults"
    seg = DIRECT_SEGMENT_BYTES if one_host and "direct" in rates else SEGMENT_BYTES
    return Params(
        links[local], net, source=source, cores=int(cal.get("cores", 0)), seg=seg,
        piece=PIECE_BYTES, local_copies=2, **rates,
    )  # fmt: skip


def _gbit(text: str) -> Link:
    """A link given as ``<N>gbit``: N Gbit/s at 94 % goodput, 20 µs a round."""
    t = text.lower().removesuffix("/s")
    if not t.endswith("gbit"):
        raise ValueError(f"unknown link {text!r}; choose one of {', '.join(LINKS)} or <N>gbit")
    return Link(20e-6, 1 / (float(t[:-4]) * 0.94e9 / 8))

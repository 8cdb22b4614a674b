"""The cost model's parameters: a link (seconds per round, per byte), local rates, presets.

:class:`Params` is what :mod:`ringlet.plan` times schedules with; :mod:`ringlet.calibrate`
measures it on this machine, and :data:`LINKS` holds the documented presets (docs/plan.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


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
    """Everything the model needs: the link inside a host, a host's NIC, and local rates."""

    local: Link  # between ranks of one host (shared memory, or loopback TCP)
    net: Link  # one NIC per host, shared by the host's ranks
    reduce: float = 2.5e-10  # seconds per byte folded into a result (NumPy add, float32)
    copy: float = 1.0e-10  # seconds per byte of a local copy
    call: float = 30e-6  # fixed cost of a call: dispatch and the progress thread's wake-up
    gap: float = 2e-6  # each message of a round past the first (posting it, completing it)
    source: str = "defaults"
    cores: int = 0  # CPU cores per host (0: at least one per rank); fewer stretch local work

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Params:
        return Params(
            Link(**data["local"]),
            Link(**data["net"]),
            data["reduce"],
            data["copy"],
            data["call"],
            data.get("source", "file"),
        )


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


def params_for(link: str, local: str = "shm", calibration: dict[str, Any] | None = None) -> Params:
    """The parameters of a layout whose hosts are joined by ``link`` (a preset name or a
    bandwidth like ``40gbit``) and whose ranks share a host over ``local`` (shm or tcp);
    measured values from ``calibration`` (:func:`ringlet.calibrate.load`) replace the presets
    they cover. Raises ValueError for an unknown link."""
    cal = calibration or {}
    links = {**LINKS, **{k: Link(**v) for k, v in cal.get("links", {}).items()}}
    if local not in links:
        raise ValueError(f"unknown local link {local!r}; choose shm or tcp")
    net = links.get(link.lower()) or _gbit(link)
    rates: dict[str, Any] = {k: cal[k] for k in ("reduce", "copy", "gap") if k in cal}
    call = cal.get("call_by_link", {}).get(local, cal.get("call"))
    if call is not None:
        rates["call"] = call
    source = str(cal.get("source", "file")) if cal else "defaults"
    return Params(links[local], net, source=source, cores=int(cal.get("cores", 0)), **rates)


def _gbit(text: str) -> Link:
    """A link given as ``<N>gbit``: N Gbit/s at 94 % goodput, 20 µs a round."""
    t = text.lower().removesuffix("/s")
    if not t.endswith("gbit"):
        raise ValueError(f"unknown link {text!r}; choose one of {', '.join(LINKS)} or <N>gbit")
    return Link(20e-6, 1 / (float(t[:-4]) * 0.94e9 / 8))

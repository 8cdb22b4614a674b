"""The model's rounds: what each round of a rank costs, and the call played through them.

:func:`round_costs` prices every round of a set of ranks' schedules (:class:`ringlet.plan_params.
Params`: links, rates, the engine's segments, wake-ups); :func:`simulate` plays all ranks'
rounds (every rank built), :func:`in_step` sums the slowest representative round per round
(representative hosts, :mod:`ringlet.plan`), :func:`busiest` is the period of calls timed back
to back where no rank waits for the previous call's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .plan_params import Params
from .schedules.base import Schedule

#: A part of the representative path: per rank durations, busy flags, and round shifts.
Part = tuple[list[np.ndarray], list[np.ndarray], Sequence[int]]


@dataclass
class Rounds:
    """Per rank and round of a set of ranks: the round's duration and whether it has messages."""

    dur: list[np.ndarray]
    busy: list[np.ndarray]
    peers: list[list[tuple[int, ...]]]
    link: int = 0  # elements the busiest link (a host's NIC; on one host a rank's) carries
    senders: list[list[tuple[int, ...]]] = field(default_factory=list)  # whom each round waits for


def round_costs(
    scheds: dict[int, Schedule], hosts: Sequence[int], p: Params, itemsize: int, nbytes: int = 0
) -> Rounds:
    """Durations of the rounds of ``scheds`` (rank -> schedule, all ranks of their hosts) in a
    call moving ``nbytes`` (it picks the in- or out-of-cache rates)."""
    load_out: dict[tuple[int, int], int] = {}
    load_in: dict[tuple[int, int], int] = {}
    per: dict[int, list[tuple[Any, ...]]] = {}
    for rank, sched in scheds.items():
        me, rows = hosts[rank], []
        for k, rnd in enumerate(sched.rounds):
            lo = li = no = ni = red = big = folded = 0
            peers: set[int] = set()
            for s in rnd.sends:
                peers.add(s.peer)
                n = s.stop - s.start
                if s.fold:
                    folded = max(folded, n)
                if hosts[s.peer] == me:
                    lo, big = lo + n, max(big, n)
                else:
                    no += n
            for v in rnd.recvs:
                peers.add(v.peer)
                n = v.stop - v.start
                if hosts[v.peer] == me:
                    li, big = li + n, max(big, n)
                else:
                    ni += n
                if v.reduce:
                    red, folded = red + n, max(folded, n)
            cp = sum(c.count for c in rnd.copies) if rnd.copies else 0
            if no:
                load_out[(me, k)] = load_out.get((me, k), 0) + no
            if ni:
                load_in[(me, k)] = load_in.get((me, k), 0) + ni
            many = max(len(rnd.sends), len(rnd.recvs))
            src = tuple(v.peer for v in rnd.recvs)
            rows.append((lo, li, no, ni, red, cp, many, tuple(peers), src, big, folded))
        per[rank] = rows
    one_host = len(set(hosts)) == 1
    totals: dict[tuple[int, int], int] = {}
    for rank, rows in per.items():
        key = rank if one_host else hosts[rank]
        sent = sum(row[0] + row[2] if one_host else row[2] for row in rows)
        got = sum(row[1] + row[3] if one_host else row[3] for row in rows)
        totals[(key, 0)] = totals.get((key, 0), 0) + sent
        totals[(key, 1)] = totals.get((key, 1), 0) + got
    out = Rounds([], [], [], max(totals.values(), default=0))
    order = sorted(scheds)
    per_host = {h: hosts.count(h) for h in {hosts[r] for r in order}}
    fold, copy, cold = p.rates(nbytes)
    for rank in order:
        me = hosts[rank]
        # More ranks than cores: local copies, folds and loopback transfers share the CPUs,
        # and a rank that waited must be woken (a context switch) before its round goes on.
        cpu = max(1.0, per_host[me] / p.cores) if p.cores else 1.0
        wake = p.wake if p.cores and per_host[me] > p.cores else 0.0
        durs: list[float] = []
        busy: list[bool] = []
        talks: list[tuple[int, ...]] = []
        waits: list[tuple[int, ...]] = []
        for k, (lo, li, no, ni, red, cp, many, pr, src, big, folded) in enumerate(per[rank]):
            t, alpha = 0.0, 0.0
            if lo or li:
                near, copies = p.local_link(big * itemsize)
                alpha = near.alpha
                t = cpu * (alpha + (near.beta + copies * cold) * itemsize * max(lo, li))
            if no or ni:
                link = max(load_out.get((me, k), 0), load_in.get((me, k), 0))
                alpha = max(alpha, p.net.alpha)
                t = max(t, p.net.alpha + p.net.beta * itemsize * link)
            if p.seg and folded * itemsize > p.seg:  # every segment past the first: an exchange
                t += alpha * (-(-folded * itemsize // p.seg) - 1)
            if many > 1:  # every message past the first costs its posting and completion
                t += p.gap * (many - 1)
            if pr:
                t += wake
            t += cpu * itemsize * (fold * red + copy * cp)
            durs.append(t)
            busy.append(bool(pr))
            talks.append(pr)
            waits.append(src)
        out.dur.append(np.array(durs))
        out.busy.append(np.array(busy, dtype=bool))
        out.peers.append(talks)
        out.senders.append(waits)
    return out


def simulate(rounds: Rounds, size: int) -> tuple[float, int]:
    """(finish time, steps) of all ranks' rounds: a round starts once this rank and every peer
    it receives from in the round finished their previous round (sends are eager: the engine
    hands them to the transport without waiting for the receiver)."""
    length = max((len(d) for d in rounds.dur), default=0)
    ready, steps = np.zeros(size), np.zeros(size)
    for k in range(length):
        start, sstart = ready.copy(), steps.copy()
        for r in range(size):
            if k < len(rounds.dur[r]):
                for q in rounds.senders[r][k]:
                    start[r] = max(start[r], ready[q])
                    sstart[r] = max(sstart[r], steps[q])
        for r in range(size):
            if k < len(rounds.dur[r]):
                ready[r] = start[r] + rounds.dur[r][k]
                steps[r] = sstart[r] + rounds.busy[r][k]
    return float(ready.max(initial=0.0)), int(steps.max(initial=0))


def in_step(parts: Sequence[Part], every: int = 0) -> tuple[float, int]:
    """(time, steps) with all ranks in step: the sum over rounds of the slowest round of any
    representative rank, each rank's rounds moved by each of its host's shifts (rounds moved
    before round 0 are dropped: they are the pipeline's idle ones). ``every``: the call has
    that many rounds in which some rank works (a ring passing a few elements); those no
    representative works in cost what its working rounds cost on average."""
    length = max((len(d) + max(shifts) for durs, _, shifts in parts for d in durs), default=0)
    slow, busy = np.zeros(max(length, 0)), np.zeros(max(length, 0), dtype=bool)
    for durs, busies, shifts in parts:
        for d, b in zip(durs, busies, strict=True):
            for s in shifts:
                cut = max(0, -s)
                d2, b2, at = d[cut:], b[cut:], max(0, s)
                np.maximum(slow[at : at + len(d2)], d2, out=slow[at : at + len(d2)])
                busy[at : at + len(b2)] |= b2
    worked = int(busy.sum())
    if every > worked and worked:
        return float(slow.sum() + (every - worked) * slow[busy].mean()), every
    return float(slow.sum()), worked


def busiest(rounds: Rounds) -> float:
    """The most time any one rank spends in its own rounds: calls of a rooted op (broadcast,
    reduce, gather, scatter) timed back to back follow it, the root running a call ahead."""
    return max((float(d.sum()) for d in rounds.dur), default=0.0)

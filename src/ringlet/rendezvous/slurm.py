"""SLURM's compact lists: host names ("node[01-04,07],gpu3") and tasks per node ("2(x3),1")."""

from __future__ import annotations

import re
from collections.abc import Iterator


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str, nodelist: str) -> Iterator[str]:
    """ "01-03,07" -> 01 02 03 07, keeping the zero padding of each range's start."""
    for item in spec.split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"SLURM nodelist {nodelist!r}: bad range {item!r}")
        for number in range(int(low), int(high or low) + 1):
            yield str(number).zfill(len(low))


def expand_nodelist(nodelist: str) -> Iterator[str]:
    """Host names of a SLURM nodelist, lazily: "node[01-02,07],gpu3" -> node01 node02 node07 gpu3.

    Several bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    Raises ValueError for unbalanced brackets or bad ranges.
    """
    for name in _split_top_level(nodelist):
        pieces = re.split(r"\[([^\[\]]*)\]", name)  # odd entries are bracket contents
        if any("[" in p or "]" in p for p in pieces[::2]):
            raise ValueError(f"SLURM nodelist {nodelist!r}: unbalanced brackets in {name!r}")
        yield from _expand_pieces(pieces, nodelist)


def _expand_pieces(pieces: list[str], nodelist: str) -> Iterator[str]:
    """Lazily expand [text, range, text, range, ...]: the first host costs no more than one name."""
    if len(pieces) == 1:
        yield pieces[0]
        return
    prefix, ranges, rest = pieces[0], pieces[1], pieces[2:]
    for number in _expand_range_list(ranges, nodelist):
        for tail in _expand_pieces(rest, nodelist):
            yield prefix + number + tail


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: "node[01-04,07],gpu3" -> "node01"."""
    for host in expand_nodelist(nodelist):
        return host
    raise ValueError(f"SLURM nodelist {nodelist!r} names no host")


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE as one count per node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}: cannot read {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts

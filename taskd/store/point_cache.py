"""Rollup charts already answered, kept to answer the same chart again.

A 30-day chart is 720 one-hour buckets, each a point of up to 70 figures: 1.4 MB of JSON.
Building and encoding it again on every refresh costs most of the query. Every bucket but
the newest is closed in practice, so a chart's last answer is kept whole (its JSON array),
with where each point ends in it and each bucket's *version*: the row's identity (SQLite's
``rowid``, PostgreSQL's ``xmin``) and the number of samples it has counted. A bucket
changes only when a summary is added to it (the count grows) or when it is pruned (its row
goes; one made again later is a new row), so a read takes the versions of the buckets
asked, reuses the points it kept at those versions and fetches only the others. When the
chart is the same but for its newest bucket (a chart refreshed while its agent reports),
the kept points are reused as one slice of the last answer: the new answer is one copy,
not a join of every point. Nothing needs telling: a write on another node of a cluster
changes the version the next read sees.

Bounded in bytes: the charts least recently asked are forgotten first.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

Seen = list[Sequence[int]]
"""A chart's buckets with their versions, in the chart's order: each bucket's start, its
row's identity and its count of samples (rows as the driver reads them)."""

ENTRY_OVERHEAD = 160
"""Bytes a kept point costs beyond its JSON (its bucket, version and end)."""


@dataclass(frozen=True)
class Chart:
    """A chart's last answer: its buckets with their versions, its JSON array, and the
    offset just past each point in it (in the chart's order)."""

    seen: Seen
    body: bytes
    ends: list[int]

    @classmethod
    def joined(
        cls,
        seen: Seen,
        points: Sequence[bytes | memoryview],
        head: Chart | None = None,
        reused: int = 0,
    ) -> Chart:
        """The chart of ``seen``: the first ``reused`` points of ``head`` (its first
        buckets, unchanged), then ``points``, one for each bucket of ``seen`` after them."""
        pieces: list[bytes | memoryview] = [b"["]
        ends: list[int] = []
        if head is not None and reused:
            pieces.append(memoryview(head.body)[1 : head.ends[reused - 1]])
            ends = head.ends[:reused]
        offset = ends[-1] if ends else 0
        for point in points:
            if len(pieces) > 1:
                pieces.append(b",")
            pieces.append(point)
            offset += 1 + len(point)  # after "[" or ","
            ends.append(offset)
        pieces.append(b"]")
        return cls(seen, b"".join(pieces), ends)

    def unchanged_head(self, seen: Seen) -> int:
        """How many of the first buckets of ``seen`` this chart has first, in the same
        order and at the same versions: all of them, all but the last, or else 0."""
        count = len(seen)
        if seen == self.seen[:count]:
            return count
        if count and seen[:-1] == self.seen[: count - 1]:
            return count - 1
        return 0

    def point(self, entry: Sequence[int]) -> memoryview | None:
        """The JSON of the point of ``entry``'s bucket if this chart has it at its version."""
        index = self._index.get(entry[0])
        if index is None or self.seen[index] != entry:
            return None
        start = self.ends[index - 1] + 1 if index else 1
        return memoryview(self.body)[start : self.ends[index]]

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {entry[0]: index for index, entry in enumerate(self.seen)}

    @property
    def cost(self) -> int:
        """The bytes it holds, as counted against the bound."""
        return len(self.body) + ENTRY_OVERHEAD * len(self.seen)


class PointCache:
    """Charts by ``key``, at most ``max_bytes`` in all (0 keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._charts: OrderedDict[Hashable, Chart] = OrderedDict()

    def chart(self, key: Hashable) -> Chart | None:
        """The chart kept for ``key``, if any; marks it recently used."""
        chart = self._charts.get(key)
        if chart is not None:
            self._charts.move_to_end(key)
        return chart

    def keep(self, key: Hashable, chart: Chart) -> None:
        """Keep ``chart`` as ``key``'s newest answer, then forget the charts least recently
        asked until all fit."""
        if self.max_bytes <= 0:
            return
        old = self._charts.pop(key, None)
        if old is not None:
            self.size -= old.cost
        self._charts[key] = chart
        self.size += chart.cost
        while self.size > self.max_bytes and self._charts:
            _, forgotten = self._charts.popitem(last=False)
            self.size -= forgotten.cost

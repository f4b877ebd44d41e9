"""The JSON of rollup points already answered, kept to answer the same chart again.

A 30-day chart is 720 one-hour buckets, each a point of up to 70 figures; building and
encoding them again on every refresh costs most of the query. Every bucket but the newest
is closed in practice, so the points of a chart are kept encoded, each with its bucket's
*version*: the row's identity (SQLite's ``rowid``, PostgreSQL's ``xmin``) and the number
of samples it has counted. A bucket changes only when a summary is added to it (the
count grows) or when it is pruned (its row goes; one made again later is a new row), so a
read takes the versions of the buckets asked, answers the unchanged ones from here and
fetches only the others. Nothing needs telling: a write on another node of a cluster
changes the version the next read sees.

Bounded in bytes: the charts least recently asked are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

Version = tuple[int, int]
"""A bucket's row identity and its count of samples."""

ENTRY_OVERHEAD = 120
"""Bytes a kept point costs beyond its JSON (its dict slot, tuple and bytes header)."""


class PointCache:
    """Encoded points by chart (``key``) and bucket, with their versions, at most
    ``max_bytes`` in all (0 keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._charts: OrderedDict[Hashable, dict[int, tuple[Version, bytes]]] = OrderedDict()

    def points(self, key: Hashable) -> dict[int, tuple[Version, bytes]]:
        """The points kept for ``key`` by bucket (empty if none); marks it recently used."""
        chart = self._charts.get(key)
        if chart is None:
            return {}
        self._charts.move_to_end(key)
        return chart

    def update(
        self,
        key: Hashable,
        seen: Iterable[int],
        fresh: dict[int, tuple[Version, bytes]],
    ) -> None:
        """After a read of ``key`` that saw the buckets ``seen`` (in order): keep ``fresh``
        (the points it had to fetch), and forget the kept buckets between the first and the
        last seen that it did not see (pruned)."""
        if self.max_bytes <= 0:
            return
        chart = self._charts.pop(key, None) or {}
        seen = list(seen)
        if seen:
            low, high = min(seen[0], seen[-1]), max(seen[0], seen[-1])
            present = set(seen)
            for bucket in [b for b in chart if low <= b <= high and b not in present]:
                self.size -= _cost(chart.pop(bucket)[1])
        for bucket, point in fresh.items():
            old = chart.get(bucket)
            if old is not None:
                self.size -= _cost(old[1])
            chart[bucket] = point
            self.size += _cost(point[1])
        if chart:
            self._charts[key] = chart
        while self.size > self.max_bytes and self._charts:
            _, forgotten = self._charts.popitem(last=False)
            self.size -= sum(_cost(data) for _, data in forgotten.values())


def _cost(data: bytes) -> int:
    return len(data) + ENTRY_OVERHEAD

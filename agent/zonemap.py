"""Which zone an address is in, as the collector resolved it: a bisect over its disjoint ranges."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from agent.sensors.accounting import UNKNOWN_ZONE, ZoneLike


class ZoneMap:
    """Built from the policy's zones (disjoint ranges per family); O(log n) per lookup."""

    def __init__(self, zones: Sequence[ZoneLike] = ()) -> None:
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        self._names: dict[int, list[str]] = {4: [], 6: []}
        for family in (4, 6):
            runs = sorted(
                (first, last, zone.name)
                for zone in zones
                for first, last in (zone.v4 if family == 4 else zone.v6)
            )
            self._starts[family] = [r[0] for r in runs]
            self._ends[family] = [r[1] for r in runs]
            self._names[family] = [r[2] for r in runs]

    def zone_of(self, family: int, address: int) -> str:
        """The zone name of an address given as an integer; "unknown" where no zone covers it."""
        starts = self._starts[family]
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address <= self._ends[family][i]:
            return self._names[family][i]
        return UNKNOWN_ZONE

"""What the collector tells the agent to do, as the agent's own typed record."""

from __future__ import annotations

from typing import NamedTuple

from agent.sensors.accounting import ZoneRanges


class PolicyUpdate(NamedTuple):
    version: str
    sample_interval_s: int
    interfaces: tuple[str, ...]
    batch_max_facts: int
    policy_refresh_s: int
    # The zone catalog's version, and each zone's disjoint address ranges (IPv4 and IPv6,
    # inclusive integers) as the collector resolved them by longest prefix. Addresses in
    # none of them are zone "unknown".
    zones_version: str = ""
    zones: tuple[ZoneRanges, ...] = ()


def zones_from_ranges(names: list[str], ranges: list[tuple[int, int, int, int]]) -> tuple[ZoneRanges, ...]:
    """Group (family, first, last, 1-based zone index or 0) ranges by zone, dropping "unknown"."""
    v4: dict[int, list[tuple[int, int]]] = {i: [] for i in range(1, len(names) + 1)}
    v6: dict[int, list[tuple[int, int]]] = {i: [] for i in range(1, len(names) + 1)}
    for family, first, last, zone in ranges:
        if zone == 0:
            continue
        if not 0 < zone <= len(names):
            raise ValueError(f"a zone range points at zone {zone}, but the policy has {len(names)} zones")
        (v4 if family == 4 else v6)[zone].append((first, last))
    return tuple(ZoneRanges(name, v4[i], v6[i]) for i, name in enumerate(names, start=1))

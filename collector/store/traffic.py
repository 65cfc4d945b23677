"""Traffic per zone (or department, county, agent) over a time range: the link-load view.

Rates are taken per time bucket over the whole fleet in scope: the vertical
extranet link carries the sum of every host's traffic to the province, so its
load is the bucket's total, and its p95/peak are over buckets. Buckets in which
a group sent nothing count as zero, so a link idle most of the day does not
show its busy minute as its p95.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from typing import NamedTuple

from collector.errors import QueryError, StoreError

GROUPINGS = {
    "zone": "zt.zone",
    "department": "a.department",
    "county": "a.county",
    "agent": "a.hostname || ' (' || substr(a.agent_id, 1, 8) || ')'",
}


class TrafficRow(NamedTuple):
    group: str
    kind: str  # zone kind when grouped by zone, else ""
    direction: str  # extranet direction when grouped by zone, else ""
    agents: int
    bytes_in: int
    bytes_out: int
    avg_in_bps: float
    avg_out_bps: float
    p95_in_bps: float
    p95_out_bps: float
    peak_in_bps: float
    peak_out_bps: float
    capacity_bps: int  # the zone's link capacity; 0 when unknown or not grouped by zone
    utilization_p95: float | None  # max(p95 in, p95 out) / capacity
    utilization_peak: float | None


def traffic(
    db: sqlite3.Connection,
    *,
    by: str,
    since_ms: int,
    until_ms: int,
    bucket_ms: int,
    zone: str | None = None,
) -> list[TrafficRow]:
    """Busiest first (by the larger p95 direction)."""
    if by not in GROUPINGS:
        raise QueryError(f"cannot group traffic by {by!r}: use {', '.join(GROUPINGS)}")
    if bucket_ms < 1000:
        raise QueryError("the bucket must be at least 1 s")
    sql = (
        f"SELECT {GROUPINGS[by]} AS grp, zt.time_ms / :bucket AS b,"
        # Capture-based accounting that sampled scales its counts back up.
        " sum(zt.bytes_in / zt.sampling_rate), sum(zt.bytes_out / zt.sampling_rate),"
        " count(DISTINCT zt.agent)"
        " FROM zone_traffic AS zt JOIN agents AS a ON a.id = zt.agent"
        " WHERE zt.time_ms >= :since AND zt.time_ms < :until"
        + (" AND zt.zone = :zone" if zone is not None else "")
        + " GROUP BY grp, b"
    )
    params = {"bucket": bucket_ms, "since": since_ms, "until": until_ms, "zone": zone}
    try:
        buckets = db.execute(sql, params).fetchall()
        agents_sql = (
            f"SELECT {GROUPINGS[by]} AS grp, count(DISTINCT zt.agent) FROM zone_traffic AS zt"
            " JOIN agents AS a ON a.id = zt.agent WHERE zt.time_ms >= :since AND zt.time_ms < :until"
            + (" AND zt.zone = :zone" if zone is not None else "")
            + " GROUP BY grp"
        )
        agents = dict(db.execute(agents_sql, params).fetchall())
        zones = {
            name: (kind, direction, capacity)
            for name, kind, direction, capacity in db.execute(
                "SELECT name, kind, direction, capacity_bps FROM zones"
            )
        }
    except sqlite3.Error as exc:
        raise StoreError(f"cannot query traffic: {exc}") from exc
    if not buckets:
        return []
    first = min(b for _, b, *_ in buckets)
    last = max(b for _, b, *_ in buckets)
    span = last - first + 1
    seconds = bucket_ms / 1000
    per_group: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for group, b, bytes_in, bytes_out, _ in buckets:
        per_group[group][b] = (bytes_in, bytes_out)
    rows = []
    for group, series in per_group.items():
        rates_in = sorted([series.get(b, (0.0, 0.0))[0] * 8 / seconds for b in range(first, last + 1)])
        rates_out = sorted([series.get(b, (0.0, 0.0))[1] * 8 / seconds for b in range(first, last + 1)])
        total_in = sum(v[0] for v in series.values())
        total_out = sum(v[1] for v in series.values())
        kind, direction, capacity = zones.get(group, ("", "", 0)) if by == "zone" else ("", "", 0)
        p95_in, p95_out = _p95(rates_in), _p95(rates_out)
        peak_in, peak_out = rates_in[-1], rates_out[-1]
        rows.append(
            TrafficRow(
                group=group,
                kind=kind,
                direction=direction,
                agents=agents.get(group, 0),
                bytes_in=round(total_in),
                bytes_out=round(total_out),
                avg_in_bps=total_in * 8 / (span * seconds),
                avg_out_bps=total_out * 8 / (span * seconds),
                p95_in_bps=p95_in,
                p95_out_bps=p95_out,
                peak_in_bps=peak_in,
                peak_out_bps=peak_out,
                capacity_bps=capacity,
                utilization_p95=max(p95_in, p95_out) / capacity if capacity else None,
                utilization_peak=max(peak_in, peak_out) / capacity if capacity else None,
            )
        )
    rows.sort(key=lambda r: (-max(r.p95_in_bps, r.p95_out_bps), r.group))
    return rows


def _p95(ordered: list[float]) -> float:
    """Nearest-rank 95th percentile of an ascending list."""
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

"""Traffic per zone (or department, county, agent) over a time range: the link-load view.

Rates are taken per time bucket over the whole fleet in scope: the vertical
extranet link carries the sum of every host's traffic to the province, so its
load is the bucket's total, and its p95/peak are over buckets. Buckets in which
a group sent nothing count as zero, so a link idle most of the day does not
show its busy minute as its p95.

Where the range is older than the raw rows kept, the per-minute or per-hour
rollups answer for it (store/retention.py, read_plan): the bytes are the same
exact integers, and the rates are over buckets of at least the rollups' length.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError
from collector.store.queries import snapshot
from collector.store.retention import RAW, ZONES, ReadPlan, read_plan, scaled

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
    # The bucket the rates are over: the one asked for, or where the range reaches into the
    # rollups the smallest multiple of the coarsest tier read that is not shorter.
    bucket_ms: int


def traffic(
    db: sqlite3.Connection,
    *,
    by: str,
    since_ms: int,
    until_ms: int,
    bucket_ms: int,
    zone: str | None = None,
) -> list[TrafficRow]:
    """Busiest first (by the larger p95 direction).

    Bytes are the estimated totals: a sampled capture's counts scaled by 1 / sampling_rate,
    per row and rounded, as the rollups hold them. Where the range is older than the raw
    horizon, every bucket of the query is as long as TrafficRow.bucket_ms says (so the p95 is
    over like-sized buckets), and the range is taken in whole rollup buckets (one that starts
    before since_ms is left out).
    """
    if by not in GROUPINGS:
        raise QueryError(f"cannot group traffic by {by!r}: use {', '.join(GROUPINGS)}")
    if bucket_ms < 1000:
        raise QueryError("the bucket must be at least 1 s")
    try:
        with snapshot(db):
            plan = read_plan(db, ZONES, since_ms, until_ms)
            if plan.resolution_ms != RAW:
                bucket_ms = -(-bucket_ms // plan.resolution_ms) * plan.resolution_ms
            facts, params = _facts(plan, zone)
            params["bucket"] = bucket_ms
            per_bucket = (
                f"WITH zt (agent, zone, time_ms, bytes_in, bytes_out) AS ({facts})"
                f" SELECT {GROUPINGS[by]} AS grp, zt.time_ms / :bucket AS b, {{sum}}(zt.bytes_in),"
                " {sum}(zt.bytes_out) FROM zt JOIN agents AS a ON a.id = zt.agent GROUP BY grp, b"
            )
            try:
                buckets = db.execute(per_bucket.format(sum="sum"), params).fetchall()
            except sqlite3.OperationalError as exc:
                # Only absurd counters get there (validation takes up to 2**63 - 1 each): total()
                # adds them as floats instead of failing.
                if "integer overflow" not in str(exc):
                    raise
                buckets = db.execute(per_bucket.format(sum="total"), params).fetchall()
            agents = dict(
                db.execute(
                    f"WITH zt (agent, zone, time_ms, bytes_in, bytes_out) AS ({facts})"
                    f" SELECT {GROUPINGS[by]} AS grp, count(DISTINCT zt.agent)"
                    " FROM zt JOIN agents AS a ON a.id = zt.agent GROUP BY grp",
                    params,
                ).fetchall()
            )
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
    for group, b, bytes_in, bytes_out in buckets:
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
                bucket_ms=bucket_ms,
            )
        )
    rows.sort(key=lambda r: (-max(r.p95_in_bps, r.p95_out_bps), r.group))
    return rows


def _facts(plan: ReadPlan, zone: str | None) -> tuple[str, dict[str, Any]]:
    """SQL for (agent, zone, time_ms, bytes_in, bytes_out) of every fact in the plan's spans, a
    rollup bucket as one fact at its start; and its parameters."""
    only_zone = " AND zone = :zone" if zone is not None else ""
    raw = (
        f"SELECT agent, zone, time_ms, {scaled('bytes_in')}, {scaled('bytes_out')} FROM zone_traffic"
        " WHERE time_ms >= :since{n} AND time_ms < :until{n}" + only_zone
    )
    parts = []
    params: dict[str, Any] = {"zone": zone, "rolled": plan.rolled_id}
    for n, span in enumerate(plan.spans):
        params[f"since{n}"], params[f"until{n}"] = span.since_ms, span.until_ms
        if span.resolution_ms == RAW:
            parts.append(raw.format(n=n))
            continue
        parts.append(
            "SELECT agent, zone, bucket_ms, bytes_in, bytes_out FROM zone_rollups"
            f" WHERE resolution_ms = {span.resolution_ms} AND bucket_ms >= :since{n}"
            f" AND bucket_ms < :until{n}" + only_zone
        )
        parts.append(raw.format(n=n) + " AND id > :rolled")  # not rolled up yet
    return " UNION ALL ".join(parts) or "SELECT NULL, NULL, NULL, NULL, NULL WHERE 0", params


def _p95(ordered: list[float]) -> float:
    """Nearest-rank 95th percentile of an ascending list."""
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

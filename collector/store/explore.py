"""What `zonewatch-collector explore` offers in Datasette: table facets and canned queries.

The store is the only place with SQL, and these queries are SQL: Datasette runs them, read-only,
on the database as the collector keeps it (a test runs each against a migrated database). Each
answers as the CLI does for the same data: active means open or acknowledged, % migrated is
(migrated + exempt) over the pairs whose state is known (store/migration.py, summarize), and a
zone's bytes are the estimated totals (a sampled capture scaled up, store/retention.py, scaled).

Facets need a column of the faceted table, and a host's department is on ``agents``, not on
``incidents`` or ``migration_states``: the per-department views are canned queries.
"""

from __future__ import annotations

from typing import NamedTuple

from collector.store.retention import HOUR_MS, scaled

# Table -> the columns its page offers counts of, one click to filter by.
TABLE_FACETS: dict[str, tuple[str, ...]] = {
    "incidents": ("severity", "status", "rule"),
    "migration_states": ("state", "network"),
}
# Table -> the column its page is sorted by, newest first.
TABLE_SORT_DESC: dict[str, str] = {"incidents": "last_seen_ms", "migration_states": "since_ms"}


class CannedQuery(NamedTuple):
    name: str  # in the URL: /DB/NAME
    title: str
    description: str
    sql: str


def _local(column: str) -> str:
    """ms since the epoch -> "2026-11-28 07:40:01" in the server's time zone, as the CLI prints times."""
    return f"datetime({column} / 1000, 'unixepoch', 'localtime')"


# The most severe first (store/incidents.py, SEVERITIES: least to most severe).
_SEVERITY_RANK = (
    "CASE i.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'medium' THEN 2"
    " WHEN 'low' THEN 3 ELSE 4 END"
)

ACTIVE_INCIDENTS = f"""\
SELECT i.id, i.severity, i.status, i.rule, i.title,
       coalesce(a.hostname, '') AS host, coalesce(a.department, '') AS department,
       coalesce(a.county, '') AS county,
       {_local("i.first_seen_ms")} AS first_seen, {_local("i.last_seen_ms")} AS last_seen,
       i.count AS matches
FROM incidents AS i LEFT JOIN agents AS a ON a.id = i.agent
WHERE i.status IN ('open', 'acknowledged')
ORDER BY {_SEVERITY_RANK}, i.last_seen_ms DESC, i.id DESC"""

INCIDENTS_BY_DEPARTMENT = f"""\
SELECT coalesce(nullif(a.department, ''), '(none)') AS department,
       sum(i.severity = 'critical') AS critical, sum(i.severity = 'high') AS high,
       sum(i.severity = 'medium') AS medium, sum(i.severity = 'low') AS low,
       sum(i.severity = 'informational') AS informational, count(*) AS active,
       {_local("max(i.last_seen_ms)")} AS last_seen
FROM incidents AS i LEFT JOIN agents AS a ON a.id = i.agent
WHERE i.status IN ('open', 'acknowledged')
GROUP BY 1
ORDER BY critical DESC, high DESC, active DESC, department"""

MIGRATION_BY_DEPARTMENT = """\
SELECT coalesce(nullif(a.department, ''), '(none)') AS department, count(*) AS pairs,
       sum(m.state = 'not_started') AS not_started, sum(m.state = 'dual_homed') AS dual_homed,
       sum(m.state = 'migrated') AS migrated, sum(m.state = 'regressed') AS regressed,
       sum(m.state = 'exempt') AS exempt, sum(m.state = 'unknown') AS unknown,
       CASE WHEN count(*) > sum(m.state = 'unknown')
            THEN round(100.0 * sum(m.state IN ('migrated', 'exempt'))
                       / (count(*) - sum(m.state = 'unknown')), 1)
            ELSE 0.0 END AS percent_migrated
FROM migration_states AS m JOIN agents AS a ON a.id = m.agent
GROUP BY 1
ORDER BY pairs DESC, department"""

# Hour rollups hold every zone_traffic row already counted into them (ids up to the hour tier's
# rolled_id); the raw rows past it are added here, so the newest hours are complete too and no
# row counts twice. Average rates over the hour; load against the zone's link capacity.
LINK_LOAD_PER_HOUR = f"""\
WITH hourly (zone, hour_ms, bytes_in, bytes_out) AS (
    SELECT zone, bucket_ms, bytes_in, bytes_out FROM zone_rollups WHERE resolution_ms = {HOUR_MS}
    UNION ALL
    SELECT zone, time_ms - time_ms % {HOUR_MS}, {scaled("bytes_in")}, {scaled("bytes_out")}
    FROM zone_traffic
    WHERE id > (SELECT rolled_id FROM retention_state
                WHERE source = 'zone_traffic' AND resolution_ms = {HOUR_MS})
),
load (zone, hour_ms, bytes_in, bytes_out) AS (
    SELECT zone, hour_ms, sum(bytes_in), sum(bytes_out) FROM hourly GROUP BY zone, hour_ms
)
SELECT {_local("l.hour_ms")} AS hour, l.zone, coalesce(z.kind, '') AS kind,
       coalesce(z.direction, '') AS direction, l.bytes_in, l.bytes_out,
       round(l.bytes_in * 8.0 / {HOUR_MS // 1000}, 1) AS avg_in_bps,
       round(l.bytes_out * 8.0 / {HOUR_MS // 1000}, 1) AS avg_out_bps,
       coalesce(z.capacity_bps, 0) AS capacity_bps,
       CASE WHEN z.capacity_bps > 0
            THEN round(100.0 * max(l.bytes_in, l.bytes_out) * 8.0 / {HOUR_MS // 1000} / z.capacity_bps, 2)
            END AS load_percent
FROM load AS l LEFT JOIN zones AS z ON z.name = l.zone
ORDER BY l.hour_ms DESC, load_percent DESC, l.zone"""

CANNED_QUERIES: tuple[CannedQuery, ...] = (
    CannedQuery(
        "active_incidents",
        "Active incidents with host and department",
        "Open and acknowledged incidents, the most severe first, then the most recently seen "
        "(as `zonewatch-collector incidents list`).",
        ACTIVE_INCIDENTS,
    ),
    CannedQuery(
        "incidents_by_department",
        "Active incidents per department",
        "Open and acknowledged incidents per department of the host, by severity.",
        INCIDENTS_BY_DEPARTMENT,
    ),
    CannedQuery(
        "migration_by_department",
        "Migration state per department",
        "Host and dedicated-network pairs per state, and % migrated: migrated and exempt over the pairs "
        "whose state is known (as `zonewatch-collector migration`).",
        MIGRATION_BY_DEPARTMENT,
    ),
    CannedQuery(
        "link_load_per_hour",
        "Link load per zone per hour",
        "Bytes each way per zone and hour (the fleet's sum), the average rate over the hour and the "
        "load of the zone's link against its capacity; the newest hour first. For p95 and peaks over "
        "shorter buckets: `zonewatch-collector traffic --by zone`.",
        LINK_LOAD_PER_HOUR,
    ),
)

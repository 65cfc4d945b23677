"""The upstream's view of its tiers: `tiers list/incidents/migration/traffic`, grouped by tier,
"(local)" for this collector's own judgments (store/tiers.py keeps what lower tiers sent)."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

from collector.errors import QueryError
from collector.migration import STATES
from collector.store.incidents import SEVERITIES, STATUS_FILTERS
from collector.store.migration import GroupProgress, percent_migrated
from collector.store.queries import snapshot
from collector.store.sql import translated
from collector.store.tiers import COLLECTOR_ROLE, HOUR_MS, LOCAL, local_rollups


class TierSummary(NamedTuple):
    """A row of `tiers list`."""

    tier: str
    last_report_ms: int | None  # newest fact received from it (None for "(local)")
    lag_s: float | None  # seconds since then
    backlog: int | None  # batches in the sender's spool at its last report; None when relayed
    critical: int  # active (open or acknowledged) incidents by severity
    high: int
    medium: int
    low: int
    hosts: int  # (host, network) pairs with a migration state
    migrated_pct: float
    regressed: int
    peak_zone: str  # the zone whose link was busiest, last 24 h ("(local)": this hour and the last)
    peak_utilization: float | None  # its busiest minute / capacity


class TierIncident(NamedTuple):
    tier: str
    incident_id: int
    severity: str
    status: str
    rule_id: str
    title: str
    hostname: str
    department: str
    county: str
    first_seen_ms: int
    last_seen_ms: int
    matches: int  # how many times the rule matched at the origin
    updated_ms: int
    received_ms: int


# A tier's (or department's, county's) migration counts: the same row as `migration` shows.
TierProgress = GroupProgress


class TierTraffic(NamedTuple):
    tier: str
    zone: str
    direction: str
    hours: int
    rx_bytes: int
    tx_bytes: int
    peak_bps: int
    capacity_bps: int
    peak_utilization: float | None
    hosts: int  # the most hosts in any hour
    last_hour_ms: int


def _tier_clause(tier: str | None, column: str = "tier") -> tuple[str, list[str]]:
    """A tier and everything below it ("市局" matches "市局" and "市局/城关区")."""
    if tier is None:
        return "1", []
    return f"({column} = ? OR substr({column}, 1, ?) = ?)", [tier, str(len(tier) + 1), tier + "/"]


def list_tiers(db: sqlite3.Connection, now_ms: int) -> list[TierSummary]:
    """Every tier that sent anything, and "(local)" first."""
    since = now_ms - 24 * HOUR_MS
    with translated("summarize the tiers"), snapshot(db):
        last: dict[str, int] = {}
        for table in ("tier_incidents", "tier_migrations", "tier_rollups"):
            for tier, received in db.execute(f"SELECT tier, max(received_ms) FROM {table} GROUP BY tier"):
                last[tier] = max(last.get(tier, 0), received)
        # Every enrolled lower tier, even one with nothing to report yet: its last batch counts.
        backlog: dict[str, int] = {}
        for name, batches, seen in db.execute(
            "SELECT hostname, spool_batches, last_seen_ms FROM agents WHERE role = ? AND revoked_ms IS NULL",
            (COLLECTOR_ROLE,),
        ):
            backlog[name] = batches
            last[name] = max(last.get(name, 0), seen)
        severities: dict[str, dict[str, int]] = defaultdict(dict)
        for tier, severity, n in db.execute(
            "SELECT tier, severity, count(*) FROM tier_incidents WHERE status IN ('open', 'acknowledged')"
            " GROUP BY tier, severity"
        ):
            severities[tier][severity] = n
        for severity, n in db.execute(
            "SELECT severity, count(*) FROM incidents WHERE status IN ('open', 'acknowledged') GROUP BY"
            " severity"
        ):
            severities[LOCAL][severity] = n
        states: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATES, 0))
        for tier, state, n in db.execute(
            "SELECT tier, state, count(*) FROM tier_migrations GROUP BY tier, state"
        ):
            if state in STATES:
                states[tier][state] = n
        for state, n in db.execute("SELECT state, count(*) FROM migration_states GROUP BY state"):
            states[LOCAL][state] = n
        peaks: dict[str, tuple[float, str]] = {}
        for tier, zone, peak, capacity in db.execute(
            "SELECT tier, zone, peak_bps, capacity_bps FROM tier_rollups WHERE hour_ms >= ? AND"
            " capacity_bps > 0",
            (since - since % HOUR_MS,),
        ):
            peaks[tier] = max(peaks.get(tier, (0.0, "")), (peak / capacity, zone))
        # This collector's own from its raw traffic: the hours still filling only (a day of raw rows
        # is too much to scan for one listing).
        for r in local_rollups(db, now_ms - HOUR_MS, now_ms):
            if r.capacity_bps:
                peaks[LOCAL] = max(peaks.get(LOCAL, (0.0, "")), (r.peak_bps / r.capacity_bps, r.zone))
    tiers = [LOCAL, *sorted(set(last) | set(severities) - {LOCAL} | set(states) - {LOCAL})]
    out = []
    for tier in dict.fromkeys(tiers):
        received = last.get(tier)
        counts = states[tier]
        peak = peaks.get(tier)
        out.append(
            TierSummary(
                tier,
                received,
                round((now_ms - received) / 1000, 1) if received else None,
                backlog.get(tier) if tier != LOCAL and "/" not in tier else None,
                severities[tier].get("critical", 0),
                severities[tier].get("high", 0),
                severities[tier].get("medium", 0),
                severities[tier].get("low", 0),
                sum(counts.values()),
                percent_migrated(counts),
                counts["regressed"],
                peak[1] if peak else "",
                round(peak[0], 4) if peak else None,
            )
        )
    return out


def tier_incidents(
    db: sqlite3.Connection,
    *,
    tier: str | None = None,
    status: str = "active",
    severity: str | None = None,
    limit: int | None = None,
) -> list[TierIncident]:
    """Incidents lower tiers sent, the most recently seen first."""
    if status not in STATUS_FILTERS:
        raise QueryError(f"unknown incident status {status!r}: use {', '.join(STATUS_FILTERS)}")
    if severity is not None and severity not in SEVERITIES:
        raise QueryError(f"unknown severity {severity!r}: use {', '.join(SEVERITIES)}")
    clauses, values = _in("status", STATUS_FILTERS[status])
    where = [clauses]
    if severity is not None:
        clause, more = _in("severity", SEVERITIES[SEVERITIES.index(severity) :])
        where.append(clause)
        values += more
    clause, more = _tier_clause(tier)
    where.append(clause)
    values += more
    with translated("list tier incidents"):
        rows = db.execute(
            "SELECT tier, incident_id, severity, status, rule_id, title, hostname, department, county,"
            " first_seen_ms, last_seen_ms, count, updated_ms, received_ms FROM tier_incidents"
            f" WHERE {' AND '.join(where)} ORDER BY last_seen_ms DESC, tier, incident_id"
            + (" LIMIT ?" if limit else ""),
            (*values, *([limit] if limit else [])),
        ).fetchall()
    return [TierIncident._make(row) for row in rows]


def _in(column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
    return f"{column} IN ({', '.join('?' * len(values))})", list(values)


def tier_incident_detail(db: sqlite3.Connection, tier: str, incident_id: int) -> dict[str, Any]:
    with translated("read the tier incident"):
        row = db.execute(
            "SELECT detail FROM tier_incidents WHERE tier = ? AND incident_id = ?", (tier, incident_id)
        ).fetchone()
    if row is None:
        raise QueryError(f"no incident {incident_id} from tier {tier!r}")
    return dict(json.loads(row[0]))


def tier_migration(db: sqlite3.Connection, *, by: str = "tier") -> list[TierProgress]:
    """Pairs per state for each tier (this collector's own as "(local)"), department or county."""
    if by not in ("tier", "department", "county"):
        raise QueryError(f"cannot group tier migration by {by!r}: use tier, department or county")
    group = {"tier": "tier", "department": "department", "county": "county"}[by]
    local_group = {"tier": f"'{LOCAL}'", "department": "a.department", "county": "a.county"}[by]
    groups: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATES, 0))
    with translated("summarize tier migration"), snapshot(db):
        for name, state, n in db.execute(
            f"SELECT {group}, state, count(*) FROM tier_migrations GROUP BY {group}, state"
        ):
            if state in STATES:
                groups[name or "(none)"][state] += n
        for name, state, n in db.execute(
            f"SELECT {local_group}, m.state, count(*) FROM migration_states AS m JOIN agents AS a"
            f" ON a.id = m.agent GROUP BY {local_group}, m.state"
        ):
            groups[name or "(none)"][state] += n
    out = [
        TierProgress(
            name,
            sum(c.values()),
            c["not_started"],
            c["dual_homed"],
            c["migrated"],
            c["regressed"],
            c["exempt"],
            c["unknown"],
            percent_migrated(c),
        )
        for name, c in groups.items()
    ]
    out.sort(key=lambda p: (p.group != LOCAL, -p.pairs, p.group))
    return out


def tier_traffic(
    db: sqlite3.Connection, *, since_ms: int, until_ms: int, tier: str | None = None
) -> list[TierTraffic]:
    """Per tier and zone over whole hours in the range: bytes, the busiest minute, its load."""
    clause, values = _tier_clause(tier)
    with translated("summarize tier traffic"):
        rows = db.execute(
            # total(), not sum(): a lower tier's figures (each up to 2**63 - 1) must not overflow the sum.
            "SELECT tier, zone, max(direction), count(*), total(rx_bytes), total(tx_bytes), max(peak_bps),"
            " max(capacity_bps), max(hosts), max(hour_ms) FROM tier_rollups"
            f" WHERE hour_ms >= ? AND hour_ms < ? AND {clause} GROUP BY tier, zone",
            (since_ms - since_ms % HOUR_MS, until_ms, *values),
        ).fetchall()
    out = [
        TierTraffic(
            t, zone, direction, hours, int(rx), int(tx), peak, capacity,
            round(peak / capacity, 4) if capacity else None, hosts, last,
        )
        for t, zone, direction, hours, rx, tx, peak, capacity, hosts, last in rows
    ]  # fmt: skip
    out.sort(key=lambda r: (-(r.peak_utilization or 0.0), -r.peak_bps, r.tier, r.zone))
    return out

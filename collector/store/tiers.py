"""Tiers in the database: what lower tiers sent, and what changed here to send up.

- **Storing** (writer process): the tier facts a lower collector sent, validated at the edge
  (collector/upstream/wire.py), upserted by (tier path, origin key). Facts from one sender arrive
  in its sequence order, so the last one stored is its newest; ``updated_ms`` going backwards
  (another path relaying an older copy) does not win.
- **Changes** (the forwarder, on a read connection): incidents, migration states and tier rows
  whose ``tier_seq`` passed the forwarder's cursor (schema step "tiers": triggers bump it on every
  change), and the hourly zone rollups computed by the traffic view.

The queries grouped by tier are in store/tiers_view.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any, NamedTuple

from collector.errors import StoreError
from collector.store.incidents import detail_document, incident_detail
from collector.store.queries import snapshot
from collector.store.sql import translated
from collector.store.traffic import traffic

HOUR_MS = 3_600_000
LOCAL = "(local)"
# The role an enrollment token gives a lower-tier collector: only such a client may send tier facts.
COLLECTOR_ROLE = "collector"
# The incident document sent upstream is cut to this (the wire allows 64 KiB).
MAX_DETAIL_BYTES = 60 * 1024

# Validated rows as the edge hands them over (plain tuples: they cross the writer's pipe).
# ("incident", origin, incident_id, rule_id, title, severity, status, agent_id, hostname, department,
#  county, first_seen_ms, last_seen_ms, count, updated_ms, detail_json)
# ("migration", origin, agent_id, hostname, department, county, network, state, since_ms, blocker,
#  updated_ms)
# ("rollup", origin, zone, direction, hour_ms, rx_bytes, tx_bytes, peak_bps, capacity_bps, hosts)
TierRow = tuple[Any, ...]


def tier_path(sender: str, origin: str) -> str:
    return f"{sender}/{origin}" if origin else sender


# --- storing (writer process) ------------------------------------------------------------------


def sender_of(db: sqlite3.Connection, key: int) -> tuple[str, str]:
    """(name, role) of the client agents.id ``key``: its enrolled hostname and role label."""
    row = db.execute("SELECT hostname, role FROM agents WHERE id = ?", (key,)).fetchone()
    return (str(row[0]), str(row[1])) if row is not None else ("", "")


def store_tier_rows(
    db: sqlite3.Connection, sender: int, name: str, rows: Iterable[TierRow], now_ms: int
) -> None:
    """Upsert what one sender's batch carried, inside the caller's transaction."""
    for row in rows:
        kind, origin, *values = row
        tier = tier_path(name, origin)
        if kind == "incident":
            db.execute(
                "INSERT INTO tier_incidents (tier, incident_id, sender, rule_id, title, severity, status,"
                " agent_id, hostname, department, county, first_seen_ms, last_seen_ms, count, updated_ms,"
                " detail, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tier, incident_id) DO UPDATE SET sender = excluded.sender,"
                " rule_id = excluded.rule_id, title = excluded.title, severity = excluded.severity,"
                " status = excluded.status, agent_id = excluded.agent_id, hostname = excluded.hostname,"
                " department = excluded.department, county = excluded.county,"
                " first_seen_ms = excluded.first_seen_ms, last_seen_ms = excluded.last_seen_ms,"
                " count = excluded.count, updated_ms = excluded.updated_ms, detail = excluded.detail,"
                " received_ms = excluded.received_ms"
                " WHERE excluded.updated_ms >= tier_incidents.updated_ms",
                (tier, values[0], sender, *values[1:], now_ms),
            )
        elif kind == "migration":
            agent_id, hostname, department, county, network, state, since, blocker, updated = values
            db.execute(
                "INSERT INTO tier_migrations (tier, agent_id, network, sender, hostname, department, county,"
                " state, since_ms, blocker, updated_ms, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " ?, ?)"
                " ON CONFLICT (tier, agent_id, network) DO UPDATE SET sender = excluded.sender,"
                " hostname = excluded.hostname, department = excluded.department, county = excluded.county,"
                " state = excluded.state, since_ms = excluded.since_ms, blocker = excluded.blocker,"
                " updated_ms = excluded.updated_ms, received_ms = excluded.received_ms"
                " WHERE excluded.updated_ms >= tier_migrations.updated_ms",
                (tier, agent_id, network, sender, hostname, department, county, state, since, blocker,
                 updated, now_ms),
            )  # fmt: skip
        elif kind == "rollup":
            zone, direction, hour_ms, rx, tx, peak, capacity, hosts = values
            # The hour is sent again while it fills: the newest copy replaces the older one.
            db.execute(
                "INSERT INTO tier_rollups (tier, zone, hour_ms, sender, direction, rx_bytes, tx_bytes,"
                " peak_bps,"
                " capacity_bps, hosts, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tier, zone, hour_ms) DO UPDATE SET sender = excluded.sender,"
                " direction = excluded.direction, rx_bytes = excluded.rx_bytes, tx_bytes = excluded.tx_bytes,"
                " peak_bps = excluded.peak_bps, capacity_bps = excluded.capacity_bps, hosts = excluded.hosts,"
                " received_ms = excluded.received_ms",
                (tier, zone, hour_ms, sender, direction, rx, tx, peak, capacity, hosts, now_ms),
            )
        else:
            raise StoreError(f"unknown tier fact kind {kind!r}")


# --- changes to send upstream (the forwarder) --------------------------------------------------


class IncidentChange(NamedTuple):
    tier_seq: int
    origin: str  # "" for this collector's own incidents, else the tier path it came from
    incident_id: int
    rule_id: str
    title: str
    severity: str
    status: str
    agent_id: str
    hostname: str
    department: str
    county: str
    first_seen_ms: int
    last_seen_ms: int
    matches: int  # incidents.count
    updated_ms: int
    detail_json: str


class MigrationChange(NamedTuple):
    tier_seq: int
    origin: str
    agent_id: str
    hostname: str
    department: str
    county: str
    network: str
    state: str
    since_ms: int
    blocker: str
    updated_ms: int


class Rollup(NamedTuple):
    origin: str
    zone: str
    direction: str
    hour_ms: int
    rx_bytes: int
    tx_bytes: int
    peak_bps: int
    capacity_bps: int
    hosts: int


def change_head(db: sqlite3.Connection) -> int:
    """The newest change number handed out (what a cursor at the head has read)."""
    with translated("read the tier change counter"):
        row = db.execute("SELECT value FROM tier_counter").fetchone()
    return int(row[0]) if row else 0


def local_incidents(db: sqlite3.Connection, after_seq: int, limit: int) -> list[IncidentChange]:
    """This collector's incidents changed after ``after_seq``, oldest change first."""
    with translated("read changed incidents"), snapshot(db):
        ids = db.execute(
            "SELECT id, tier_seq FROM incidents WHERE tier_seq > ? ORDER BY tier_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        out = []
        for incident_id, seq in ids:
            detail = incident_detail(db, incident_id)
            out.append(
                IncidentChange(
                    seq, "", incident_id, detail.rule_id or detail.rule, detail.title, detail.severity,
                    detail.status, detail.agent_id, detail.hostname, detail.department, detail.county,
                    detail.first_seen_ms, detail.last_seen_ms, detail.matches, detail.updated_ms,
                    _detail_json(detail_document(detail)),
                )
            )  # fmt: skip
    return out


def _detail_json(document: dict[str, Any]) -> str:
    text = json.dumps(document, ensure_ascii=False, sort_keys=True)
    if len(text.encode("utf-8")) <= MAX_DETAIL_BYTES:
        return text
    # Evidence can hold many events: upstream gets the incident and how much was left out.
    kept = {k: v for k, v in document.items() if k not in ("evidence", "actions")}
    kept["evidence"] = {"truncated": True, "keys": sorted(document.get("evidence", {}))[:50]}
    kept["actions"] = document.get("actions", [])[-20:]
    text = json.dumps(kept, ensure_ascii=False, sort_keys=True)
    return text if len(text.encode("utf-8")) <= MAX_DETAIL_BYTES else "{}"


def local_migrations(db: sqlite3.Connection, after_seq: int, limit: int) -> list[MigrationChange]:
    with translated("read changed migration states"):
        rows = db.execute(
            "SELECT m.tier_seq, a.agent_id, a.hostname, a.department, a.county, m.network, m.state,"
            " m.since_ms,"
            " m.evidence, m.evaluated_ms FROM migration_states AS m JOIN agents AS a ON a.id = m.agent"
            " WHERE m.tier_seq > ? ORDER BY m.tier_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
    return [
        MigrationChange(
            seq, "", agent_id, host, dept, county, network, state, since, _blocker(evidence), evaluated
        )
        for seq, agent_id, host, dept, county, network, state, since, evidence, evaluated in rows
    ]


def _blocker(evidence: str) -> str:
    """The first process still talking to the dedicated network, as one line."""
    try:
        blockers = json.loads(evidence).get("blockers") or []
    except (ValueError, AttributeError):
        return ""
    if not blockers or not isinstance(blockers[0], dict):
        return ""
    first = blockers[0]
    peer = f"{first.get('remote_addr', '')}:{first.get('remote_port', '')}".strip(":")
    parts = [str(first.get(k)) for k in ("process", "user") if first.get(k)] + (
        [f"-> {peer}"] if peer else []
    )
    more = f" (+{len(blockers) - 1} more)" if len(blockers) > 1 else ""
    return (" ".join(parts) + more)[:200]


def relayed_incidents(db: sqlite3.Connection, after_seq: int, limit: int) -> list[IncidentChange]:
    """Tier incidents received from below and changed after ``after_seq``: to relay further up."""
    with translated("read changed tier incidents"):
        rows = db.execute(
            "SELECT tier_seq, tier, incident_id, rule_id, title, severity, status, agent_id, hostname,"
            " department, county, first_seen_ms, last_seen_ms, count, updated_ms, detail FROM tier_incidents"
            " WHERE tier_seq > ? ORDER BY tier_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
    return [IncidentChange._make(row) for row in rows]


def relayed_migrations(db: sqlite3.Connection, after_seq: int, limit: int) -> list[MigrationChange]:
    with translated("read changed tier migration states"):
        rows = db.execute(
            "SELECT tier_seq, tier, agent_id, hostname, department, county, network, state, since_ms,"
            " blocker,"
            " updated_ms FROM tier_migrations WHERE tier_seq > ? ORDER BY tier_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
    return [MigrationChange._make(row) for row in rows]


def relayed_rollups(db: sqlite3.Connection, after_seq: int, limit: int) -> list[tuple[int, Rollup]]:
    with translated("read changed tier rollups"):
        rows = db.execute(
            "SELECT tier_seq, tier, zone, direction, hour_ms, rx_bytes, tx_bytes, peak_bps, capacity_bps,"
            " hosts"
            " FROM tier_rollups WHERE tier_seq > ? ORDER BY tier_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
    return [(row[0], Rollup._make(row[1:])) for row in rows]


def local_rollups(db: sqlite3.Connection, since_ms: int, until_ms: int) -> list[Rollup]:
    """Per zone and hour from the hour holding ``since_ms`` to the one holding ``until_ms``: bytes
    both ways, the busiest minute's rate (the larger direction), the link capacity and the hosts."""
    out = []
    hour = since_ms - since_ms % HOUR_MS
    while hour <= until_ms:
        for row in traffic(db, by="zone", since_ms=hour, until_ms=hour + HOUR_MS, bucket_ms=60_000):
            out.append(
                Rollup(
                    "", row.group, row.direction, hour, row.bytes_in, row.bytes_out,
                    round(max(row.peak_in_bps, row.peak_out_bps)), row.capacity_bps, row.agents,
                )
            )  # fmt: skip
        hour += HOUR_MS
    return out

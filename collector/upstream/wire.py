"""Tier facts at the edge, both ways: store rows -> TierIncident/TierMigration/TierRollup facts (the
forwarder), and received facts -> checked plain rows for the writer (the upstream's validate.py).

Everything a lower tier sends is untrusted input like an agent's: lengths, printable UTF-8, JSON
size and shape, timestamps, and the closed vocabularies (severity, status, state, direction).
"""

from __future__ import annotations

import json
from typing import Any

from collector.checks import INT64_MAX, MIN_TIME_MS, text
from collector.errors import ValidationError
from collector.migration import STATES
from collector.store.incidents import SEVERITIES
from collector.store.tiers import IncidentChange, MigrationChange, Rollup, TierRow
from protos.zonewatch.v1 import facts_pb2

TIER_KINDS = ("tier_incident", "tier_migration", "tier_rollup")
STATUSES = ("open", "acknowledged", "resolved", "false_positive")
DIRECTIONS = ("vertical", "horizontal", "")
MAX_JSON_BYTES = 64 * 1024
MAX_TEXT = 128
MAX_TITLE = 512
MAX_HOSTNAME = 253
MAX_BLOCKER = 512
# A tier path: up to a handful of names, "/"-separated.
MAX_ORIGIN = 512


# --- building (the forwarder) ------------------------------------------------------------------
# The upstream refuses a whole batch for one field its checks below refuse, and the batch then
# stays refused for good (the cursors moved on when it was spooled): so every text field is made
# to pass the very checks of tier_row(), with the same limits, before it is sent; relayed rows too.

TRUNCATED_DETAIL = '{"truncated": "the evidence was larger than a tier fact carries"}'


def clean(value: str, max_len: int, *, fallback: str = "") -> str:
    """``value`` as text() accepts it: non-printable characters (tab, NBSP, ...) made spaces, cut
    to ``max_len``; ``fallback`` when that leaves nothing and the field is required."""
    if not value.isprintable():
        value = "".join(c if c.isprintable() else " " for c in value)
    return value[:max_len] or fallback


def clean_origin(value: str) -> str:
    """A tier path as _origin() accepts it: cleaned names, none empty or padded, at most MAX_ORIGIN."""
    parts = [clean(part, MAX_ORIGIN).strip() for part in value.split("/")]
    origin = "/".join(part for part in parts if part)
    while len(origin) > MAX_ORIGIN:  # the nearest tiers (the head of the path) are kept
        origin = origin.rsplit("/", 1)[0] if "/" in origin else origin[:MAX_ORIGIN].strip()
    return origin


def clean_json(value: str) -> str:
    if not value:
        return "{}"
    if len(value) * 4 > MAX_JSON_BYTES and len(value.encode("utf-8")) > MAX_JSON_BYTES:
        return TRUNCATED_DETAIL
    return value if value.lstrip().startswith("{") else TRUNCATED_DETAIL


def incident_fact(change: IncidentChange, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        tier_incident=facts_pb2.TierIncident(
            origin=clean_origin(change.origin),
            incident_id=change.incident_id,
            rule_id=clean(change.rule_id, MAX_TEXT, fallback="?"),
            title=clean(change.title, MAX_TITLE, fallback="?"),
            severity=change.severity,
            status=change.status,
            agent_id=clean(change.agent_id, MAX_TEXT),
            hostname=clean(change.hostname, MAX_HOSTNAME),
            department=clean(change.department, MAX_TEXT),
            county=clean(change.county, MAX_TEXT),
            first_seen_ms=change.first_seen_ms,
            last_seen_ms=max(change.first_seen_ms, change.last_seen_ms),
            count=min(max(0, change.matches), INT64_MAX),
            updated_ms=change.updated_ms,
            detail_json=clean_json(change.detail_json),
        ),
    )


def migration_fact(change: MigrationChange, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        tier_migration=facts_pb2.TierMigration(
            origin=clean_origin(change.origin),
            agent_id=clean(change.agent_id, MAX_TEXT, fallback="?"),
            hostname=clean(change.hostname, MAX_HOSTNAME),
            department=clean(change.department, MAX_TEXT),
            county=clean(change.county, MAX_TEXT),
            network=clean(change.network, MAX_TEXT, fallback="?"),
            state=change.state,
            since_ms=change.since_ms,
            blocker=clean(change.blocker, MAX_BLOCKER),
            updated_ms=change.updated_ms,
        ),
    )


def rollup_fact(rollup: Rollup, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        tier_rollup=facts_pb2.TierRollup(
            origin=clean_origin(rollup.origin),
            zone=clean(rollup.zone, MAX_TEXT, fallback="?"),
            direction=rollup.direction,
            hour_ms=rollup.hour_ms,
            rx_bytes=min(max(0, rollup.rx_bytes), INT64_MAX),
            tx_bytes=min(max(0, rollup.tx_bytes), INT64_MAX),
            peak_bps=min(max(0, rollup.peak_bps), INT64_MAX),
            capacity_bps=min(max(0, rollup.capacity_bps), INT64_MAX),
            hosts=min(max(0, rollup.hosts), 2**32 - 1),
        ),
    )


# --- checking (the upstream) -------------------------------------------------------------------


def _one_of(value: str, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        shown = ", ".join(a or '""' for a in allowed)
        raise ValidationError(field, f"must be one of {shown}, got {value[:64]!r}")
    return value


def _time(value: int, field: str, latest_ms: int, *, optional: bool = False) -> int:
    if optional and value == 0:
        return 0
    if value < MIN_TIME_MS:
        raise ValidationError(field, f"{value} is before 2000-01-01 (clock broken?)")
    if value > latest_ms:
        raise ValidationError(field, f"{value} is more than 24 h ahead of the collector's clock")
    return value


def _count(value: int, field: str) -> int:
    if value > INT64_MAX:
        raise ValidationError(field, f"{value} is out of range (at most {INT64_MAX})")
    return value


def _origin(value: str, field: str) -> str:
    text(value, field, MAX_ORIGIN)
    if value and any(not part.strip() or part != part.strip() for part in value.split("/")):
        raise ValidationError(field, "must be tier names separated by '/', none empty or padded")
    return value


def _json_object(value: str, field: str) -> str:
    if len(value.encode("utf-8")) > MAX_JSON_BYTES:
        raise ValidationError(field, f"is larger than {MAX_JSON_BYTES // 1024} KiB")
    try:
        parsed: Any = json.loads(value) if value else {}
    except ValueError as exc:
        raise ValidationError(field, f"is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValidationError(field, "must be a JSON object")
    return value or "{}"


def tier_row(fact: facts_pb2.Fact, kind: str, prefix: str, latest_ms: int) -> TierRow:
    """One received tier fact as the plain row store/tiers.py upserts; ValidationError naming the field."""
    if kind == "tier_incident":
        m = fact.tier_incident
        first = _time(m.first_seen_ms, f"{prefix}.first_seen_ms", latest_ms)
        last = _time(m.last_seen_ms, f"{prefix}.last_seen_ms", latest_ms)
        if first > last:
            raise ValidationError(f"{prefix}.first_seen_ms", f"{first} is after last_seen_ms {last}")
        if m.incident_id < 1:
            raise ValidationError(f"{prefix}.incident_id", f"must be >= 1, got {m.incident_id}")
        return (
            "incident",
            _origin(m.origin, f"{prefix}.origin"),
            m.incident_id,
            text(m.rule_id, f"{prefix}.rule_id", MAX_TEXT, required=True),
            text(m.title, f"{prefix}.title", MAX_TITLE, required=True),
            _one_of(m.severity, SEVERITIES, f"{prefix}.severity"),
            _one_of(m.status, STATUSES, f"{prefix}.status"),
            text(m.agent_id, f"{prefix}.agent_id", MAX_TEXT),
            text(m.hostname, f"{prefix}.hostname", MAX_HOSTNAME),
            text(m.department, f"{prefix}.department", MAX_TEXT),
            text(m.county, f"{prefix}.county", MAX_TEXT),
            first,
            last,
            _count(m.count, f"{prefix}.count"),
            _time(m.updated_ms, f"{prefix}.updated_ms", latest_ms),
            _json_object(m.detail_json, f"{prefix}.detail_json"),
        )
    if kind == "tier_migration":
        mm = fact.tier_migration
        return (
            "migration",
            _origin(mm.origin, f"{prefix}.origin"),
            text(mm.agent_id, f"{prefix}.agent_id", MAX_TEXT, required=True),
            text(mm.hostname, f"{prefix}.hostname", MAX_HOSTNAME),
            text(mm.department, f"{prefix}.department", MAX_TEXT),
            text(mm.county, f"{prefix}.county", MAX_TEXT),
            text(mm.network, f"{prefix}.network", MAX_TEXT, required=True),
            _one_of(mm.state, STATES, f"{prefix}.state"),
            _time(mm.since_ms, f"{prefix}.since_ms", latest_ms),
            text(mm.blocker, f"{prefix}.blocker", MAX_BLOCKER),
            _time(mm.updated_ms, f"{prefix}.updated_ms", latest_ms),
        )
    if kind == "tier_rollup":
        mr = fact.tier_rollup
        hour = _time(mr.hour_ms, f"{prefix}.hour_ms", latest_ms)
        if hour % 3_600_000:
            raise ValidationError(f"{prefix}.hour_ms", f"{hour} is not the start of an hour")
        return (
            "rollup",
            _origin(mr.origin, f"{prefix}.origin"),
            text(mr.zone, f"{prefix}.zone", MAX_TEXT, required=True),
            _one_of(mr.direction, DIRECTIONS, f"{prefix}.direction"),
            hour,
            _count(mr.rx_bytes, f"{prefix}.rx_bytes"),
            _count(mr.tx_bytes, f"{prefix}.tx_bytes"),
            _count(mr.peak_bps, f"{prefix}.peak_bps"),
            _count(mr.capacity_bps, f"{prefix}.capacity_bps"),
            mr.hosts,
        )
    raise ValidationError(prefix, f"is not a tier fact ({kind})")

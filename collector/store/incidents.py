"""Incidents in the database: raised under a deduplication key, reviewed by operators, audited.

The collector raises some itself, about the fleet (a hole in an agent's sequence, one identity
used from two places); the rule engine raises the rest. One active (open or acknowledged) incident
per (rule, key): another match updates its count, last_seen_ms and evidence instead of adding a
row, and two different keys are never merged. Once an operator has closed it (resolved, false
positive), a new match opens a new incident: the closed one stays as it was judged.

Every operator action is a row of incident_actions, hash-chained to the one before, in the same
transaction as the status change it makes: the database refuses to change or delete those rows, and
verify_audit finds a row rewritten behind its back. raise_incidents runs inside its caller's
transaction; act opens its own.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError
from collector.store.sql import transaction, translated

SEQUENCE_GAP = "zonewatch.sequence_gap"
AGENT_CLONE = "zonewatch.agent_clone"

SEVERITIES = ("informational", "low", "medium", "high", "critical")  # least to most severe
STATUSES = ("open", "acknowledged", "resolved", "false_positive")
ACTIVE = ("open", "acknowledged")
ACTIONS = ("acknowledge", "resolve", "false_positive", "reopen", "comment")
# What `incidents list --status` takes: a status, or a name for several.
STATUS_FILTERS: dict[str, tuple[str, ...]] = {
    **{status: (status,) for status in STATUSES},
    "active": ACTIVE,
    "all": STATUSES,
}

# action -> (the statuses it applies to, the status it leads to; None: unchanged)
_TRANSITIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "acknowledge": (("open",), "acknowledged"),
    "resolve": (ACTIVE, "resolved"),
    "false_positive": (ACTIVE, "false_positive"),
    "reopen": (("resolved", "false_positive"), "open"),
    "comment": (STATUSES, None),
}
_DONE = {
    "acknowledge": "acknowledged",
    "resolve": "resolved",
    "false_positive": "marked a false positive",
    "reopen": "reopened",
}

GENESIS_HASH = "0" * 64
MAX_ACTOR = 200
MAX_COMMENT = 4000
# Evidence kept per incident: enough to judge it, bounded however long it keeps matching.
MAX_EVENTS = 50
MAX_PROCESSES = 50


class IncidentError(QueryError):
    """An operator's action the incident's lifecycle does not allow, or names no incident."""


class Raise(NamedTuple):
    rule: str  # the rule's name (zonewatch.* for the collector's own)
    dedup_key: str
    agent: int | None  # agents.id
    severity: str  # informational, low, medium, high, critical
    title: str
    # {"events": [...], "processes": [...]} from the rule engine (merged into the incident's), or
    # any other object from the collector's own checks (the newest replaces the one stored).
    evidence: dict[str, Any]
    time_ms: int
    rule_id: str = ""  # the Sigma rule's id
    rule_title: str = ""
    dedup_fields: dict[str, Any] | None = None  # dedup-by field -> value; None: {}


class Action(NamedTuple):
    """One row of the audit log."""

    id: int
    incident: int
    action: str
    actor: str
    comment: str
    from_status: str
    to_status: str
    time_ms: int
    prev_hash: str
    hash: str


_ACTION_COLUMNS = ", ".join(Action._fields)


class AuditCheck(NamedTuple):
    rows: int  # audit rows read
    ok: bool
    first_bad_id: int | None  # the first audit row that does not hold, None when ok (or not a row)
    message: str
    head_hash: str = ""  # the hash of the last row: note it down to detect a rewritten chain later


class IncidentRow(NamedTuple):
    """An incident as `incidents list` shows it, with its host's labels."""

    id: int
    severity: str
    status: str
    rule: str
    rule_id: str
    title: str
    agent_id: str  # "" when the incident is about no known agent
    hostname: str
    department: str
    county: str
    first_seen_ms: int
    last_seen_ms: int
    matches: int  # how many times the rule matched (incidents.count)
    updated_ms: int


class IncidentDetail(NamedTuple):
    """Everything `incidents show` prints."""

    id: int
    rule: str
    rule_id: str
    rule_title: str
    title: str
    severity: str
    status: str
    dedup_key: str
    dedup_fields: dict[str, Any]
    agent_id: str
    hostname: str
    department: str
    county: str
    site: str
    role: str
    first_seen_ms: int
    last_seen_ms: int
    matches: int  # how many times the rule matched (incidents.count)
    updated_ms: int
    evidence: dict[str, Any]
    actions: list[Action]


# --- raising ------------------------------------------------------------------------------------


def raise_incidents(db: sqlite3.Connection, incidents: list[Raise]) -> list[int]:
    """Insert each incident, or count it into the active one with the same rule and key.

    Returns the incident id each Raise went into, in order (the same id twice when two of them
    went into one incident).
    """
    ids = []
    for i in incidents:
        current = db.execute(
            "SELECT id, evidence FROM incidents WHERE rule = ? AND dedup_key = ?"
            " AND status IN ('open', 'acknowledged') ORDER BY id DESC LIMIT 1",
            (i.rule, i.dedup_key),
        ).fetchone()
        if current is not None:
            incident_id, stored = current
            evidence = _dumps(merge_evidence(_loads(stored), i.evidence))
            db.execute(
                "UPDATE incidents SET count = count + 1, last_seen_ms = max(last_seen_ms, :time),"
                " updated_ms = max(updated_ms, :time), evidence = :evidence, title = :title,"
                " rule_id = CASE WHEN :rule_id != '' THEN :rule_id ELSE rule_id END,"
                " rule_title = CASE WHEN :rule_title != '' THEN :rule_title ELSE rule_title END"
                " WHERE id = :id",
                {
                    "time": i.time_ms,
                    "evidence": evidence,
                    "title": i.title,
                    "rule_id": i.rule_id,
                    "rule_title": i.rule_title,
                    "id": incident_id,
                },
            )
        else:
            cursor = db.execute(
                "INSERT INTO incidents (rule, dedup_key, agent, severity, title, first_seen_ms, last_seen_ms,"
                " evidence, rule_id, rule_title, dedup_fields, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    i.rule,
                    i.dedup_key,
                    i.agent,
                    i.severity,
                    i.title,
                    i.time_ms,
                    i.time_ms,
                    _dumps(merge_evidence({}, i.evidence)),
                    i.rule_id,
                    i.rule_title,
                    _dumps(i.dedup_fields or {}),
                    i.time_ms,
                ),
            )
            incident_id = cursor.lastrowid
        ids.append(int(incident_id))
    return ids


def merge_evidence(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The evidence of an incident after one more match.

    The rule engine's form, {"events": [...], "processes": [...]}, accumulates: the MAX_EVENTS
    newest distinct events (by time_ms), the processes once per (pid, name), the MAX_PROCESSES
    last seen. Any other object (the collector's own incidents) replaces what was stored: it
    describes the newest occurrence.
    """
    if not _structured(new):
        return new
    merged = {**stored, **new} if _structured(stored) else dict(new)
    events: dict[str, dict[str, Any]] = {}
    for event in [*_items(stored.get("events")), *_items(new.get("events"))]:
        events.setdefault(_dumps(event), event)  # the same event twice (overlapping windows): once
    newest = sorted(events.values(), key=_event_time)[-MAX_EVENTS:]
    processes: dict[tuple[Any, Any], dict[str, Any]] = {}
    for process in [*_items(stored.get("processes")), *_items(new.get("processes"))]:
        key = (process.get("pid"), process.get("name", process.get("process")))
        processes.pop(key, None)  # seen again: it moves to the end, the last to be dropped
        processes[key] = process
    merged["events"] = newest
    merged["processes"] = list(processes.values())[-MAX_PROCESSES:]
    return merged


def _structured(evidence: dict[str, Any]) -> bool:
    return isinstance(evidence.get("events"), list) or isinstance(evidence.get("processes"), list)


def _items(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _event_time(event: dict[str, Any]) -> int:
    time_ms = event.get("time_ms")
    return time_ms if isinstance(time_ms, int) and not isinstance(time_ms, bool) else 0


def _dumps(value: Any) -> str:
    # default=str: a value JSON cannot hold (bytes, a set) is kept as its text, not lost with the match.
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _loads(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --- the lifecycle -----------------------------------------------------------------------------


def act(
    db: sqlite3.Connection, incident_id: int, action: str, actor: str, comment: str, now_ms: int
) -> Action:
    """An operator's action on an incident: its status change and audit row, in one transaction.

    open -> acknowledged (acknowledge); open, acknowledged -> resolved (resolve) or false_positive
    (false_positive); resolved, false_positive -> open (reopen, which needs a comment saying why);
    comment (a comment is needed) on any. Anything else raises IncidentError.
    """
    if action not in _TRANSITIONS:
        raise IncidentError(f"unknown incident action {action!r}: use {', '.join(ACTIONS)}")
    actor = actor.strip()
    comment = comment.strip()
    if not actor:
        raise IncidentError("an incident action needs the name of who takes it (--by)")
    if len(actor) > MAX_ACTOR:
        raise IncidentError(f"the actor's name is {len(actor)} characters long; at most {MAX_ACTOR}")
    if len(comment) > MAX_COMMENT:
        raise IncidentError(f"the comment is {len(comment)} characters long; at most {MAX_COMMENT}")
    if action in ("reopen", "comment") and not comment:
        raise IncidentError(f"to {action} an incident, say why (--comment)")
    allowed, leads_to = _TRANSITIONS[action]
    # BEGIN IMMEDIATE: two operators acting at once take turns, each chaining to the other's row.
    with translated("record the incident action"), transaction(db):
        row = db.execute("SELECT status FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        if row is None:
            raise IncidentError(f"no incident {incident_id}")
        (status,) = row
        if status not in allowed:
            raise IncidentError(_refusal(incident_id, status, action))
        last = db.execute("SELECT id, hash FROM incident_actions ORDER BY id DESC LIMIT 1").fetchone()
        last_id, prev_hash = last if last is not None else (0, GENESIS_HASH)
        fields = {
            "id": last_id + 1,
            "incident": incident_id,
            "action": action,
            "actor": actor,
            "comment": comment,
            "from_status": status,
            "to_status": leads_to or status,
            "time_ms": now_ms,
        }
        recorded = Action(**fields, prev_hash=prev_hash, hash=chain_hash(prev_hash, fields))
        db.execute(
            f"INSERT INTO incident_actions ({_ACTION_COLUMNS}) VALUES ({', '.join('?' * len(recorded))})",
            recorded,
        )
        db.execute(
            "UPDATE incidents SET status = ?, updated_ms = max(updated_ms, ?) WHERE id = ?",
            (recorded.to_status, now_ms, incident_id),
        )
    return recorded


def _refusal(incident_id: int, status: str, action: str) -> str:
    message = f"incident {incident_id} is {status.replace('_', ' ')}; it cannot be {_DONE[action]}"
    if status in ("resolved", "false_positive"):
        return message + " (reopen it first)"
    if action == "reopen":
        return message + " (it is not closed)"
    return message


def chain_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """sha256 hex of prev_hash + the canonical JSON (sorted keys, no spaces, UTF-8) of the row's
    fields other than prev_hash and hash."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def verify_audit(db: sqlite3.Connection) -> AuditCheck:
    """Recompute the audit chain, and check it against the incidents' statuses.

    Finds a row changed or removed (its hash, or the next row's prev_hash, no longer holds), rows
    whose statuses do not follow on from each other, and an incident whose status is not where
    its actions left it (changed without an action, or its last action removed). A chain
    rewritten whole from the first changed row on is only found against a head_hash noted before.
    """
    with translated("read the incident audit log"):
        cursor = db.execute(f"SELECT {_ACTION_COLUMNS} FROM incident_actions ORDER BY id")
        rows, prev_hash = 0, GENESIS_HASH
        statuses: dict[int, str] = {}  # incident -> status its actions so far leave it in
        for row in map(Action._make, cursor):
            rows += 1
            fields = row._asdict()
            del fields["prev_hash"], fields["hash"]
            if row.prev_hash != prev_hash:
                what = "the previous row" if rows > 1 else "the start of the chain (64 zeros)"
                return AuditCheck(
                    rows,
                    False,
                    row.id,
                    f"audit row {row.id}: its prev_hash is not the hash of {what}: a row before it was "
                    "changed or removed",
                )
            if chain_hash(prev_hash, fields) != row.hash:
                return AuditCheck(
                    rows, False, row.id, f"audit row {row.id}: its hash does not match its contents: changed"
                )
            before = statuses.get(row.incident, "open")
            if row.from_status != before:
                return AuditCheck(
                    rows,
                    False,
                    row.id,
                    f"audit row {row.id}: incident {row.incident} was {before} after its previous "
                    f"action, this one says {row.from_status}: an action is missing",
                )
            statuses[row.incident] = row.to_status
            prev_hash = row.hash
        for incident_id, status in db.execute("SELECT id, status FROM incidents ORDER BY id"):
            expected = statuses.get(incident_id, "open")
            if status != expected:
                return AuditCheck(
                    rows,
                    False,
                    None,
                    f"incident {incident_id} is {status} but its audited actions leave it {expected}: "
                    "its status was changed without an action, or its last action was removed",
                    prev_hash,
                )
    return AuditCheck(
        rows, True, None, f"{rows} audit row{'' if rows == 1 else 's'}, chain intact", prev_hash
    )


def audit_action(db: sqlite3.Connection, action_id: int) -> Action | None:
    """One audit row as stored (verify_audit's first_bad_id, to show what it holds now)."""
    with translated("read the incident audit log"):
        row = db.execute(
            f"SELECT {_ACTION_COLUMNS} FROM incident_actions WHERE id = ?", (action_id,)
        ).fetchone()
    return None if row is None else Action._make(row)


# --- queries -----------------------------------------------------------------------------------


def require_current_schema(db: sqlite3.Connection, path: object) -> None:
    """A reader does not migrate (the running collector does): refuse, in one line, a database
    without the incident tables' current columns rather than fail on a missing one."""
    from collector.store.schema import MIGRATIONS

    with translated("read the schema version"):
        (version,) = db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    if version < len(MIGRATIONS):
        raise StoreError(
            f"{path} has schema version {version}, this collector reads version {len(MIGRATIONS)}: "
            "restart `zonewatch-collector serve` on it to upgrade it"
        )


def list_incidents(
    db: sqlite3.Connection,
    *,
    status: str = "active",
    severity: str | None = None,
    rule: str | None = None,
    agent: int | None = None,
    department: str | None = None,
    since_ms: int | None = None,
    limit: int | None = None,
) -> list[IncidentRow]:
    """Incidents, the most recently seen first.

    status: one of STATUS_FILTERS (active: open and acknowledged); severity: this or more severe;
    rule: its name or Sigma id; agent: agents.id (queries.resolve_agent); department: the host's,
    exactly; since_ms: seen at or after it.
    """
    if status not in STATUS_FILTERS:
        raise QueryError(f"unknown incident status {status!r}: use {', '.join(STATUS_FILTERS)}")
    if severity is not None and severity not in SEVERITIES:
        raise QueryError(f"unknown severity {severity!r}: use {', '.join(SEVERITIES)}")
    if limit is not None and limit < 1:
        raise QueryError(f"the limit must be at least 1, got {limit}")
    where, params = _in("i.status", STATUS_FILTERS[status])
    clauses: list[str] = [where]
    values: list[str | int] = list(params)
    if severity is not None:
        clause, params = _in("i.severity", SEVERITIES[SEVERITIES.index(severity) :])
        clauses.append(clause)
        values.extend(params)
    if rule is not None:
        clauses.append("(i.rule = ? OR (i.rule_id != '' AND i.rule_id = ? COLLATE NOCASE))")
        values += [rule, rule]
    if agent is not None:
        clauses.append("i.agent = ?")
        values.append(agent)
    if department is not None:
        clauses.append("a.department = ?")
        values.append(department)
    if since_ms is not None:
        clauses.append("i.last_seen_ms >= ?")
        values.append(since_ms)
    with translated("list incidents"):
        rows = db.execute(
            "SELECT i.id, i.severity, i.status, i.rule, i.rule_id, i.title, coalesce(a.agent_id, ''),"
            " coalesce(a.hostname, ''), coalesce(a.department, ''), coalesce(a.county, ''), i.first_seen_ms,"
            " i.last_seen_ms, i.count, i.updated_ms"
            " FROM incidents AS i LEFT JOIN agents AS a ON a.id = i.agent"
            f" WHERE {' AND '.join(clauses)} ORDER BY i.last_seen_ms DESC, i.id DESC"
            + (" LIMIT ?" if limit is not None else ""),
            (*values, *([limit] if limit is not None else [])),
        ).fetchall()
    return [IncidentRow._make(row) for row in rows]


def _in(column: str, values: Iterable[str]) -> tuple[str, list[str]]:
    listed = list(values)
    return f"{column} IN ({', '.join('?' * len(listed))})", listed


def incident_detail(db: sqlite3.Connection, incident_id: int) -> IncidentDetail:
    """One incident with its host's labels, evidence and every action taken on it, oldest first."""
    with translated("read the incident"):
        row = db.execute(
            "SELECT i.id, i.rule, i.rule_id, i.rule_title, i.title, i.severity, i.status, i.dedup_key,"
            " i.dedup_fields, coalesce(a.agent_id, ''), coalesce(a.hostname, ''), coalesce(a.department, ''),"
            " coalesce(a.county, ''), coalesce(a.site, ''), coalesce(a.role, ''), i.first_seen_ms,"
            " i.last_seen_ms, i.count, i.updated_ms, i.evidence"
            " FROM incidents AS i LEFT JOIN agents AS a ON a.id = i.agent WHERE i.id = ?",
            (incident_id,),
        ).fetchone()
        if row is None:
            raise IncidentError(f"no incident {incident_id}")
        actions = [
            Action._make(action)
            for action in db.execute(
                f"SELECT {_ACTION_COLUMNS} FROM incident_actions WHERE incident = ? ORDER BY id",
                (incident_id,),
            )
        ]
    fields = list(row)
    fields[8] = _loads(fields[8])  # dedup_fields
    fields[19] = _loads(fields[19])  # evidence
    return IncidentDetail._make([*fields, actions])


def detail_document(detail: IncidentDetail) -> dict[str, Any]:
    """One incident as plain data: what `incidents show --format json` prints and reports embed."""
    document = detail._asdict()
    document["actions"] = [a._asdict() for a in detail.actions]
    return document

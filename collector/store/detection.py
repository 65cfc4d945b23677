"""What the rule engine reads from the database: host labels, processes for evidence, the agents
that could fall silent, and migration transitions. Reads only; incidents are written by incidents.py.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, NamedTuple


class HostFields(NamedTuple):
    agent_id: str
    hostname: str
    department: str
    county: str
    site: str
    role: str


class SilenceCandidate(NamedTuple):
    key: int
    last_seen_ms: int


class TransitionRow(NamedTuple):
    id: int
    agent: int
    network: str
    from_state: str
    to_state: str
    time_ms: int
    evidence: dict[str, Any]


def host_fields(db: sqlite3.Connection, key: int) -> HostFields | None:
    row = db.execute(
        "SELECT agent_id, hostname, department, county, site, role FROM agents WHERE id = ?", (key,)
    ).fetchone()
    return HostFields(*row) if row else None


def processes_talking_to(
    db: sqlite3.Connection, key: int, peer: str, since_ms: int, until_ms: int, limit: int = 10
) -> list[dict[str, Any]]:
    """The processes of this host whose flows with ``peer`` closed in the window, newest first."""
    rows = db.execute(
        "SELECT pid, process, user, cmdline, max(time_ms) AS last_ms, count(*) FROM flows"
        " WHERE agent = ? AND time_ms BETWEEN ? AND ? AND remote_addr = ? AND pid > 0"
        " GROUP BY pid, process ORDER BY last_ms DESC LIMIT ?",
        (key, since_ms, until_ms, peer, limit),
    ).fetchall()
    return [
        {"pid": pid, "process": name, "user": user, "cmdline": cmdline, "last_ms": last, "flows": flows}
        for pid, name, user, cmdline, last, flows in rows
    ]


def silence_candidates(db: sqlite3.Connection, seen_since_ms: int) -> list[SilenceCandidate]:
    """Agents not revoked that reported at some point since ``seen_since_ms``."""
    rows = db.execute(
        "SELECT id, last_seen_ms FROM agents WHERE revoked_ms IS NULL AND last_seen_ms >= ?", (seen_since_ms,)
    ).fetchall()
    return [SilenceCandidate(*r) for r in rows]


def revoked_agents(db: sqlite3.Connection) -> list[int]:
    return [key for (key,) in db.execute("SELECT id FROM agents WHERE revoked_ms IS NOT NULL")]


def last_transition_id(db: sqlite3.Connection) -> int:
    (value,) = db.execute("SELECT coalesce(max(id), 0) FROM migration_transitions").fetchone()
    return int(value)


def transitions_after(db: sqlite3.Connection, after_id: int, limit: int = 10_000) -> list[TransitionRow]:
    rows = db.execute(
        "SELECT id, agent, network, from_state, to_state, time_ms, evidence FROM migration_transitions"
        " WHERE id > ? ORDER BY id LIMIT ?",
        (after_id, limit),
    ).fetchall()
    return [TransitionRow(r[0], r[1], r[2], r[3], r[4], r[5], _json_object(r[6])) for r in rows]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

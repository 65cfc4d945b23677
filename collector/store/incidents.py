"""Incidents in the database: raised (or, while one is open, updated) under a deduplication key.

The collector raises some itself, about the fleet (a hole in an agent's sequence, one identity
used from two places); the rule engine raises the rest. One open incident per (rule, key):
another match updates its count, last_seen_ms and evidence instead of adding a row, and two
different keys are never merged. Callers run inside their own transaction.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, NamedTuple

SEQUENCE_GAP = "zonewatch.sequence_gap"
AGENT_CLONE = "zonewatch.agent_clone"


class Raise(NamedTuple):
    rule: str
    dedup_key: str
    agent: int | None  # agents.id
    severity: str  # informational, low, medium, high, critical
    title: str
    evidence: dict[str, Any]
    time_ms: int


def raise_incidents(db: sqlite3.Connection, incidents: list[Raise]) -> None:
    """Insert each incident, or count it into the open one with the same rule and key."""
    for i in incidents:
        evidence = json.dumps(i.evidence, ensure_ascii=False, sort_keys=True)
        updated = db.execute(
            "UPDATE incidents SET count = count + 1, last_seen_ms = max(last_seen_ms, ?), evidence = ?,"
            " title = ? WHERE rule = ? AND dedup_key = ? AND status IN ('open', 'acknowledged')",
            (i.time_ms, evidence, i.title, i.rule, i.dedup_key),
        ).rowcount
        if not updated:
            db.execute(
                "INSERT INTO incidents (rule, dedup_key, agent, severity, title, first_seen_ms, last_seen_ms,"
                " evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (i.rule, i.dedup_key, i.agent, i.severity, i.title, i.time_ms, i.time_ms, evidence),
            )

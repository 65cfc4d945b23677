"""Incident changes for the SIEM export, and each destination's delivery cursor.

Every change of an incident gives it the next change_seq (the schema's triggers: raised, matched
again, an operator's action). A destination's cursor is the last change_seq it has delivered:
what comes after it is its backlog. The exporter reads a batch after the cursor, delivers it, and
only then moves the cursor, so a crash or a failed delivery means sending again, never skipping.
The cursors are written beside a running collector like the CLI's writes are (short
transactions; WAL and busy_timeout make that safe).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from collector.errors import QueryError
from collector.store.incidents import detail_document, incident_detail
from collector.store.sql import transaction, translated

MAX_ERROR = 500  # characters of the last error kept per destination


class ExportedChange(NamedTuple):
    """An incident as it is after its change number `seq`."""

    seq: int  # incidents.change_seq
    change: str  # raised, matched, or the action: acknowledge, resolve, false_positive, reopen, comment
    document: dict[str, Any]  # `incidents show --format json`'s document (store/incidents.py)


class CursorStatus(NamedTuple):
    """`siem status`: one destination, as its exporter last recorded it."""

    destination: str
    state: str  # failing (the last attempt failed, nothing delivered since), else ok
    change_seq: int  # the cursor: every change up to it delivered
    backlog: int  # incidents changed after the cursor
    delivered: int  # messages delivered, ever (resent ones count again)
    last_delivery_ms: int | None
    last_error: str
    last_error_ms: int | None
    created_ms: int


def changes_after(db: sqlite3.Connection, after_seq: int, limit: int) -> list[ExportedChange]:
    """The incidents changed after change number after_seq, the oldest change first, at most limit."""
    if limit < 1:
        raise QueryError(f"a batch must hold at least one change, got {limit}")
    with translated("read incident changes"), _snapshot(db):
        rows = db.execute(
            "SELECT id, change_seq, change FROM incidents WHERE change_seq > ? ORDER BY change_seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [
            ExportedChange(seq, change, detail_document(incident_detail(db, i))) for i, seq, change in rows
        ]


def changes_since(db: sqlite3.Connection, since_ms: int | None, page: int = 500) -> Iterator[ExportedChange]:
    """Every incident changed at or after since_ms (None: every incident), in change order, read a page
    at a time. An incident changing meanwhile may come twice (once per state), never not at all."""
    after = 0
    while True:
        with translated("read incident changes"), _snapshot(db):
            rows = db.execute(
                "SELECT id, change_seq, change FROM incidents WHERE change_seq > ? AND updated_ms >= ?"
                " ORDER BY change_seq LIMIT ?",
                (after, since_ms if since_ms is not None else -(2**62), page),
            ).fetchall()
            batch = [
                ExportedChange(seq, change, detail_document(incident_detail(db, i)))
                for i, seq, change in rows
            ]
        yield from batch
        if len(rows) < page:
            return
        after = rows[-1][1]


@contextmanager
def _snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: the change numbers and the documents read in it agree."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        if db.in_transaction:
            db.execute("COMMIT")


def backlog(db: sqlite3.Connection, after_seq: int) -> int:
    """How many incidents changed after change number after_seq."""
    with translated("read incident changes"):
        (count,) = db.execute("SELECT count(*) FROM incidents WHERE change_seq > ?", (after_seq,)).fetchone()
    return int(count)


def open_cursor(db: sqlite3.Connection, destination: str, now_ms: int) -> int:
    """The destination's cursor; a new destination starts before the first change (everything)."""
    with translated("open the SIEM export cursor"), transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO siem_cursors (destination, created_ms) VALUES (?, ?)",
            (destination, now_ms),
        )
        (seq,) = db.execute(
            "SELECT change_seq FROM siem_cursors WHERE destination = ?", (destination,)
        ).fetchone()
    return int(seq)


def record_delivery(
    db: sqlite3.Connection, destination: str, change_seq: int, messages: int, now_ms: int
) -> None:
    """Delivered up to change_seq (the cursor never moves back)."""
    with translated("move the SIEM export cursor"), transaction(db):
        db.execute(
            "UPDATE siem_cursors SET change_seq = max(change_seq, ?), delivered = delivered + ?,"
            " last_delivery_ms = ? WHERE destination = ?",
            (change_seq, messages, now_ms, destination),
        )


def record_error(db: sqlite3.Connection, destination: str, message: str, now_ms: int) -> None:
    with translated("record the SIEM export error"), transaction(db):
        db.execute(
            "UPDATE siem_cursors SET last_error = ?, last_error_ms = ? WHERE destination = ?",
            (message[:MAX_ERROR], now_ms, destination),
        )


def cursor_statuses(db: sqlite3.Connection) -> list[CursorStatus]:
    """Every destination ever exported to, by name, with its backlog now."""
    with translated("read the SIEM export cursors"):
        rows = db.execute(
            "SELECT c.destination, c.change_seq,"
            " (SELECT count(*) FROM incidents AS i WHERE i.change_seq > c.change_seq),"
            " c.delivered, c.last_delivery_ms, c.last_error, c.last_error_ms, c.created_ms"
            " FROM siem_cursors AS c ORDER BY c.destination"
        ).fetchall()
    statuses = []
    for destination, seq, backlog, delivered, delivery_ms, error, error_ms, created_ms in rows:
        failing = error_ms is not None and (delivery_ms is None or error_ms > delivery_ms)
        state = "failing" if failing else "ok"
        statuses.append(
            CursorStatus(
                destination, state, seq, backlog, delivered, delivery_ms, error, error_ms, created_ms
            )
        )
    return statuses

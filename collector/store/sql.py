"""Two SQLite idioms every store module uses: a write transaction and error translation."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from collector.errors import StoreError


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (which propagates as it is)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextmanager
def translated(what: str) -> Iterator[None]:
    """sqlite3.Error inside becomes StoreError("cannot <what>: ...")."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"cannot {what}: {exc}") from exc

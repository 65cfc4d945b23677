"""Opening the collector's SQLite file with the settings durability depends on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from collector.errors import StoreError
from collector.store.schema import migrate


def open_database(path: str | Path, *, readonly: bool = False, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the database.

    WAL lets operators query while the collector writes; synchronous=FULL makes
    every COMMIT durable before the collector acknowledges what it holds.
    Readers open with mode=ro and never migrate or create.
    """
    path = Path(path)
    if (readonly or not create) and not path.exists():
        raise StoreError(f"no database at {path} (start the collector with --db {path} first)")
    try:
        if readonly:
            db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA query_only = ON")
            db.execute("PRAGMA busy_timeout = 5000")
            try:
                db.execute("SELECT 1 FROM schema_migrations LIMIT 1")
            except sqlite3.Error as exc:
                db.close()
                raise StoreError(f"{path} is not a zonewatch database ({exc})") from exc
            return db
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA foreign_keys = OFF")  # integrity is the writer's job; FK checks cost per row
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot open database {path}: {exc.strerror or exc}") from exc
    try:
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db

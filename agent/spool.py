"""The agent's durable outbox: report batches wait here until the collector acknowledges them.

A batch is opaque bytes (a serialized report that embeds its own sequence number); the spool
never looks inside. Sequence numbers come from a persisted counter, so they increase across
restarts and are never reused, even once every batch has been acknowledged and deleted.

Durability: SQLite in WAL mode with synchronous=FULL, every change in its own
BEGIN IMMEDIATE ... COMMIT, so a batch whose append() returned survives kill -9 and power loss.

Bounds: the payload bytes kept never exceed ``max_bytes``. When an append would overflow,
the oldest batches are evicted and the eviction is recorded as an "unreported drop" until the
agent confirms it has told the collector (take_drop_report, then clear_drop_report). The file on
disk is somewhat larger than ``max_bytes``: page overhead, the WAL, and free pages left by
deletions (reused, not returned to the filesystem).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from agent.errors import SpoolError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# build(seq) -> (payload, facts, first_ms, last_ms)
BatchBuilder = Callable[[int], tuple[bytes, int, int, int]]


class SpooledBatch(NamedTuple):
    """One stored batch, as handed to the sender."""

    seq: int
    payload: bytes
    facts: int
    first_ms: int
    last_ms: int
    created_ms: int


class DropReport(NamedTuple):
    """What eviction threw away since the last confirmed report.

    ``first_seq``..``last_seq`` bounds the dropped batches; numbers in that range that were
    acknowledged or discarded before the eviction are not among the ``batches`` counted.
    """

    batches: int
    facts: int
    first_seq: int
    last_seq: int
    from_ms: int
    to_ms: int


class SpoolStats(NamedTuple):
    """A consistent snapshot of the spool; the dropped totals count since the spool was created."""

    batches: int
    bytes: int
    oldest_seq: int | None
    newest_seq: int | None
    next_seq: int
    dropped_batches_total: int
    dropped_facts_total: int


# (name, statements). Append only: a step, once released, is never edited.
# Statements rather than one script: executescript() would commit the transaction around them.
_MIGRATIONS: list[tuple[str, tuple[str, ...]]] = [
    (
        "initial schema: meta, batches, unreported drops",
        (
            # One row, so counters change in the same transaction as the batches they count.
            """CREATE TABLE meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                next_seq INTEGER NOT NULL,
                stored_bytes INTEGER NOT NULL,
                dropped_batches_total INTEGER NOT NULL,
                dropped_facts_total INTEGER NOT NULL
            )""",
            "INSERT INTO meta VALUES (1, 1, 0, 0, 0)",
            """CREATE TABLE batches (
                seq INTEGER PRIMARY KEY,
                facts INTEGER NOT NULL,
                first_ms INTEGER NOT NULL,
                last_ms INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                bytes INTEGER NOT NULL,
                payload BLOB NOT NULL
            )""",
            # AUTOINCREMENT: ids must never be reused, see Spool._drops_handed_out.
            """CREATE TABLE unreported_drops (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                batches INTEGER NOT NULL,
                facts INTEGER NOT NULL,
                first_seq INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                from_ms INTEGER NOT NULL,
                to_ms INTEGER NOT NULL
            )""",
        ),
    ),
]


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Spool:
    """A bounded, durable, thread-safe queue of report batches keyed by sequence number.

    One SQLite connection shared by the agent's threads behind a lock. ``build`` callbacks run
    while that lock is held and must not call back into the spool.
    """

    def __init__(
        self,
        path: str | Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        # Drop rows with an id up to this one may be held by a caller as part of a DropReport.
        # New evictions never merge into such a row, so clear_drop_report() deletes exactly what
        # was reported. Rows left by an earlier process count as handed out too.
        self._drops_handed_out = 0
        self._db: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        created = not self.path.exists()
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        try:
            (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode != "wal":
                raise SpoolError(f"cannot open spool {self.path}: the filesystem does not support WAL mode")
            db.execute("PRAGMA synchronous=FULL")
            _migrate(db, self.path)
            (self._drops_handed_out,) = db.execute(
                "SELECT coalesce(max(id), 0) FROM unreported_drops"
            ).fetchone()
            if created:
                # SQLite syncs the directory entry of the WAL but not of the database file itself.
                _sync_directory(self.path.parent)
        except (sqlite3.Error, OSError) as exc:
            db.close()
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        return db

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file; idempotent. Later calls other than close() raise SpoolError."""
        with self._lock:
            if self._db is None:
                return
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot close spool {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _connection(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and translate SQLite errors; only sqlite3.Error, so a build() error passes."""
        with self._lock:
            if self._db is None:
                raise SpoolError(f"spool {self.path} is closed")
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot {action} spool {self.path}: {exc}") from exc

    def append(self, build: BatchBuilder) -> int:
        """Store the batch ``build(seq)`` returns under the next sequence number; return that number.

        Numbering, eviction and insertion are one transaction, committed durably before this
        returns. If ``build`` raises, or the batch cannot be stored, the transaction rolls back and
        the number is not consumed: the next append gets it, so sequence numbers have no holes
        other than batches that were stored and later dropped. Reusing the number is safe because
        the payload that carried it was never stored and so never sent.
        """
        with self._connection("append to") as db, _transaction(db):
            seq, stored = db.execute("SELECT next_seq, stored_bytes FROM meta").fetchone()
            payload, facts, first_ms, last_ms = build(seq)
            if not isinstance(payload, bytes):
                raise TypeError(f"build() must return the payload as bytes, not {type(payload).__name__}")
            size = len(payload)
            if size > self.max_bytes:
                raise SpoolError(
                    f"batch {seq} is {size} bytes, more than spool {self.path} holds in all "
                    f"({self.max_bytes} bytes); nothing stored"
                )
            if stored + size > self.max_bytes:
                stored -= self._evict(db, stored + size - self.max_bytes)
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, facts, first_ms, last_ms, self._clock_ms(), size, payload),
            )
            db.execute("UPDATE meta SET next_seq = ?, stored_bytes = ?", (seq + 1, stored + size))
        return int(seq)

    def renumber_from(self, first_seq: int, patch: Callable[[bytes, int], bytes]) -> int:
        """Move every stored batch, in order, to sequence numbers from ``first_seq`` on.

        For a spool that lost its history (file deleted or restored from an old copy) while the
        collector kept the agent's record: numbers it would reuse are ones the collector already
        settled, and batches under them would be taken for replays. ``patch(payload, seq)`` returns
        the payload carrying its new number. Returns how many batches moved.
        """
        with self._connection("renumber") as db, _transaction(db):
            (next_seq,) = db.execute("SELECT next_seq FROM meta").fetchone()
            if first_seq < next_seq:
                raise SpoolError(
                    f"cannot renumber spool {self.path} from {first_seq}: "
                    f"numbers up to {next_seq - 1} are used"
                )
            rows = db.execute("SELECT seq, payload FROM batches ORDER BY seq").fetchall()
            # New numbers are all above the old ones, so moving in descending order never collides.
            moves = [(old, first_seq + i, payload) for i, (old, payload) in enumerate(rows)]
            for old, new, payload in reversed(moves):
                patched = patch(payload, new)
                db.execute(
                    "UPDATE batches SET seq = ?, payload = ?, bytes = ? WHERE seq = ?",
                    (new, patched, len(patched), old),
                )
            (stored,) = db.execute("SELECT coalesce(sum(bytes), 0) FROM batches").fetchone()
            db.execute("UPDATE meta SET next_seq = ?, stored_bytes = ?", (first_seq + len(rows), stored))
        return len(rows)

    def _evict(self, db: sqlite3.Connection, needed: int) -> int:
        """Delete the oldest batches until at least ``needed`` bytes are free; record them as dropped."""
        freed = batches = facts = 0
        first_seq = last_seq = from_ms = to_ms = 0
        cursor = db.execute("SELECT seq, bytes, facts, first_ms, last_ms FROM batches ORDER BY seq")
        for seq, size, batch_facts, batch_first_ms, batch_last_ms in cursor:
            if batches == 0:
                first_seq, from_ms, to_ms = seq, batch_first_ms, batch_last_ms
            last_seq = seq
            from_ms = min(from_ms, batch_first_ms)
            to_ms = max(to_ms, batch_last_ms)
            batches += 1
            facts += batch_facts
            freed += size
            if freed >= needed:
                break
        cursor.close()
        if batches == 0:
            return 0
        db.execute("DELETE FROM batches WHERE seq <= ?", (last_seq,))
        db.execute(
            "UPDATE meta SET dropped_batches_total = dropped_batches_total + ?, "
            "dropped_facts_total = dropped_facts_total + ?",
            (batches, facts),
        )
        # Merge into the newest record unless a caller may hold it: bounds the table to one row
        # per take_drop_report() while the collector is out of reach.
        newest = db.execute("SELECT max(id) FROM unreported_drops").fetchone()[0]
        if newest is not None and newest > self._drops_handed_out:
            db.execute(
                "UPDATE unreported_drops SET batches = batches + ?, facts = facts + ?, last_seq = ?, "
                "from_ms = min(from_ms, ?), to_ms = max(to_ms, ?) WHERE id = ?",
                (batches, facts, last_seq, from_ms, to_ms, newest),
            )
        else:
            db.execute(
                "INSERT INTO unreported_drops (batches, facts, first_seq, last_seq, from_ms, to_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batches, facts, first_seq, last_seq, from_ms, to_ms),
            )
        return freed

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[SpooledBatch]:
        """Up to ``limit`` stored batches numbered above ``after_seq``, lowest first."""
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        with self._connection("read") as db:
            rows = db.execute(
                "SELECT seq, payload, facts, first_ms, last_ms, created_ms FROM batches "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpooledBatch(*row) for row in rows]

    def acknowledge(self, seq: int) -> int:
        """Delete every batch numbered ``seq`` or lower (the collector committed them); return how many."""
        return self._delete("acknowledge in", "seq <= ?", seq)

    def discard(self, seq: int) -> bool:
        """Delete exactly batch ``seq`` (the collector rejected it as invalid); return if it was there."""
        return self._delete("discard from", "seq = ?", seq) > 0

    def _delete(self, action: str, where: str, seq: int) -> int:
        with self._connection(action) as db, _transaction(db):
            count, size = db.execute(
                f"SELECT count(*), coalesce(sum(bytes), 0) FROM batches WHERE {where}", (seq,)
            ).fetchone()
            if count:
                db.execute(f"DELETE FROM batches WHERE {where}", (seq,))
                db.execute("UPDATE meta SET stored_bytes = stored_bytes - ?", (size,))
        return int(count)

    def stats(self) -> SpoolStats:
        with self._connection("read") as db:
            row = db.execute(
                "SELECT (SELECT count(*) FROM batches), stored_bytes, "
                "(SELECT min(seq) FROM batches), (SELECT max(seq) FROM batches), "
                "next_seq, dropped_batches_total, dropped_facts_total FROM meta"
            ).fetchone()
        return SpoolStats(*row)

    def take_drop_report(self) -> DropReport | None:
        """Everything evicted and not yet confirmed as reported, or None; clears nothing.

        Report it to the collector, then call clear_drop_report() with it. A crash in between
        means the same drops are reported again, never that they go unreported.
        """
        with self._connection("read") as db:
            row = db.execute(
                "SELECT max(id), sum(batches), sum(facts), min(first_seq), max(last_seq), "
                "min(from_ms), max(to_ms) FROM unreported_drops"
            ).fetchone()
            newest, *totals = row
            if newest is None:
                return None
            self._drops_handed_out = max(self._drops_handed_out, newest)
        return DropReport(*totals)

    def clear_drop_report(self, report: DropReport) -> None:
        """Forget the drops ``report`` covers, keeping any evicted after it was taken; durable."""
        with self._connection("clear drops in") as db, _transaction(db):
            # Eviction takes the oldest batches, so later drops all have higher numbers.
            db.execute("DELETE FROM unreported_drops WHERE last_seq <= ?", (report.last_seq,))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            # A failing rollback must not hide the error that caused it.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    with _transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > len(_MIGRATIONS):
            raise SpoolError(
                f"spool {path} has schema version {version}, newer than this agent knows "
                f"({len(_MIGRATIONS)}); upgrade zonewatch"
            )
        for _name, statements in _MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        # PRAGMA cannot take parameters; the value is our own integer.
        db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

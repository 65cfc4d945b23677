"""Retention: exact per-minute and per-hour rollups of the raw facts, and pruning by age.

Maintenance runs in the writer process (store/process.py, request "maintain"), the
only writer, so it never runs during a commit. Each call does a bounded amount of
work, so a group commit queued behind it waits for one short step, not a catch-up.

Counting. Every raw row is added to its minute and its hour rollup exactly once.
Raw ids only grow (the writer numbers samples on from the highest; zone_traffic's
INTEGER PRIMARY KEY is the highest plus one), so retention_state.rolled_id splits
the rows into counted (id <= rolled_id) and not yet counted, whenever they arrived.
The rollups and the cursor change in the same transaction. A late batch, minutes
or days late (an agent that was offline replays its spool), is added to the
buckets already there. Two other schemes look simpler but are wrong: a cursor over
batches.received_ms misses batches that were received before it but committed
after it, because received_ms is stamped before the commit. Rolling a bucket again
from its raw rows fails once those rows have been pruned. The grace period decides
only the watermark, the time up to which a reader may take the rollups as final.

Pruning never deletes a row that is not counted yet. Every batches row stays,
because (agent, seq) is the idempotency key; only its sample range is forgotten.
Each pruning step records how far it went (retention_horizons), in the transaction
that deletes.

Reading. So a reader can answer for any range exactly (read_plan): the rollups hold
exactly the raw rows with id <= rolled_id, and pruning deletes only those. For a split
time T aligned to a tier's buckets, "the tier's buckets before T, plus the raw rows
before T with id > rolled_id, plus every raw row from T on" counts each row once,
whatever was pruned or arrived late, as long as nothing from T on was pruned: T is
the recorded horizon rounded up to the tier's buckets.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from collector.errors import CollectorError, StoreError
from collector.model import SAMPLE_COLUMNS
from collector.store.sql import transaction

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# A sum that does not fit SQLite's integers is held at the largest one: only absurd
# counters get there (2**63 bytes is 8 EiB), and one bad agent must not stop retention.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class RetentionPolicy:
    # Raw interface samples, zone traffic and flows are kept this long (by the facts' own time).
    raw_hours: int = 48
    # Per-minute rollups are kept this long.
    minute_days: int = 30
    # Per-hour rollups are kept this long.
    hour_days: int = 365
    # A bucket counts as rolled up (the watermark passes it) this long after it ended:
    # time for batches in flight. Later rows are still added when they come.
    grace_ms: int = 120_000

    def __post_init__(self) -> None:
        for name in ("raw_hours", "minute_days", "hour_days"):
            if getattr(self, name) < 1:
                raise CollectorError(f"retention {name} must be at least 1, got {getattr(self, name)}")
        if self.grace_ms < 0:
            raise CollectorError(f"retention grace_ms must not be negative, got {self.grace_ms}")


class MaintenanceReport(NamedTuple):
    """What one step did. rows_done is the work that budget_rows bounds."""

    rolled_samples: int
    rolled_zone_rows: int
    pruned_samples: int
    pruned_batches: int  # batches whose sample range was released (the rows stay)
    pruned_zone_rows: int
    pruned_flow_rows: int
    pruned_minute_rollups: int
    pruned_hour_rollups: int
    # Rollup rows whose sums reached INT64_MAX and were held there.
    saturated: int
    # False when the budget ran out with work left: call again soon.
    done: bool

    @property
    def rows_done(self) -> int:
        return (
            self.rolled_samples
            + self.rolled_zone_rows
            + self.pruned_samples
            + self.pruned_zone_rows
            + self.pruned_flow_rows
            + self.pruned_minute_rollups
            + self.pruned_hour_rollups
        )


class _Source(NamedTuple):
    """A raw table and the rollup table it is summed into."""

    table: str
    rollups: str
    # Rollup key columns besides resolution_ms and bucket_ms, copied from the raw row.
    keys: tuple[str, ...]
    # (rollup column, raw expression): summed.
    sums: tuple[tuple[str, str], ...]
    # (rollup column, raw expression): their maximum.
    peaks: tuple[tuple[str, str], ...]


def scaled(column: str) -> str:
    """SQL: a zone_traffic count as the estimated total, per row and rounded (a sampled
    capture saw sampling_rate of the packets). The traffic view reads raw rows so too,
    so a row counts the same before and after it is rolled up."""
    return (
        f"CASE WHEN sampling_rate = 1.0 THEN {column}"
        f" ELSE CAST(round({column} / sampling_rate) AS INTEGER) END"
    )


_COUNTERS = SAMPLE_COLUMNS[2:10]  # rx/tx bytes, packets, errors, drops
INTERFACES = _Source(
    "interface_samples",
    "interface_rollups",
    ("agent", "series"),
    (
        ("samples", "1"),
        *((c, c) for c in _COUNTERS),
        ("interval_ms", "interval_ms"),
        ("counter_resets", "counter_reset != 0"),
    ),
    (("peak_rx_bps", "rx_bps"), ("peak_tx_bps", "tx_bps"), ("speed_bps", "speed_bps")),
)
ZONES = _Source(
    "zone_traffic",
    "zone_rollups",
    ("agent", "zone"),
    (
        *((c, scaled(c)) for c in ("bytes_in", "bytes_out", "packets_in", "packets_out")),
        ("window_ms", "window_ms"),
    ),
    (),
)
SOURCES = (INTERFACES, ZONES)
_TIERS = {MINUTE_MS: "minute", HOUR_MS: "hour"}


class _Sql:
    """The statements of one source, built once from its description."""

    def __init__(self, src: _Source) -> None:
        keys = ", ".join(src.keys)
        exprs = [e for _, e in src.sums] + [e for _, e in src.peaks]
        aggregates = [f"sum({e})" for _, e in src.sums] + [f"max({e})" for _, e in src.peaks]
        bucket = f"time_ms - time_ms % {MINUTE_MS}"
        # (keys..., minute bucket, rows, sums..., peaks...) per group of the id range.
        self.minutes = (
            f"SELECT {keys}, {bucket} AS bucket, count(*), {', '.join(aggregates)}"
            f" FROM {src.table} WHERE id BETWEEN ? AND ? GROUP BY {keys}, bucket"
        )
        # The same, one row per raw row: for when an integer sum overflows in SQL.
        self.rows = (
            f"SELECT {keys}, {bucket}, 1, {', '.join(exprs)} FROM {src.table} WHERE id BETWEEN ? AND ?"
        )
        sum_columns = [c for c, _ in src.sums]
        peak_columns = [c for c, _ in src.peaks]
        columns = ["resolution_ms", *src.keys, "bucket_ms", *sum_columns, *peak_columns]
        updates = [f"{c} = min({c} + excluded.{c}, {INT64_MAX})" for c in sum_columns] + [
            f"{c} = max({c}, excluded.{c})" for c in peak_columns
        ]
        self.upsert = (
            f"INSERT INTO {src.rollups} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (resolution_ms, {keys}, bucket_ms) DO UPDATE SET {', '.join(updates)}"
        )
        # The oldest rollup rows of a tier, a bounded batch at a time (by primary key); and
        # the newest bucket among them (the same whichever of equal buckets the LIMIT takes).
        oldest = (
            f" FROM {src.rollups} WHERE resolution_ms = :resolution AND bucket_ms <= :before"
            " ORDER BY bucket_ms LIMIT :limit"
        )
        self.prune_rollups = (
            f"DELETE FROM {src.rollups} WHERE (resolution_ms, {keys}, bucket_ms) IN"
            f" (SELECT resolution_ms, {keys}, bucket_ms{oldest})"
        )
        self.newest_pruned_bucket = f"SELECT max(bucket_ms) FROM (SELECT bucket_ms{oldest})"
        self.key_count = len(src.keys)
        self.sum_count = len(src.sums)


_SQL = {src.table: _Sql(src) for src in SOURCES}


class Maintenance:
    """Rolls up and prunes the database in bounded steps; see the module docstring."""

    def __init__(self, db: sqlite3.Connection, policy: RetentionPolicy | None = None) -> None:
        self._db = db
        self.policy = policy or RetentionPolicy()

    def run_step(self, now_ms: int, budget_rows: int = 50_000) -> MaintenanceReport:
        """Do at most about budget_rows rows of work, each part in its own short transaction.

        In order: count the raw rows not counted yet (interface samples, then zone
        traffic); prune raw facts older than raw_hours, minute rollups older than
        minute_days, hour rollups older than hour_days. Rows read to roll up and rows
        deleted count against the budget; a batch's samples are pruned together, so one
        batch larger than what is left of the budget may go over it (by at most one
        batch: 20,000 samples).
        """
        if budget_rows < 1:
            raise CollectorError(f"budget_rows must be at least 1, got {budget_rows}")
        policy = self.policy
        counts = dict.fromkeys(MaintenanceReport._fields[:-1], 0)
        left = budget_rows
        done = True

        def part(name: str, work: Callable[[int], tuple[int, bool]]) -> None:
            nonlocal left, done
            if left <= 0:
                done = False
                return
            rows, finished = work(left)
            counts[name] += rows
            left -= rows
            done = done and finished

        raw_before = now_ms - policy.raw_hours * HOUR_MS
        try:
            part("rolled_samples", lambda budget: self._roll(INTERFACES, now_ms, budget, counts))
            part("rolled_zone_rows", lambda budget: self._roll(ZONES, now_ms, budget, counts))
            part("pruned_samples", lambda budget: self._prune_samples(raw_before, budget, counts))
            part("pruned_zone_rows", lambda budget: self._prune_zone_traffic(raw_before, budget))
            part("pruned_flow_rows", lambda budget: self._prune_flows(raw_before, budget))
            for resolution, keep_days, name in (
                (MINUTE_MS, policy.minute_days, "pruned_minute_rollups"),
                (HOUR_MS, policy.hour_days, "pruned_hour_rollups"),
            ):
                before_ms = now_ms - keep_days * DAY_MS
                for src in SOURCES:
                    part(name, partial(self._prune_rollups, src, resolution, before_ms))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot maintain the database (rollups and retention): {exc}") from exc
        return MaintenanceReport(**counts, done=done)

    # --- rollups ------------------------------------------------------------------------------

    def _roll(self, src: _Source, now_ms: int, budget: int, counts: dict[str, int]) -> tuple[int, bool]:
        """Count up to budget raw rows after the cursor; (rows, caught up)."""
        db = self._db
        sql = _SQL[src.table]
        with transaction(db):
            rolled = self._rolled_id(src)
            first, top = db.execute(
                f"SELECT (SELECT min(id) FROM {src.table} WHERE id > ?), (SELECT max(id) FROM {src.table})",
                (rolled,),
            ).fetchone()
            if first is None:
                self._advance(src, rolled, now_ms)
                return 0, True
            last = min(first + budget - 1, top)
            try:
                minutes = db.execute(sql.minutes, (first, last)).fetchall()
            except sqlite3.OperationalError as exc:
                if "integer overflow" not in str(exc):
                    raise
                minutes = _fold(db.execute(sql.rows, (first, last)), sql, MINUTE_MS)
            hours = _fold(minutes, sql, HOUR_MS)
            for resolution, groups in ((MINUTE_MS, minutes), (HOUR_MS, hours)):
                rows, saturated = _upsert_rows(groups, sql, resolution)
                db.executemany(sql.upsert, rows)
                counts["saturated"] += saturated
            caught_up = last == top
            self._advance(src, last, now_ms if caught_up else None)
        return sum(group[sql.key_count + 1] for group in minutes), caught_up

    def _rolled_id(self, src: _Source) -> int:
        (rolled,) = self._db.execute(
            "SELECT rolled_id FROM retention_state WHERE source = ? AND resolution_ms = ?",
            (src.table, MINUTE_MS),
        ).fetchone()
        return int(rolled)

    def _advance(self, src: _Source, rolled_id: int, caught_up_ms: int | None) -> None:
        """Move the cursor; when every committed row is counted (at caught_up_ms), the watermarks
        too: to the end of the last bucket that ended a grace period before."""
        complete_ms = -1 if caught_up_ms is None else caught_up_ms - self.policy.grace_ms
        self._db.executemany(
            "UPDATE retention_state SET rolled_id = :rolled, watermark_ms = max(watermark_ms, :watermark)"
            " WHERE source = :source AND resolution_ms = :resolution"
            " AND (rolled_id != :rolled OR watermark_ms < :watermark)",
            [
                {"rolled": rolled_id, "watermark": complete_ms // r * r, "source": src.table, "resolution": r}
                for r in (MINUTE_MS, HOUR_MS)
            ],
        )

    # --- pruning ------------------------------------------------------------------------------

    def _prune_samples(self, before_ms: int, budget: int, counts: dict[str, int]) -> tuple[int, bool]:
        """Delete the samples of batches wholly older than before_ms; (samples, all done)."""
        db = self._db
        with transaction(db):
            found = db.execute(
                "SELECT agent, seq, first_sample, last_sample, last_ms FROM batches"
                " WHERE first_sample IS NOT NULL AND last_ms < ? AND last_sample <= ?"
                " ORDER BY last_ms LIMIT ?",
                (before_ms, self._rolled_id(INTERFACES), budget),
            ).fetchall()
            taken: list[tuple[int, int, int, int, int]] = []
            size = 0
            for batch in found:
                grown = size + batch[3] - batch[2] + 1
                if taken and grown > budget:
                    break
                taken.append(batch)
                size = grown
            if not taken:
                return 0, True
            deleted = db.executemany(
                "DELETE FROM interface_samples WHERE id BETWEEN ? AND ?",
                [(f, last) for _, _, f, last, _ in taken],
            ).rowcount
            db.executemany(
                "UPDATE batches SET first_sample = NULL, last_sample = NULL WHERE agent = ? AND seq = ?",
                [(agent, seq) for agent, seq, _, _, _ in taken],
            )
            self._keep_cursor_below_new_ids(INTERFACES)
            # A batch holds no fact later than its last_ms.
            self._record_horizon(INTERFACES, "raw", max(batch[4] for batch in taken) + 1)
        counts["pruned_batches"] += len(taken)
        return deleted, len(taken) == len(found) < budget

    def _prune_zone_traffic(self, before_ms: int, budget: int) -> tuple[int, bool]:
        db = self._db
        oldest = " FROM zone_traffic WHERE time_ms < ? AND id <= ? ORDER BY time_ms LIMIT ?"
        with transaction(db):
            params = (before_ms, self._rolled_id(ZONES), budget)
            # The newest of the rows about to go: the same whichever of equal times the LIMIT takes.
            (newest,) = db.execute(f"SELECT max(time_ms) FROM (SELECT time_ms{oldest})", params).fetchone()
            if newest is None:
                return 0, True
            deleted = db.execute(f"DELETE FROM zone_traffic WHERE id IN (SELECT id{oldest})", params).rowcount
            self._keep_cursor_below_new_ids(ZONES)
            # The migration cursor too: ids above the highest row left will be handed out again.
            db.execute(
                "UPDATE migration_cursor SET last_id = min(last_id, (SELECT coalesce(max(id), 0)"
                " FROM zone_traffic)) WHERE source = 'zone_traffic'"
            )
            self._record_horizon(ZONES, "raw", newest + 1)
        return deleted, deleted < budget

    def _prune_flows(self, before_ms: int, budget: int) -> tuple[int, bool]:
        """Flows have no rollups: delete the oldest raw rows, a bounded batch at a time."""
        with transaction(self._db):
            deleted = self._db.execute(
                "DELETE FROM flows WHERE id IN"
                " (SELECT id FROM flows WHERE time_ms < ? ORDER BY time_ms LIMIT ?)",
                (before_ms, budget),
            ).rowcount
        return deleted, deleted < budget

    def _keep_cursor_below_new_ids(self, src: _Source) -> None:
        """After deleting the newest rows, the next id is the highest left plus one, which
        may be at or below the cursor: lower it to that row (nothing between was kept)."""
        self._db.execute(
            "UPDATE retention_state"
            f" SET rolled_id = min(rolled_id, coalesce((SELECT max(id) FROM {src.table}), 0))"
            " WHERE source = ?",
            (src.table,),
        )

    def _prune_rollups(self, src: _Source, resolution: int, before_ms: int, budget: int) -> tuple[int, bool]:
        """Delete rollup buckets that ended before before_ms, oldest first."""
        sql = _SQL[src.table]
        params = {"resolution": resolution, "before": before_ms - resolution, "limit": budget}
        with transaction(self._db):
            (newest,) = self._db.execute(sql.newest_pruned_bucket, params).fetchone()
            if newest is None:
                return 0, True
            deleted = self._db.execute(sql.prune_rollups, params).rowcount
            self._record_horizon(src, _TIERS[resolution], newest + resolution)
        return deleted, deleted < budget

    def _record_horizon(self, src: _Source, tier: str, pruned_before_ms: int) -> None:
        """Everything of the tier deleted so far lies before pruned_before_ms (it never goes back)."""
        self._db.execute(
            "UPDATE retention_horizons SET pruned_before_ms = max(pruned_before_ms, ?)"
            " WHERE source = ? AND tier = ?",
            (pruned_before_ms, src.table, tier),
        )


# --- reading across the tiers ------------------------------------------------------------------

RAW = 0  # the resolution_ms of a Span read from the raw rows alone


class Span(NamedTuple):
    """A part [since_ms, until_ms) of a query's range and the tier that answers for it."""

    # RAW: every raw row in it. MINUTE_MS or HOUR_MS: the tier's buckets that start in it, and
    # the raw rows in it with id > ReadPlan.rolled_id (in no bucket yet). Both bounds are then
    # multiples of it: a bucket is read whole or not at all.
    resolution_ms: int
    since_ms: int
    until_ms: int


class ReadPlan(NamedTuple):
    """Where to read a range from so that every raw row in it counts once, pruned or not."""

    rolled_id: int  # the source's raw rows with a higher id are in no rollup yet
    spans: tuple[Span, ...]  # oldest first, none empty; each starts where the one before ended

    @property
    def resolution_ms(self) -> int:
        """The coarsest tier read: RAW when the range lies wholly within the raw horizon."""
        return max((span.resolution_ms for span in self.spans), default=RAW)


def read_plan(db: sqlite3.Connection, src: _Source, since_ms: int, until_ms: int) -> ReadPlan:
    """How to read src's facts in [since_ms, until_ms): raw rows where none were pruned, before
    that the minute rollups, and where those were pruned too the hour rollups.

    The raw rows from the raw horizon (rounded up to a minute) on, the minute buckets from the
    minute tier's horizon (rounded up to an hour) on, the hour buckets before that. With nothing
    pruned there is one RAW span, the range itself: the raw rows, as if there were no rollups.
    Where rollups are read the range is taken in whole buckets: a bucket counts when it starts
    in the range, so one that starts before since_ms is left out. Read the plan and the rows
    in one transaction: the rollups, the cursor and the horizons change together.
    """
    table = src.table
    horizons = dict(
        db.execute("SELECT tier, pruned_before_ms FROM retention_horizons WHERE source = ?", (table,))
    )
    (rolled,) = db.execute(
        "SELECT rolled_id FROM retention_state WHERE source = ? AND resolution_ms = ?", (table, MINUTE_MS)
    ).fetchone()
    hour_split = _round_up(horizons["minute"], HOUR_MS)
    raw_split = max(_round_up(horizons["raw"], MINUTE_MS), hour_split)
    since_ms = max(since_ms, 0)  # no fact is older (validation): no span before the epoch
    spans = (
        Span(HOUR_MS, _round_up(since_ms, HOUR_MS), min(_round_up(until_ms, HOUR_MS), hour_split)),
        Span(
            MINUTE_MS,
            max(_round_up(since_ms, MINUTE_MS), hour_split),
            min(_round_up(until_ms, MINUTE_MS), raw_split),
        ),
        Span(RAW, max(since_ms, raw_split), until_ms),
    )
    return ReadPlan(int(rolled), tuple(span for span in spans if span.since_ms < span.until_ms))


def _round_up(time_ms: int, resolution: int) -> int:
    return -(-time_ms // resolution) * resolution


def _fold(groups: Iterable[Sequence[Any]], sql: _Sql, resolution: int) -> list[tuple[Any, ...]]:
    """Groups (keys..., bucket, rows, sums..., peaks...) merged into buckets of resolution.

    Python integers do not overflow: the sums are exact, held at INT64_MAX only when stored.
    """
    keys, sums = sql.key_count, sql.sum_count
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for group in groups:
        bucket = group[keys] - group[keys] % resolution
        key = (*group[:keys], bucket)
        into = merged.get(key)
        if into is None:
            merged[key] = [*group[keys + 1 :]]
            continue
        for i, value in enumerate(group[keys + 1 :]):
            into[i] = into[i] + value if i <= sums else max(into[i], value)
    return [(*key, *values) for key, values in merged.items()]


def _upsert_rows(
    groups: list[tuple[Any, ...]], sql: _Sql, resolution: int
) -> tuple[list[tuple[Any, ...]], int]:
    """Rows for sql.upsert (the row count dropped); (rows, how many had a sum held at INT64_MAX)."""
    keys, sums = sql.key_count, sql.sum_count
    rows = []
    saturated = 0
    for group in groups:
        values = group[keys + 2 : keys + 2 + sums]
        if max(values, default=0) > INT64_MAX:
            values = tuple(min(v, INT64_MAX) for v in values)
            saturated += 1
        rows.append((resolution, *group[: keys + 1], *values, *group[keys + 2 + sums :]))
    return rows, saturated

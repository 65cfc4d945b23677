"""What each retention tier holds: the `retention` command's view (read-only).

The tiers themselves, and how rows move between them, are store/retention.py's.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from collector.errors import StoreError
from collector.store.retention import HOUR_MS, INTERFACES, MINUTE_MS, ZONES


class TierStatus(NamedTuple):
    data: str  # "interface" (samples) or "zone" (traffic)
    tier: str  # "raw", "minute" or "hour"
    rows: int
    # Raw interface samples: the time range of the batches holding them; zone traffic:
    # of its rows; rollups: the start of the oldest and of the newest bucket.
    oldest_ms: int | None
    newest_ms: int | None
    # Rollups: every bucket ending at or before this is rolled up; None for raw data.
    watermark_ms: int | None
    # Raw data: rows not counted in the rollups yet; None for rollups.
    pending: int | None


def retention_status(db: sqlite3.Connection) -> list[TierStatus]:
    """Per data kind and tier: rows, time range, watermark (and for raw data, rows not rolled up)."""
    rows: list[TierStatus] = []
    try:
        for src, data in ((INTERFACES, "interface"), (ZONES, "zone")):
            state = {
                resolution: (rolled, watermark)
                for resolution, rolled, watermark in db.execute(
                    "SELECT resolution_ms, rolled_id, watermark_ms FROM retention_state WHERE source = ?",
                    (src.table,),
                )
            }
            rolled = state[MINUTE_MS][0]
            if src is INTERFACES:
                count, oldest, newest = db.execute(
                    "SELECT coalesce(sum(last_sample - first_sample + 1), 0), min(first_ms), max(last_ms)"
                    " FROM batches WHERE first_sample IS NOT NULL"
                ).fetchone()
            else:
                count, oldest, newest = db.execute(
                    "SELECT count(*), min(time_ms), max(time_ms) FROM zone_traffic"
                ).fetchone()
            (pending,) = db.execute(f"SELECT count(*) FROM {src.table} WHERE id > ?", (rolled,)).fetchone()
            rows.append(TierStatus(data, "raw", count, oldest, newest, None, pending))
            for resolution, tier in ((MINUTE_MS, "minute"), (HOUR_MS, "hour")):
                count, oldest, newest = db.execute(
                    f"SELECT count(*), min(bucket_ms), max(bucket_ms) FROM {src.rollups}"
                    " WHERE resolution_ms = ?",
                    (resolution,),
                ).fetchone()
                watermark = state[resolution][1]
                rows.append(TierStatus(data, tier, count, oldest, newest, watermark or None, None))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the retention state: {exc}") from exc
    return rows

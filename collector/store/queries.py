"""Read-only queries operators run through the CLI.

Every function takes the connection first and returns typed rows; sqlite3 errors
become StoreError here, an operator's mistake (unknown agent, ...) a QueryError.
"""

from __future__ import annotations

import json
import sqlite3
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError
from collector.model import MAX_BATCH_SPAN_MS
from collector.store.retention import INTERFACES, RAW, ReadPlan, read_plan
from collector.store.sql import translated

# An agent id prefix shorter than this matches too much to be a useful handle.
MIN_PREFIX = 4
# How many candidates an ambiguity message names before it says "and N more".
_SHOWN_CANDIDATES = 5


class AgentRow(NamedTuple):
    agent_id: str
    hostname: str
    department: str
    county: str
    site: str
    role: str
    agent_version: str
    policy_version: str
    first_seen_ms: int
    last_seen_ms: int
    last_seq: int
    clock_skew_ms: int
    status: str  # "online", "stale" or "offline"
    cpu_percent: float = 0.0  # the agent's own CPU, % of a core, at its last health report
    rss_bytes: int = 0
    # Sensors that are not simply "on", with why: "zone_accounting: off: nft: not installed".
    sensors: str = ""


class BandwidthRow(NamedTuple):
    """Figures of one interface; where bucket_ms is not 0, as bandwidth() says."""

    hostname: str
    agent_id: str
    department: str
    county: str
    interface: str
    samples: int
    current_rx_bps: float  # of the latest sample in range
    current_tx_bps: float
    avg_rx_bps: float  # byte-weighted: bits counted / time covered
    avg_tx_bps: float
    p95_rx_bps: float  # nearest-rank 95th percentile of the per-sample rates
    p95_tx_bps: float
    peak_rx_bps: float
    peak_tx_bps: float
    speed_bps: int  # of the latest sample; 0 when the kernel does not know
    utilization_p95: float | None  # fraction of speed; None when no sample had a known speed
    utilization_peak: float | None
    total_rx_bytes: int
    total_tx_bytes: int
    counter_resets: int
    last_ms: int
    # 0: the rates are per sample. Else the range reaches back past the raw samples kept, and
    # p95, current rates and utilization are averages over buckets of this length.
    bucket_ms: int = 0


@contextmanager
def snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """Run several SELECTs against one consistent view, even while the writer commits."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN")
    try:
        yield
    finally:
        # Nothing was written: ending the read transaction either way is the same.
        if db.in_transaction:
            db.execute("ROLLBACK")


def agent_status(now_ms: int, last_seen_ms: int, stale_after_ms: int, offline_after_ms: int) -> str:
    silent_ms = now_ms - last_seen_ms
    if silent_ms <= stale_after_ms:
        return "online"
    if silent_ms <= offline_after_ms:
        return "stale"
    return "offline"


def list_agents(
    db: sqlite3.Connection, now_ms: int, stale_after_ms: int, offline_after_ms: int
) -> list[AgentRow]:
    """Every enrolled agent with its status, by department, county and hostname."""
    with translated("list agents"):
        rows = db.execute(
            "SELECT agent_id, hostname, department, county, site, role, agent_version,"
            " policy_version, first_seen_ms, last_seen_ms, last_seq, clock_skew_ms,"
            " cpu_percent, rss_bytes, sensors"
            " FROM agents ORDER BY department, county, hostname, agent_id"
        ).fetchall()
    return [
        AgentRow._make(
            (
                *row[:12],
                agent_status(now_ms, row[9], stale_after_ms, offline_after_ms),
                row[12],
                row[13],
                sensor_problems(row[14]),
            )
        )
        for row in rows
    ]


def sensor_problems(sensors_json: str) -> str:
    """The sensors an operator should look at: every one not reported as plainly "on"."""
    try:
        sensors = json.loads(sensors_json or "{}")
    except ValueError:
        return ""
    return "; ".join(
        f"{name}: {status}" for name, status in sorted(sensors.items()) if not str(status).startswith("on")
    )


def resolve_agent(db: sqlite3.Connection, text: str) -> int:
    """agents.id of the agent named by its id, a unique id prefix or its hostname.

    An exact agent id wins, then an exact hostname (case-insensitive, as in DNS),
    then an id prefix of at least MIN_PREFIX characters.
    """
    handle = text.strip()
    with translated("look up agent"):
        exact = db.execute("SELECT id FROM agents WHERE agent_id = ?", (handle,)).fetchone()
        if exact is not None:
            return int(exact[0])
        candidates = db.execute(
            "SELECT id, agent_id, hostname FROM agents WHERE hostname = ? COLLATE NOCASE ORDER BY agent_id",
            (handle,),
        ).fetchall()
        total = len(candidates)
        if not candidates and len(handle) >= MIN_PREFIX:
            # Ids sharing a prefix sort together right after the prefix itself, so
            # one index range read finds them (one more than we show proves there are more).
            following = db.execute(
                "SELECT id, agent_id, hostname FROM agents WHERE agent_id >= ? ORDER BY agent_id LIMIT ?",
                (handle, _SHOWN_CANDIDATES + 1),
            ).fetchall()
            candidates = [row for row in following if row[1].startswith(handle)]
            total = len(candidates)
            if total > _SHOWN_CANDIDATES:
                (total,) = db.execute(
                    "SELECT count(*) FROM agents WHERE agent_id >= ? AND substr(agent_id, 1, ?) = ?",
                    (handle, len(handle), handle),
                ).fetchone()
    if total == 0:
        raise QueryError(f"unknown agent {text!r}")
    if total == 1:
        return int(candidates[0][0])
    shown = ", ".join(f"{agent_id} ({hostname})" for _, agent_id, hostname in candidates[:_SHOWN_CANDIDATES])
    more = f" and {total - _SHOWN_CANDIDATES} more" if total > _SHOWN_CANDIDATES else ""
    raise QueryError(
        f"agent {text!r} is ambiguous, it matches {total} agents: {shown}{more}; use the agent id"
    )


# An agent's samples in range, located through its batches: batches_by_time
# (agent, last_ms) yields the batches that can hold samples in range, and each
# batch's samples are one rowid range of interface_samples (first_sample to
# last_sample). A rejected batch has NULL times and is never matched. A batch's
# facts span at most MAX_BATCH_SPAN_MS (validation enforces it), so a batch that
# starts before :until ends before :until + span: the index range is bounded on
# both sides, and a window far in the past does not walk every later batch.
_IN_RANGE = (
    " FROM batches AS b"
    " JOIN interface_samples AS s ON s.id BETWEEN b.first_sample AND b.last_sample"
    " WHERE b.agent = :agent AND b.last_ms >= :since AND b.last_ms < :until + :span"
    " AND b.first_ms < :until"
    " AND s.time_ms >= :since AND s.time_ms < :until"
)
# Only what the figures need is fetched (each value a fetch returns costs more than
# finding it): the utilization only where the link speed is known, and no time or
# speed, which only the latest sample needs (_LATEST). Any order: the figures
# do not depend on it.
_SCAN = (
    "SELECT s.series, s.rx_bytes, s.tx_bytes, s.interval_ms, s.rx_bps, s.tx_bps,"
    " CASE WHEN s.speed_bps > 0 THEN s.utilization END, s.counter_reset" + _IN_RANGE
)
# One series' samples, newest batch first (batches_by_time read backwards: no sort).
_LATEST = (
    "SELECT b.last_ms, s.time_ms, s.id, s.rx_bps, s.tx_bps, s.speed_bps"
    + _IN_RANGE
    + " AND s.series = :series ORDER BY b.last_ms DESC"
)


# Where the rollups answer (bucketed figures): each sample in range with its time and speed.
_SCAN_TIMED = (
    "SELECT s.series, s.time_ms, s.rx_bytes, s.tx_bytes, s.interval_ms, s.rx_bps, s.tx_bps,"
    " s.speed_bps, s.utilization, s.counter_reset" + _IN_RANGE
)
# Samples in no rollup yet (ids above the cursor: a short rowid range), in a span of the rollups.
_PENDING = (
    "SELECT series, time_ms, rx_bytes, tx_bytes, interval_ms, rx_bps, tx_bps, speed_bps, utilization,"
    " counter_reset FROM interface_samples"
    " WHERE id > :rolled AND agent = :agent AND time_ms >= :since AND time_ms < :until"
)
_ROLLUPS = (
    "SELECT series, bucket_ms, samples, rx_bytes, tx_bytes, interval_ms, peak_rx_bps, peak_tx_bps,"
    " speed_bps, counter_resets FROM interface_rollups"
    " WHERE resolution_ms = :resolution AND agent = :agent AND bucket_ms >= :since AND bucket_ms < :until"
)


class _Agent(NamedTuple):
    id: int
    agent_id: str
    hostname: str
    department: str
    county: str


def bandwidth(
    db: sqlite3.Connection,
    *,
    since_ms: int,
    until_ms: int,
    agent: int | None = None,
    interface: str | None = None,
    top: int | None = None,
) -> list[BandwidthRow]:
    """Traffic per (agent, interface) over samples with since_ms <= time_ms < until_ms.

    Busiest first (by the larger of the two p95 rates); ``top`` keeps that many rows.

    Where the range reaches back past the raw samples kept, the per-minute or per-hour
    rollups answer for that part (store/retention.py, read_plan), taken in whole buckets
    (one that starts before since_ms is left out), and the row's bucket_ms is the coarsest
    tier read. Then, with every sample in range in a bucket of that length:

    - samples, total_*_bytes, counter_resets: exact, as from the samples themselves;
    - avg_*_bps: exact, bits counted over the sum of the samples' intervals;
    - p95_*_bps: nearest-rank p95 of the buckets' average rates (their bits over the sum
      of their samples' intervals), over the buckets that have samples;
    - peak_*_bps: the highest per-sample rate, exact (each bucket keeps its peak);
    - speed_bps: a bucket's is the highest link speed its samples reported (0: unknown;
      buckets rolled up before the collector stored it do not know it);
    - utilization_p95: p95 of max(rx, tx average) / speed over the buckets with a known
      speed; utilization_peak: the highest max(rx, tx peak) / speed of those buckets;
    - current_*_bps, speed_bps, last_ms: of the latest sample, as without rollups, when the
      series has samples in the part of the range the raw samples answer for; else the last
      bucket's average rates and speed, and its start.
    """
    if top is not None and top < 1:
        raise QueryError(f"top must be at least 1, not {top}")
    rows: list[BandwidthRow] = []
    with translated("query bandwidth"), snapshot(db):
        plan = read_plan(db, INTERFACES, since_ms, until_ms)
        sql = "SELECT id, agent_id, hostname, department, county FROM agents"
        found = db.execute(sql + " WHERE id = ?", (agent,)) if agent is not None else db.execute(sql)
        for who in [_Agent(*row) for row in found]:
            rows.extend(_bandwidth_of(db, who, interface, plan))
    rows.sort(key=lambda r: (-max(r.p95_rx_bps, r.p95_tx_bps), r.hostname, r.interface))
    return rows[:top] if top is not None else rows


def _bandwidth_of(
    db: sqlite3.Connection, who: _Agent, interface: str | None, plan: ReadPlan
) -> list[BandwidthRow]:
    """One row per series of the agent with samples in range (only ``interface``'s, if given)."""
    series_id = None
    if interface is not None:
        found = db.execute(
            "SELECT id FROM series WHERE agent = ? AND interface = ?", (who.id, interface)
        ).fetchone()
        if found is None:
            return []
        series_id = int(found[0])
    if plan.resolution_ms != RAW:
        return _per_bucket(db, who, series_id, plan)
    if not plan.spans:
        return []
    (span,) = plan.spans
    return _per_sample(db, who, series_id, span.since_ms, span.until_ms)


def _per_sample(
    db: sqlite3.Connection, who: _Agent, series_id: int | None, since_ms: int, until_ms: int
) -> list[BandwidthRow]:
    """The rows of a range wholly within the raw horizon: figures over the samples themselves."""
    params = {"agent": who.id, "since": since_ms, "until": until_ms, "span": MAX_BATCH_SPAN_MS}
    if series_id is None:
        samples = db.execute(_SCAN, params).fetchall()
    else:
        samples = db.execute(_SCAN + " AND s.series = :series", {**params, "series": series_id}).fetchall()
    if not samples:
        return []
    names = dict(db.execute("SELECT id, interface FROM series WHERE agent = ?", (who.id,)).fetchall())
    # Stable sort: each series' samples become one run, and the columns of a run are
    # slices of the columns of the whole.
    samples.sort(key=itemgetter(0))
    columns = list(zip(*samples, strict=True))
    by_series = columns[0]
    rows = []
    start = 0
    while start < len(by_series):
        series_id = by_series[start]
        end = bisect_right(by_series, series_id, lo=start)
        name = names.get(series_id)
        if name is None:
            raise StoreError(
                f"samples of agent {who.agent_id} refer to series {series_id}, which it does not have"
            )
        latest = _latest(db, {**params, "series": series_id})
        rows.append(_figures(who, name, [column[start:end] for column in columns[1:]], latest))
        start = end
    return rows


def _latest(db: sqlite3.Connection, params: dict[str, int]) -> tuple[int, float, float, int]:
    """(time_ms, rx_bps, tx_bps, speed_bps) of the series' latest sample in range, of the
    samples with that time the one stored last (highest id).

    Batches can overlap in time, so the newest batch need not hold the latest sample;
    but a batch holds nothing later than its last_ms, so the read stops at the first
    batch that ends before the best sample found: usually the first one or two.
    """
    best: tuple[int, int, float, float, int] | None = None
    with closing(db.execute(_LATEST, params)) as found:
        for batch_last_ms, time_ms, sample_id, rx_bps, tx_bps, speed_bps in found:
            if best is not None and batch_last_ms < best[0]:
                break
            if best is None or (time_ms, sample_id) > best[:2]:
                best = (time_ms, sample_id, rx_bps, tx_bps, speed_bps)
    if best is None:  # the scan, in the same snapshot, found samples of this series
        raise StoreError(f"series {params['series']} has samples in range and yet none")
    return best[0], best[2], best[3], best[4]


def _nearest_rank_p95(ascending: list[float]) -> float:
    """The value of rank ceil(0.95 n), counted from 1 (integer arithmetic: no 0.95 * n rounding)."""
    return ascending[(95 * len(ascending) + 99) // 100 - 1]


def _figures(
    who: _Agent, interface: str, columns: list[tuple[Any, ...]], latest: tuple[int, float, float, int]
) -> BandwidthRow:
    rx_bytes, tx_bytes, interval_ms, rx_bps, tx_bps, utilization, counter_reset = columns
    count = len(rx_bps)
    rx_sorted = sorted(rx_bps)
    tx_sorted = sorted(tx_bps)
    unknown_speed = utilization.count(None)
    util_sorted = sorted(utilization if not unknown_speed else [u for u in utilization if u is not None])
    total_rx = sum(rx_bytes)
    total_tx = sum(tx_bytes)
    seconds = sum(interval_ms) / 1000
    last_ms, current_rx, current_tx, speed = latest
    return BandwidthRow(
        hostname=who.hostname,
        agent_id=who.agent_id,
        department=who.department,
        county=who.county,
        interface=interface,
        samples=count,
        current_rx_bps=float(current_rx),
        current_tx_bps=float(current_tx),
        avg_rx_bps=total_rx * 8 / seconds if seconds > 0 else 0.0,
        avg_tx_bps=total_tx * 8 / seconds if seconds > 0 else 0.0,
        p95_rx_bps=float(_nearest_rank_p95(rx_sorted)),
        p95_tx_bps=float(_nearest_rank_p95(tx_sorted)),
        peak_rx_bps=float(rx_sorted[-1]),
        peak_tx_bps=float(tx_sorted[-1]),
        speed_bps=int(speed),
        utilization_p95=float(_nearest_rank_p95(util_sorted)) if util_sorted else None,
        utilization_peak=float(util_sorted[-1]) if util_sorted else None,
        total_rx_bytes=int(total_rx),
        total_tx_bytes=int(total_tx),
        counter_resets=count - counter_reset.count(0),
        last_ms=int(last_ms),
    )


@dataclass(slots=True)
class _Bucket:
    """The samples of one series in one bucket of the query, as far as read."""

    samples: int
    rx_bytes: int
    tx_bytes: int
    interval_ms: int
    peak_rx_bps: float
    peak_tx_bps: float
    speed_bps: int  # the highest reported; 0: none knew it
    peak_utilization: float | None  # of the samples with a known speed; None: there are none
    counter_resets: int

    def add(self, other: _Bucket) -> None:
        self.samples += other.samples
        self.rx_bytes += other.rx_bytes
        self.tx_bytes += other.tx_bytes
        self.interval_ms += other.interval_ms
        self.peak_rx_bps = max(self.peak_rx_bps, other.peak_rx_bps)
        self.peak_tx_bps = max(self.peak_tx_bps, other.peak_tx_bps)
        self.speed_bps = max(self.speed_bps, other.speed_bps)
        if other.peak_utilization is not None:
            self.peak_utilization = max(self.peak_utilization or 0.0, other.peak_utilization)
        self.counter_resets += other.counter_resets


def _per_bucket(
    db: sqlite3.Connection, who: _Agent, series_id: int | None, plan: ReadPlan
) -> list[BandwidthRow]:
    """The rows of a range that reaches into the rollups: figures over buckets of the coarsest
    tier read (see bandwidth), every sample in range in one of them."""
    size = plan.resolution_ms
    buckets: dict[int, dict[int, _Bucket]] = defaultdict(dict)  # series -> bucket start -> figures

    def add(series: int, time_ms: int, part: _Bucket) -> None:
        start = time_ms - time_ms % size
        into = buckets[series].get(start)
        if into is None:
            buckets[series][start] = part
        else:
            into.add(part)

    newest_raw: set[int] = set()  # series with samples where the raw samples answer
    only, only_scanned = (
        ("", "") if series_id is None else (" AND series = :series", " AND s.series = :series")
    )
    for span in plan.spans:
        params = {
            "agent": who.id,
            "since": span.since_ms,
            "until": span.until_ms,
            "span": MAX_BATCH_SPAN_MS,
            "rolled": plan.rolled_id,
            "resolution": span.resolution_ms,
            "series": series_id,
        }
        if span.resolution_ms == RAW:
            samples = db.execute(_SCAN_TIMED + only_scanned, params).fetchall()
            newest_raw.update(row[0] for row in samples)
        else:
            samples = db.execute(_PENDING + only, params).fetchall()
            for series, bucket_ms, count, rx, tx, interval, peak_rx, peak_tx, speed, resets in db.execute(
                _ROLLUPS + only, params
            ):
                utilization = max(peak_rx, peak_tx) / speed if speed > 0 else None
                add(
                    series,
                    bucket_ms,
                    _Bucket(count, rx, tx, interval, peak_rx, peak_tx, speed, utilization, resets),
                )
        for series, time_ms, rx, tx, interval, rx_bps, tx_bps, speed, utilization, reset in samples:
            known = utilization if speed > 0 else None
            add(series, time_ms, _Bucket(1, rx, tx, interval, rx_bps, tx_bps, speed, known, int(reset != 0)))
    if not buckets:
        return []
    names = dict(db.execute("SELECT id, interface FROM series WHERE agent = ?", (who.id,)).fetchall())
    rows = []
    for series, by_start in sorted(buckets.items()):
        name = names.get(series)
        if name is None:
            raise StoreError(
                f"samples of agent {who.agent_id} refer to series {series}, which it does not have"
            )
        latest = None
        if series in newest_raw:
            raw = plan.spans[-1]  # the raw samples answer for the newest part, if for any
            latest = _latest(
                db,
                {
                    "agent": who.id,
                    "since": raw.since_ms,
                    "until": raw.until_ms,
                    "span": MAX_BATCH_SPAN_MS,
                    "series": series,
                },
            )
        rows.append(_bucket_figures(who, name, size, sorted(by_start.items()), latest))
    return rows


def _rate(bytes_: int, interval_ms: int) -> float:
    return bytes_ * 8000 / interval_ms if interval_ms > 0 else 0.0


def _bucket_figures(
    who: _Agent,
    interface: str,
    size: int,
    buckets: list[tuple[int, _Bucket]],
    latest: tuple[int, float, float, int] | None,
) -> BandwidthRow:
    """The figures of one series from its (start, bucket) pairs, oldest first (see bandwidth)."""
    rx_rates = [_rate(b.rx_bytes, b.interval_ms) for _, b in buckets]
    tx_rates = [_rate(b.tx_bytes, b.interval_ms) for _, b in buckets]
    utilization = sorted(
        max(rx, tx) / b.speed_bps
        for rx, tx, (_, b) in zip(rx_rates, tx_rates, buckets, strict=True)
        if b.speed_bps > 0
    )
    peaks = [b.peak_utilization for _, b in buckets if b.peak_utilization is not None]
    total_rx = sum(b.rx_bytes for _, b in buckets)
    total_tx = sum(b.tx_bytes for _, b in buckets)
    seconds = sum(b.interval_ms for _, b in buckets) / 1000
    if latest is None:
        last_start, last = buckets[-1]
        latest = (last_start, rx_rates[-1], tx_rates[-1], last.speed_bps)
    last_ms, current_rx, current_tx, current_speed = latest
    return BandwidthRow(
        hostname=who.hostname,
        agent_id=who.agent_id,
        department=who.department,
        county=who.county,
        interface=interface,
        samples=sum(b.samples for _, b in buckets),
        current_rx_bps=float(current_rx),
        current_tx_bps=float(current_tx),
        avg_rx_bps=total_rx * 8 / seconds if seconds > 0 else 0.0,
        avg_tx_bps=total_tx * 8 / seconds if seconds > 0 else 0.0,
        p95_rx_bps=float(_nearest_rank_p95(sorted(rx_rates))),
        p95_tx_bps=float(_nearest_rank_p95(sorted(tx_rates))),
        peak_rx_bps=float(max(b.peak_rx_bps for _, b in buckets)),
        peak_tx_bps=float(max(b.peak_tx_bps for _, b in buckets)),
        speed_bps=int(current_speed),
        utilization_p95=float(_nearest_rank_p95(utilization)) if utilization else None,
        utilization_peak=float(max(peaks)) if peaks else None,
        total_rx_bytes=int(total_rx),
        total_tx_bytes=int(total_tx),
        counter_resets=sum(b.counter_resets for _, b in buckets),
        last_ms=int(last_ms),
        bucket_ms=size,
    )

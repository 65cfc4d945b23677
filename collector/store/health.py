"""Whether monitoring itself works: the `health` command's view (read-only).

One call, one HealthReport, over the window [since_ms, now_ms): what was stored and how
late, what was refused and why, which batches never came, how full the disk is, and how
each agent is doing by its own latest health report.

Lag and clock skew. A batch's lag is ``received_ms - sent_ms``: the collector's clock when
the batch arrived minus the agent's clock when it built the batch. That is the batch's real
delay (network, queues, and any time it waited in the agent's spool while the collector was
out of reach) minus the offset of the agent's clock. ``agents.clock_skew_ms`` is
``sent_ms - received_ms`` of the agent's latest batch (before any, hello time minus receive
time): its clock's offset minus that batch's delay. For an agent whose latest batch went
straight through, the skew is its clock offset, and lag + skew is the real delay. So: a
median skew near 0 means the lag is delay; a p50 lag near minus the median skew means clocks
are off, not delivery; a p99 or max far above the p50 means some batches waited (a spool
replayed after an outage).

The batches, rejections and sequence_gaps tables only grow (every batches row is kept, see
retention.py) and have no index on receive time, so a window is read newest first and the
read stops past its start: an agent's batches are stored in sequence order, and rejections
and gaps are inserted in commit order, so their receive times only grow along the keys read
(WALK_SLACK_MS covers a commit group received over a few seconds, or a small step back of the
collector's clock). The cost is the rows in the window, not the rows ever stored.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from statistics import median_low
from typing import NamedTuple

from collector.errors import QueryError, StoreError
from collector.store.queries import agent_status, sensor_problems, snapshot
from collector.store.schema import MIGRATIONS
from collector.store.sql import translated

# Rows received up to this long before the window may have been inserted after rows in it.
WALK_SLACK_MS = 60_000
# Below either, the storage figures carry a warning.
LOW_DISK_FRACTION = 0.10
LOW_DISK_BYTES = 1 << 30
# Worst first: an agent that does not report at all, then one that is late.
_STATUS_RANK = {"offline": 0, "stale": 1, "online": 2}


class Ingest(NamedTuple):
    batches: int  # stored (status 'stored') with received_ms in the window
    facts: int  # in those batches
    batches_per_s: float  # over the whole window
    facts_per_s: float
    agents: int  # agents with at least one batch stored in the window


class Lag(NamedTuple):
    """received_ms - sent_ms of the window's stored batches (see the module docstring), in ms."""

    batches: int
    p50: int | None  # nearest rank; None when no batch was stored in the window
    p99: int | None
    max: int | None
    # Median of agents.clock_skew_ms over the agents seen in the window; None when none was.
    clock_skew_median: int | None


class Rejection(NamedTuple):
    """Refusals of one kind in the window: batches, hellos, enrollments, admissions, ..."""

    code: str  # gRPC status code name: INVALID_ARGUMENT, FAILED_PRECONDITION, ...
    field: str  # the field path refused ("batch.facts[1].interface_sample.rx_bps", "enroll", ...)
    times: int  # how many in the window ("count" would hide tuple.count)
    last_ms: int  # the newest one's receive time
    last_agent_id: str  # who sent the newest one ("" when unknown)
    example: str  # the newest one's message


class Gaps(NamedTuple):
    gaps: int  # sequence gaps detected in the window
    missing_batches: int  # batches those gaps skip
    agents: int  # agents with a gap in the window
    open_incidents: int  # incidents open now, of any rule and age


class Storage(NamedTuple):
    path: str
    db_bytes: int
    wal_bytes: int  # the -wal file beside it; 0 when there is none
    disk_total_bytes: int  # the filesystem holding the database
    disk_free_bytes: int  # free for the collector (not counting space reserved for root)
    disk_free_fraction: float
    warning: str | None  # set when free space is below 10 % or 1 GiB


class AgentCounts(NamedTuple):
    total: int
    online: int
    stale: int
    offline: int


class AgentHealth(NamedTuple):
    """One agent as its latest health report describes it; the health figures are None until
    it sent one."""

    hostname: str
    agent_id: str
    status: str  # "online", "stale" or "offline", as `agents` says
    last_seen_ms: int
    health_ms: int | None  # agent clock time of the latest health report
    cpu_percent: float | None  # of one core
    rss_bytes: int | None
    spool_bytes: int | None  # reported but not yet acknowledged by the collector
    spool_batches: int | None
    capture_packets: int | None  # packets the capture accepted, dropped ones included
    capture_drops: int | None
    drop_fraction: float | None  # capture_drops / capture_packets; None when nothing was captured
    policy_version: str
    sensors: str  # the sensors not simply "on", with why (as in `agents`)


class HealthReport(NamedTuple):
    since_ms: int
    until_ms: int
    ingest: Ingest
    lag: Lag
    rejected: list[Rejection]  # most frequent first
    gaps: Gaps
    storage: Storage
    agents: AgentCounts
    agent_health: list[AgentHealth]  # worst first: offline, stale, then the biggest spool backlog

    @property
    def window_ms(self) -> int:
        return self.until_ms - self.since_ms


def health_report(
    db: sqlite3.Connection,
    path: str | Path,
    *,
    since_ms: int,
    now_ms: int,
    stale_after_ms: int,
    offline_after_ms: int,
) -> HealthReport:
    """Every figure of the `health` command over [since_ms, now_ms), from one snapshot of ``db``
    (the database at ``path``, whose files and filesystem the storage figures describe)."""
    if since_ms >= now_ms:
        raise QueryError(f"the health window must end after it starts ({since_ms} >= {now_ms})")
    with translated("read the collector's health"), snapshot(db):
        _check_schema(db, path)
        agents = _agents(db, now_ms, stale_after_ms, offline_after_ms)
        ingest, lag = _ingest_and_lag(db, since_ms, now_ms)
        rejected = _rejections(db, since_ms, now_ms)
        gaps = _gaps(db, since_ms, now_ms)
    counts = AgentCounts(
        total=len(agents),
        online=sum(a.status == "online" for a in agents),
        stale=sum(a.status == "stale" for a in agents),
        offline=sum(a.status == "offline" for a in agents),
    )
    return HealthReport(since_ms, now_ms, ingest, lag, rejected, gaps, storage(path), counts, agents)


def _check_schema(db: sqlite3.Connection, path: str | Path) -> None:
    """A reader does not migrate: a database the running collector has not upgraded yet lacks columns."""
    (version,) = db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    if version < len(MIGRATIONS):
        raise StoreError(
            f"{path} has schema version {version}, this collector reads version {len(MIGRATIONS)}: "
            "restart `zonewatch-collector serve` on it to upgrade it"
        )


def _agents(
    db: sqlite3.Connection, now_ms: int, stale_after_ms: int, offline_after_ms: int
) -> list[AgentHealth]:
    rows = db.execute(
        "SELECT hostname, agent_id, last_seen_ms, health_ms, cpu_percent, rss_bytes, spool_bytes,"
        " spool_batches, capture_packets, capture_drops, policy_version, sensors FROM agents"
    ).fetchall()
    agents = []
    for (hostname, agent_id, last_seen, health_ms, cpu, rss, spool_bytes, spool_batches, packets, drops,
         policy, sensors) in rows:  # fmt: skip
        reported = health_ms > 0
        agents.append(
            AgentHealth(
                hostname=hostname,
                agent_id=agent_id,
                status=agent_status(now_ms, last_seen, stale_after_ms, offline_after_ms),
                last_seen_ms=last_seen,
                health_ms=health_ms if reported else None,
                cpu_percent=cpu if reported else None,
                rss_bytes=rss if reported else None,
                spool_bytes=spool_bytes if reported else None,
                spool_batches=spool_batches if reported else None,
                capture_packets=packets if reported else None,
                capture_drops=drops if reported else None,
                drop_fraction=drops / packets if reported and packets > 0 else None,
                policy_version=policy,
                sensors=sensor_problems(sensors),
            )
        )
    agents.sort(
        key=lambda a: (
            _STATUS_RANK[a.status],
            -(a.spool_bytes or 0),
            -(a.spool_batches or 0),
            a.hostname,
            a.agent_id,
        )
    )
    return agents


# The primary key (agent, seq) read backwards: no sort, and the read stops at the window's start.
_AGENT_BATCHES_NEWEST_FIRST = (
    "SELECT received_ms, sent_ms, facts, status FROM batches WHERE agent = ? ORDER BY seq DESC"
)


def _ingest_and_lag(db: sqlite3.Connection, since_ms: int, now_ms: int) -> tuple[Ingest, Lag]:
    # agents.last_seen_ms is the receive time of the agent's newest batch (or hello): an agent
    # silent since before the window has no batch in it.
    active = db.execute("SELECT id FROM agents WHERE last_seen_ms >= ?", (since_ms - WALK_SLACK_MS,))
    facts = reporting = 0
    lags: list[int] = []
    for (key,) in active.fetchall():
        before = len(lags)
        newest_first = db.execute(_AGENT_BATCHES_NEWEST_FIRST, (key,))
        with closing(newest_first):
            for received_ms, sent_ms, count, status in newest_first:
                if received_ms < since_ms - WALK_SLACK_MS:
                    break
                if status == "stored" and since_ms <= received_ms < now_ms:
                    facts += count
                    lags.append(received_ms - sent_ms)
        reporting += len(lags) > before
    seconds = (now_ms - since_ms) / 1000
    ingest = Ingest(len(lags), facts, len(lags) / seconds, facts / seconds, reporting)
    lags.sort()
    seen = db.execute(
        "SELECT clock_skew_ms FROM agents WHERE last_seen_ms >= ? AND last_seen_ms < ?", (since_ms, now_ms)
    )
    skews = [skew for (skew,) in seen]
    lag = Lag(
        batches=len(lags),
        p50=_nearest_rank(lags, 50),
        p99=_nearest_rank(lags, 99),
        max=lags[-1] if lags else None,
        clock_skew_median=int(median_low(skews)) if skews else None,
    )
    return ingest, lag


def _nearest_rank(ascending: list[int], percent: int) -> int | None:
    """The value of rank ceil(percent/100 n), counted from 1 (integer arithmetic: no rounding)."""
    if not ascending:
        return None
    return ascending[(percent * len(ascending) + 99) // 100 - 1]


def _rejections(db: sqlite3.Connection, since_ms: int, now_ms: int) -> list[Rejection]:
    groups: dict[tuple[str, str], Rejection] = {}
    newest_first = db.execute(
        "SELECT received_ms, agent_id, code, field, message FROM rejections ORDER BY id DESC"
    )
    with closing(newest_first):
        for received_ms, agent_id, code, field, message in newest_first:
            if received_ms < since_ms - WALK_SLACK_MS:
                break
            if not since_ms <= received_ms < now_ms:
                continue
            seen = groups.get((code, field))
            if seen is None or received_ms > seen.last_ms:
                times = seen.times + 1 if seen else 1
                groups[(code, field)] = Rejection(code, field, times, received_ms, agent_id, message)
            else:
                groups[(code, field)] = seen._replace(times=seen.times + 1)
    return sorted(groups.values(), key=lambda r: (-r.times, -r.last_ms, r.code, r.field))


def _gaps(db: sqlite3.Connection, since_ms: int, now_ms: int) -> Gaps:
    gaps = missing = 0
    agents: set[int] = set()
    newest_first = db.execute(
        "SELECT agent, from_seq, to_seq, detected_ms FROM sequence_gaps ORDER BY rowid DESC"
    )
    with closing(newest_first):
        for agent, from_seq, to_seq, detected_ms in newest_first:
            if detected_ms < since_ms - WALK_SLACK_MS:
                break
            if since_ms <= detected_ms < now_ms:
                gaps += 1
                missing += to_seq - from_seq + 1
                agents.add(agent)
    (open_incidents,) = db.execute("SELECT count(*) FROM incidents WHERE status = 'open'").fetchone()
    return Gaps(gaps, missing, len(agents), open_incidents)


def storage(path: str | Path) -> Storage:
    """Sizes of the database and its WAL, and the space left on their filesystem."""
    path = Path(path)
    try:
        db_bytes = path.stat().st_size
        try:
            wal_bytes = Path(f"{path}-wal").stat().st_size
        except FileNotFoundError:
            wal_bytes = 0  # checkpointed and removed by the last connection to close
        disk = shutil.disk_usage(path.parent)
    except OSError as exc:
        raise StoreError(f"cannot measure the storage of {path}: {exc.strerror or exc}") from exc
    fraction = disk.free / disk.total if disk.total else 0.0
    warning = low_disk_warning(path, disk.free, disk.total)
    return Storage(str(path), db_bytes, wal_bytes, disk.total, disk.free, fraction, warning)


def low_disk_warning(path: str | Path, free_bytes: int, total_bytes: int) -> str | None:
    """What to say when the filesystem holding the database has less than 10 % or 1 GiB free."""
    fraction = free_bytes / total_bytes if total_bytes else 0.0
    if fraction >= LOW_DISK_FRACTION and free_bytes >= LOW_DISK_BYTES:
        return None
    return (
        f"low disk space: {free_bytes / (1 << 30):.2f} GiB free ({fraction * 100:.1f} %) on the filesystem"
        f" of {path}; when it is full the collector stores nothing and agents keep their reports spooled"
    )

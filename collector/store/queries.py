"""Read-only queries operators run through the CLI.

Every function takes the connection first and returns typed rows; sqlite3 errors
become StoreError here, an operator's mistake (unknown agent, ...) a QueryError.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from collector.errors import QueryError, StoreError

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


class BandwidthRow(NamedTuple):
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


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"cannot {what}: {exc}") from exc


@contextmanager
def _snapshot(db: sqlite3.Connection) -> Iterator[None]:
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
    with _translated("list agents"):
        rows = db.execute(
            "SELECT agent_id, hostname, department, county, site, role, agent_version,"
            " policy_version, first_seen_ms, last_seen_ms, last_seq, clock_skew_ms"
            " FROM agents ORDER BY department, county, hostname, agent_id"
        ).fetchall()
    return [
        AgentRow._make((*row, agent_status(now_ms, row[9], stale_after_ms, offline_after_ms))) for row in rows
    ]


def resolve_agent(db: sqlite3.Connection, text: str) -> int:
    """agents.id of the agent named by its id, a unique id prefix or its hostname.

    An exact agent id wins, then an exact hostname (case-insensitive, as in DNS),
    then an id prefix of at least MIN_PREFIX characters.
    """
    handle = text.strip()
    with _translated("look up agent"):
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


def _interfaces_of(db: sqlite3.Connection, agent: int) -> list[str]:
    """The agent's interface names, by one index seek each (no scan of its samples)."""
    rows = db.execute(
        "WITH RECURSIVE names(name) AS ("
        " SELECT min(interface) FROM interface_samples WHERE agent = :agent"
        " UNION ALL"
        " SELECT (SELECT min(interface) FROM interface_samples WHERE agent = :agent AND interface > name)"
        " FROM names WHERE name IS NOT NULL"
        ") SELECT name FROM names WHERE name IS NOT NULL",
        {"agent": agent},
    ).fetchall()
    return [name for (name,) in rows]


# The samples of one (agent, interface) in range, read once: interface_samples is
# not clustered by agent, so each sample costs a row lookup (the index has only
# agent, interface, time_ms), and a second pass would double the dominant cost.
# The percentiles then sort only the top 5 % of that in-memory copy (LIMIT + OFFSET).
# Nearest-rank p95 = rank ceil(0.95 n) ascending = skip n - ceil(0.95 n) descending;
# (95 n + 99) / 100 is that ceiling in SQLite's integer arithmetic.
_GROUP = (
    "FROM interface_samples"
    " WHERE agent = :agent AND interface = :interface AND time_ms >= :since AND time_ms < :until"
)
_GROUP_SUMMARY = f"""
WITH s AS MATERIALIZED (
    SELECT rx_bytes, tx_bytes, interval_ms, rx_bps, tx_bps, counter_reset,
        CASE WHEN speed_bps > 0 THEN utilization END AS utilization
    {_GROUP}
),
t AS MATERIALIZED (
    SELECT count(*) AS samples, sum(rx_bytes) AS rx_bytes, sum(tx_bytes) AS tx_bytes,
        sum(interval_ms) AS covered_ms, max(rx_bps) AS peak_rx, max(tx_bps) AS peak_tx,
        count(utilization) AS with_speed, max(utilization) AS util_peak,
        sum(counter_reset != 0) AS resets
    FROM s
)
SELECT samples, rx_bytes, tx_bytes, covered_ms, peak_rx, peak_tx, util_peak, resets,
    (SELECT rx_bps FROM s ORDER BY rx_bps DESC
        LIMIT 1 OFFSET (SELECT samples - (95 * samples + 99) / 100 FROM t)),
    (SELECT tx_bps FROM s ORDER BY tx_bps DESC
        LIMIT 1 OFFSET (SELECT samples - (95 * samples + 99) / 100 FROM t)),
    (SELECT utilization FROM s WHERE utilization IS NOT NULL ORDER BY utilization DESC
        LIMIT 1 OFFSET (SELECT with_speed - (95 * with_speed + 99) / 100 FROM t))
FROM t
"""
# One index seek.
_LATEST = f"SELECT time_ms, rx_bps, tx_bps, speed_bps {_GROUP} ORDER BY time_ms DESC LIMIT 1"


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
    """
    if top is not None and top < 1:
        raise QueryError(f"top must be at least 1, not {top}")
    with _translated("query bandwidth"), _snapshot(db):
        sql = "SELECT id, agent_id, hostname, department, county FROM agents"
        found = db.execute(sql + " WHERE id = ?", (agent,)) if agent is not None else db.execute(sql)
        agents = [_Agent(*row) for row in found]
        rows = []
        for who in agents:
            names = [interface] if interface is not None else _interfaces_of(db, who.id)
            for name in names:
                row = _bandwidth_of(db, who, name, since_ms, until_ms)
                if row is not None:
                    rows.append(row)
    rows.sort(key=lambda r: (-max(r.p95_rx_bps, r.p95_tx_bps), r.hostname, r.interface))
    return rows[:top] if top is not None else rows


def _bandwidth_of(
    db: sqlite3.Connection, who: _Agent, interface: str, since_ms: int, until_ms: int
) -> BandwidthRow | None:
    group = {"agent": who.id, "interface": interface, "since": since_ms, "until": until_ms}
    (
        count,
        rx_bytes,
        tx_bytes,
        covered_ms,
        peak_rx,
        peak_tx,
        util_peak,
        resets,
        p95_rx,
        p95_tx,
        util_p95,
    ) = db.execute(_GROUP_SUMMARY, group).fetchone()
    if not count:
        return None
    last_ms, current_rx, current_tx, speed = db.execute(_LATEST, group).fetchone()
    seconds = covered_ms / 1000
    return BandwidthRow(
        hostname=who.hostname,
        agent_id=who.agent_id,
        department=who.department,
        county=who.county,
        interface=interface,
        samples=count,
        current_rx_bps=float(current_rx),
        current_tx_bps=float(current_tx),
        avg_rx_bps=rx_bytes * 8 / seconds if seconds > 0 else 0.0,
        avg_tx_bps=tx_bytes * 8 / seconds if seconds > 0 else 0.0,
        p95_rx_bps=float(p95_rx),
        p95_tx_bps=float(p95_tx),
        peak_rx_bps=float(peak_rx),
        peak_tx_bps=float(peak_tx),
        speed_bps=int(speed),
        utilization_p95=None if util_p95 is None else float(util_p95),
        utilization_peak=None if util_peak is None else float(util_peak),
        total_rx_bytes=int(rx_bytes),
        total_tx_bytes=int(tx_bytes),
        counter_resets=int(resets),
        last_ms=int(last_ms),
    )

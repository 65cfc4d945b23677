"""Who talks to whom: flows summed per (agent, process, user, remote endpoint, protocol, zone).

The list a migration planner acts on: which program, run by whom, on which host still
talks to the dedicated network, how much, since when, and how it was started.
"""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError


class FlowSummary(NamedTuple):
    """One group of flows.

    ``pid`` and ``cmdline`` are those of the group's most recent flow: the largest
    end_ms, and among flows ending in the same millisecond the one stored last (the
    largest flows.id), so the same database always gives the same answer. The most
    recent pid rather than a count of pids, because it is the one an admin can act
    on: ``systemctl status PID`` names the unit to reconfigure, ``ls -l /proc/PID/cwd``
    where it runs, and it pairs with the command line shown (the same flow). A
    count would only hint that the program restarts, and pids recycled over the
    range would make it wrong anyway.
    """

    hostname: str
    agent_id: str
    process: str  # "" when the agent could not attribute the flows
    user: str  # "" when the agent could not attribute the flows
    remote_addr: str
    remote_port: int
    ip_protocol: int
    remote_zone: str
    flows: int
    bytes_out: int
    bytes_in: int
    packets: int  # both directions
    first_ms: int  # earliest flow start
    last_ms: int  # latest flow end
    pid: int  # of the most recent flow; 0 when unattributed
    cmdline: str  # of the most recent flow; "" when unattributed or unreadable


_GROUP = "f.process, f.user, f.remote_addr, f.remote_port, f.ip_protocol, f.remote_zone"
_KEYS = f"a.hostname, a.agent_id, {_GROUP}"
_KEY_COUNT = 8
# 1 for each group's most recent flow. The same groups as _KEYS: flows.agent is
# agents.id, which has one hostname and agent_id. _fold orders flows the same way.
_RECENCY = f"row_number() OVER (PARTITION BY f.agent, {_GROUP} ORDER BY f.end_ms DESC, f.id DESC)"


def flows(
    db: sqlite3.Connection,
    *,
    since_ms: int,
    until_ms: int,
    agent: int | None = None,
    zone: str | None = None,
    process: str | None = None,
    user: str | None = None,
    top: int | None = None,
) -> list[FlowSummary]:
    """Flows whose fact time is in [since_ms, until_ms), most bytes (both ways) first.

    ``agent`` is agents.id (queries.resolve_agent); ``zone`` the exact remote zone;
    ``process`` a case-insensitive substring of the process name or command line;
    ``user`` the exact user name.
    """
    if top is not None and top < 1:
        raise QueryError(f"top must be at least 1, not {top}")
    where = ["f.time_ms >= :since", "f.time_ms < :until"]
    if agent is not None:
        where.append("f.agent = :agent")
    if zone is not None:
        where.append("f.remote_zone = :zone")
    if process is not None:
        where.append("(instr(lower(f.process), lower(:process)) OR instr(lower(f.cmdline), lower(:process)))")
    if user is not None:
        where.append("f.user = :user")
    filters = " AND ".join(where)
    params = {
        "since": since_ms, "until": until_ms, "agent": agent, "zone": zone, "process": process, "user": user,
    }  # fmt: skip
    try:
        try:
            groups: list[Any] = db.execute(
                f"SELECT {_KEYS}, count(*), sum(f.bytes_out), sum(f.bytes_in),"
                " sum(f.packets_out), sum(f.packets_in), min(f.start_ms), max(f.end_ms),"
                " max(CASE f.recency WHEN 1 THEN f.pid END), max(CASE f.recency WHEN 1 THEN f.cmdline END)"
                f" FROM (SELECT f.*, {_RECENCY} AS recency FROM flows AS f WHERE {filters}) AS f"
                f" JOIN agents AS a ON a.id = f.agent GROUP BY {_KEYS}",
                params,
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "integer overflow" not in str(exc):
                raise
            # Sums past INT64_MAX: add them up exactly in Python instead.
            groups = _fold(
                db.execute(
                    f"SELECT {_KEYS}, 1, f.bytes_out, f.bytes_in, f.packets_out, f.packets_in,"
                    f" f.start_ms, f.end_ms, f.id, f.pid, f.cmdline"
                    f" FROM flows AS f JOIN agents AS a ON a.id = f.agent WHERE {filters}",
                    params,
                )
            )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot query flows: {exc}") from exc
    # The two packet sums are added here: SQLite turns an overflowing "+" into a float.
    rows = [
        FlowSummary._make((*g[: _KEY_COUNT + 3], g[-6] + g[-5], g[-4], g[-3], g[-2], g[-1])) for g in groups
    ]
    rows.sort(key=lambda r: (-(r.bytes_out + r.bytes_in), *r[:_KEY_COUNT]))
    return rows[:top] if top is not None else rows


def _fold(rows: Any) -> list[tuple[Any, ...]]:
    """Per-flow rows (keys..., 1, sums x 4, start, end, id, pid, cmdline) grouped by their keys.

    Sums exact; pid and cmdline of the most recent flow, as the SQL path orders them.
    """
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        key, values = tuple(row[:_KEY_COUNT]), list(row[_KEY_COUNT:])
        into = merged.get(key)
        if into is None:
            merged[key] = values
            continue
        for i in range(5):
            into[i] += values[i]
        into[5] = min(into[5], values[5])
        if (values[6], values[7]) > (into[6], into[7]):  # (end_ms, id): a more recent flow
            into[6:] = values[6:]
    return [(*key, *values[:7], *values[8:]) for key, values in merged.items()]

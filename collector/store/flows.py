"""Who talks to whom: flows summed per (agent, process, remote endpoint, protocol, zone).

The list a migration planner acts on: which program on which host still talks to
the dedicated network, how much, and since when.
"""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError


class FlowSummary(NamedTuple):
    hostname: str
    agent_id: str
    process: str  # "" when the agent could not attribute the flows
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


_KEYS = "a.hostname, a.agent_id, f.process, f.remote_addr, f.remote_port, f.ip_protocol, f.remote_zone"
_KEY_COUNT = 7


def flows(
    db: sqlite3.Connection,
    *,
    since_ms: int,
    until_ms: int,
    agent: int | None = None,
    zone: str | None = None,
    process: str | None = None,
    top: int | None = None,
) -> list[FlowSummary]:
    """Flows whose fact time is in [since_ms, until_ms), most bytes (both ways) first.

    ``agent`` is agents.id (queries.resolve_agent); ``zone`` the exact remote zone;
    ``process`` a case-insensitive substring of the process name or command line.
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
    base = f" FROM flows AS f JOIN agents AS a ON a.id = f.agent WHERE {' AND '.join(where)}"
    params = {"since": since_ms, "until": until_ms, "agent": agent, "zone": zone, "process": process}
    try:
        try:
            groups: list[Any] = db.execute(
                f"SELECT {_KEYS}, count(*), sum(f.bytes_out), sum(f.bytes_in),"
                f" sum(f.packets_out), sum(f.packets_in), min(f.start_ms), max(f.end_ms)"
                f"{base} GROUP BY {_KEYS}",
                params,
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "integer overflow" not in str(exc):
                raise
            # Sums past INT64_MAX: add them up exactly in Python instead.
            groups = _fold(
                db.execute(
                    f"SELECT {_KEYS}, 1, f.bytes_out, f.bytes_in, f.packets_out, f.packets_in,"
                    f" f.start_ms, f.end_ms{base}",
                    params,
                )
            )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot query flows: {exc}") from exc
    # The two packet sums are added here: SQLite turns an overflowing "+" into a float.
    rows = [FlowSummary._make((*g[: _KEY_COUNT + 3], g[-4] + g[-3], g[-2], g[-1])) for g in groups]
    rows.sort(
        key=lambda r: (-(r.bytes_out + r.bytes_in), r.hostname, r.process, r.remote_addr, r.remote_port)
    )
    return rows[:top] if top is not None else rows


def _fold(rows: Any) -> list[tuple[Any, ...]]:
    """Per-flow rows (keys..., 1, sums x 4, start, end) grouped by their keys, sums exact."""
    merged: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        key, values = tuple(row[:_KEY_COUNT]), row[_KEY_COUNT:]
        into = merged.get(key)
        if into is None:
            merged[key] = list(values)
            continue
        for i in range(5):
            into[i] += values[i]
        into[5] = min(into[5], values[5])
        into[6] = max(into[6], values[6])
    return [(*key, *values) for key, values in merged.items()]

"""What a report says, gathered from the same store functions the CLI prints from.

A report is read, never computed anew: every figure comes from store/incidents.py, store/traffic.py,
store/migration.py, store/queries.py or store/health.py, called as the matching CLI command calls
them, so each number in the report is one an operator can check with that command for the same
period. Only counting (incidents per severity, per status, per day) and filtering by department
and county happen here.

Filters. ``department`` and ``county`` narrow every section whose rows carry a host, with these
exceptions, each said in the report:

- link load (``traffic --by zone``) is the whole fleet's: a link carries every host's traffic,
  and store/traffic.py sums it per zone without host labels;
- rejected input (``health``) is counted per reason, not per host: a rejected batch may come
  from no known agent at all;
- the migration trend (``migration --history``) replays every host's transitions, without labels;
  it is left out of a filtered report rather than shown for the wrong hosts.

Time. Incidents, link load, the migration trend and rejected input are the period's. Agents'
status, their capture figures (each agent's latest health report), migration states and
exemptions are as of ``now_ms``: the database keeps no history of them, so a report of a past
period shows them as they are now (as `agents`, `migration` and `health` do).

The JSON data block every report embeds (``report_json``), keys by section:

- ``report`` ("zonewatch"), ``version`` (1), ``lang``, ``generated_ms``, ``since_ms``,
  ``until_ms``, ``filters`` {department, county} (null when not set).
- ``summary``: ``incidents`` (seen in the period: last seen at or after since_ms, first seen
  before until_ms), ``new`` (first seen in the period), ``by_severity`` and ``by_status`` (every
  severity and status, 0 included).
- ``incidents_per_day``: one object per local calendar day, ``day`` (YYYY-MM-DD), ``since_ms``,
  ``until_ms`` and one count per severity of the incidents first seen that day.
- ``incidents``: ``total``, ``shown`` (at most MAX_INCIDENTS, most severe first), ``omitted``,
  ``rows``: the shown incidents, each an object with the keys of `incidents list --format json`.
- ``links``: ``bucket_ms`` (asked for: 1 min, as `traffic` does by default), ``days`` (day,
  since_ms, until_ms), ``zones``: per extranet zone ``zone``, ``direction``, ``capacity_bps``,
  ``period`` (the row of `traffic --by zone --format json` over the whole period) and ``days``
  (that row for each day's [since_ms, until_ms), null on a day without traffic).
- ``migration``: ``by_department`` and ``by_county`` (the ``groups`` of `migration --by ...
  --format json`), ``overall`` (the same keys, summed; group "*"), ``regressed`` and
  ``expiring_exemptions`` (as `migration --format json` has them, within EXPIRING_MS of
  generation), ``trend`` (the rows of `migration --history --format json`, null when filtered).
- ``coverage``: ``agents`` {total, online, stale, offline}, ``silent`` (the stale and offline
  rows of `agents --format json`, the longest silent first), ``capture`` {agents_reporting,
  packets, drops, rows: the `health --format json` agent_health rows with capture drops, the
  largest fraction lost first}, ``rejected`` (`health --format json` rejected over
  [``health_since_ms``, ``health_until_ms``): the period, up to now_ms at the latest).

An incident's own report (``incident_json``) embeds ``report`` ("zonewatch-incident"),
``version``, ``lang``, ``generated_ms`` and ``incident``: the object `incidents show --format
json` prints.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from collector.errors import QueryError
from collector.migration import DAY_MS, STATES
from collector.store import health, incidents, migration, queries, traffic
from collector.store.migration import GroupProgress, Pair

# The most incidents a report details; the rest are counted and named as omitted.
MAX_INCIDENTS = 200
# Longer periods are refused: one day of link load is one traffic query.
MAX_DAYS = 400
# As `traffic` by default: rates over one-minute buckets.
LINK_BUCKET_MS = 60_000
# As `migration`: exemptions expiring within 14 days.
# As `agents` and `health` by default.
STALE_AFTER_MS = 60_000
OFFLINE_AFTER_MS = 600_000

# Called with (step done, steps in all, what is being read): the CLI's progress bar.
Progress = Callable[[int, int, str], None]


class Day(NamedTuple):
    """One local calendar day of the period, cut to the period at both ends."""

    day: str  # YYYY-MM-DD
    since_ms: int
    until_ms: int


class IncidentSummary(NamedTuple):
    incidents: int  # seen in the period
    new: int  # first seen in the period
    by_severity: dict[str, int]
    by_status: dict[str, int]


class DayCounts(NamedTuple):
    day: Day
    by_severity: dict[str, int]  # incidents first seen that day


class IncidentEntry(NamedTuple):
    """One incident of the report: its row as `incidents list` has it, and what `incidents show` adds."""

    row: incidents.IncidentRow
    detail: incidents.IncidentDetail


class LinkLoad(NamedTuple):
    zone: str
    direction: str  # vertical or horizontal
    capacity_bps: int
    period: traffic.TrafficRow
    days: list[traffic.TrafficRow | None]  # one per ReportData.days; None: no traffic that day


class MigrationProgress(NamedTuple):
    by_department: list[GroupProgress]
    by_county: list[GroupProgress]
    overall: GroupProgress
    regressed: list[Pair]
    expiring: list[migration.ExemptionRow]
    trend: list[dict[str, Any]] | None  # None in a filtered report (see the module docstring)


class Coverage(NamedTuple):
    agents: health.AgentCounts
    silent: list[queries.AgentRow]  # stale and offline
    capture_agents: int  # agents that reported capture figures
    capture_packets: int
    capture_drops: int
    capture_losses: list[health.AgentHealth]  # agents with drops, the largest fraction first
    rejected: list[health.Rejection]
    health_since_ms: int
    health_until_ms: int


class ReportData(NamedTuple):
    generated_ms: int
    since_ms: int
    until_ms: int
    department: str | None
    county: str | None
    days: list[Day]
    summary: IncidentSummary
    per_day: list[DayCounts]
    incidents_total: int
    incidents: list[IncidentEntry]  # the shown ones, most severe first
    links: list[LinkLoad]
    migration: MigrationProgress
    coverage: Coverage

    @property
    def incidents_omitted(self) -> int:
        return self.incidents_total - len(self.incidents)

    @property
    def filtered(self) -> bool:
        return self.department is not None or self.county is not None


def gather(
    db: sqlite3.Connection,
    *,
    since_ms: int,
    until_ms: int,
    department: str | None = None,
    county: str | None = None,
    now_ms: int,
    db_path: str | Path,
    progress: Progress | None = None,
) -> ReportData:
    """Everything the report shows for [since_ms, until_ms), as of now_ms.

    db_path: the database's file, for the health figures (its size and the disk's free space).
    """
    if since_ms >= until_ms:
        raise QueryError("the report's period must end after it starts")
    days = split_days(since_ms, until_ms)
    step = _Steps(progress, 5 + len(days))

    def wanted(dept: str, cnty: str) -> bool:
        return (department is None or dept == department) and (county is None or cnty == county)

    # One read transaction: every section sees the database as of one moment, however the writer
    # commits meanwhile.
    with queries.snapshot(db):
        incidents.require_current_schema(db, db_path)
        step("agents")
        agents = queries.list_agents(db, now_ms, STALE_AFTER_MS, OFFLINE_AFTER_MS)
        labels = {a.agent_id: (a.department, a.county) for a in agents}
        step("incidents")
        seen = [
            row
            for row in incidents.list_incidents(db, status="all", department=department, since_ms=since_ms)
            if row.first_seen_ms < until_ms and wanted(row.department, row.county)
        ]
        summary, per_day = _count_incidents(seen, days, since_ms, until_ms)
        worst_first = sorted(seen, key=_severity_first)
        shown = [IncidentEntry(r, incidents.incident_detail(db, r.id)) for r in worst_first[:MAX_INCIDENTS]]
        links = _links(db, since_ms, until_ms, days, step)
        step("migration")
        filtered = department is not None or county is not None
        progress_ = _migration(db, now_ms, since_ms, until_ms, wanted, labels, filtered=filtered)
        step("monitoring health")
        coverage = _coverage(db, db_path, agents, since_ms, min(until_ms, now_ms), wanted)
    step.finish()
    return ReportData(
        generated_ms=now_ms,
        since_ms=since_ms,
        until_ms=until_ms,
        department=department,
        county=county,
        days=days,
        summary=summary,
        per_day=per_day,
        incidents_total=len(seen),
        incidents=shown,
        links=links,
        migration=progress_,
        coverage=coverage,
    )


class _Steps:
    """Tells the caller's progress callback, if any, what is read next."""

    def __init__(self, progress: Progress | None, steps: int) -> None:
        self.progress, self.steps, self.done = progress, steps, 0

    def __call__(self, what: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.steps, what)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.steps, self.steps, "done")


def _severity_first(row: incidents.IncidentRow) -> tuple[int, int, int]:
    """Most severe first; among equals the most recently seen."""
    return (-incidents.SEVERITIES.index(row.severity), -row.last_seen_ms, -row.id)


def _links(
    db: sqlite3.Connection, since_ms: int, until_ms: int, days: list[Day], step: _Steps
) -> list[LinkLoad]:
    """Each extranet zone's load over the period and per day: `traffic --by zone` for each range."""
    per_day: dict[str, list[traffic.TrafficRow | None]] = {}
    for index, day in enumerate(days):
        step(f"link load {day.day}")
        rows = traffic.traffic(
            db, by="zone", since_ms=day.since_ms, until_ms=day.until_ms, bucket_ms=LINK_BUCKET_MS
        )
        for row in _extranet(rows):
            per_day.setdefault(row.group, [None] * len(days))[index] = row
    step("link load, the whole period")
    period = traffic.traffic(db, by="zone", since_ms=since_ms, until_ms=until_ms, bucket_ms=LINK_BUCKET_MS)
    return [
        LinkLoad(row.group, row.direction, row.capacity_bps, row, per_day.get(row.group, [None] * len(days)))
        for row in _extranet(period)
    ]


def split_days(since_ms: int, until_ms: int) -> list[Day]:
    """The local calendar days the period touches, the first and last cut to it."""
    start = datetime.fromtimestamp(since_ms / 1000).date()
    out: list[Day] = []
    begin = since_ms
    current = start
    while begin < until_ms:
        if len(out) >= MAX_DAYS:
            raise QueryError(f"a report covers at most {MAX_DAYS} days")
        following = current + timedelta(days=1)
        end = min(_local_midnight_ms(following), until_ms)
        out.append(Day(current.isoformat(), begin, end))
        begin, current = end, following
    return out


def _local_midnight_ms(day: date) -> int:
    # A naive datetime's astimezone() takes the local offset of that very day (DST included).
    return round(datetime.combine(day, time()).astimezone().timestamp() * 1000)


def _count_incidents(
    rows: list[incidents.IncidentRow], days: list[Day], since_ms: int, until_ms: int
) -> tuple[IncidentSummary, list[DayCounts]]:
    by_severity = dict.fromkeys(incidents.SEVERITIES, 0)
    by_status = dict.fromkeys(incidents.STATUSES, 0)
    per_day = [DayCounts(day, dict.fromkeys(incidents.SEVERITIES, 0)) for day in days]
    new = 0
    for row in rows:
        by_severity[row.severity] = by_severity.get(row.severity, 0) + 1
        by_status[row.status] = by_status.get(row.status, 0) + 1
        if since_ms <= row.first_seen_ms < until_ms:
            new += 1
            for counts in per_day:
                if counts.day.since_ms <= row.first_seen_ms < counts.day.until_ms:
                    counts.by_severity[row.severity] = counts.by_severity.get(row.severity, 0) + 1
                    break
    return IncidentSummary(len(rows), new, by_severity, by_status), per_day


def _extranet(rows: list[traffic.TrafficRow]) -> list[traffic.TrafficRow]:
    return [r for r in rows if r.kind == "extranet"]


def _migration(
    db: sqlite3.Connection,
    now_ms: int,
    since_ms: int,
    until_ms: int,
    wanted: Callable[[str, str], bool],
    labels: dict[str, tuple[str, str]],
    *,
    filtered: bool,
) -> MigrationProgress:
    rows = [r for r in migration.states(db) if wanted(r.department, r.county)]

    by_department = migration.progress(rows, "department")
    counts = {state: sum(getattr(g, state) for g in by_department) for state in STATES}
    overall = GroupProgress._make(
        ("*", sum(counts.values()), *(counts[state] for state in STATES), migration.percent_migrated(counts))
    )
    regressed = [migration.pair(r) for r in rows if r.state == "regressed"]
    expiring = [
        e
        for e in migration.exemptions(db, now_ms)
        if e.until_ms - now_ms <= migration.EXPIRING_MS and wanted(*labels.get(e.agent_id, ("", "")))
    ]
    trend = None if filtered else migration.trend(db, since_ms=since_ms, until_ms=until_ms, bucket_ms=DAY_MS)
    return MigrationProgress(
        by_department, migration.progress(rows, "county"), overall, regressed, expiring, trend
    )


def _coverage(
    db: sqlite3.Connection,
    db_path: str | Path,
    agents: list[queries.AgentRow],
    since_ms: int,
    until_ms: int,
    wanted: Callable[[str, str], bool],
) -> Coverage:
    mine = [a for a in agents if wanted(a.department, a.county)]
    ids = {a.agent_id for a in mine}
    counts = health.AgentCounts(
        total=len(mine),
        online=sum(a.status == "online" for a in mine),
        stale=sum(a.status == "stale" for a in mine),
        offline=sum(a.status == "offline" for a in mine),
    )
    silent = sorted(
        (a for a in mine if a.status != "online"), key=lambda a: (a.last_seen_ms, a.hostname, a.agent_id)
    )
    if since_ms >= until_ms:  # a period wholly ahead of now: no health window yet
        rejected: list[health.Rejection] = []
        agent_health: list[health.AgentHealth] = []
    else:
        report = health.health_report(
            db,
            db_path,
            since_ms=since_ms,
            now_ms=until_ms,
            stale_after_ms=STALE_AFTER_MS,
            offline_after_ms=OFFLINE_AFTER_MS,
        )
        rejected, agent_health = report.rejected, [a for a in report.agent_health if a.agent_id in ids]
    reporting = [a for a in agent_health if a.capture_packets is not None]
    losses = sorted(
        (a for a in reporting if a.capture_drops),
        key=lambda a: (-(a.drop_fraction or 0.0), -(a.capture_drops or 0), a.hostname, a.agent_id),
    )
    return Coverage(
        agents=counts,
        silent=silent,
        capture_agents=len(reporting),
        capture_packets=sum(a.capture_packets or 0 for a in reporting),
        capture_drops=sum(a.capture_drops or 0 for a in reporting),
        capture_losses=losses,
        rejected=rejected,
        health_since_ms=since_ms,
        health_until_ms=max(since_ms, until_ms),
    )


def report_json(data: ReportData, lang: str) -> dict[str, Any]:
    """The JSON data block: keys as in the module docstring, rows as the CLI's JSON has them."""
    m, c = data.migration, data.coverage
    return {
        "report": "zonewatch",
        "version": 1,
        "lang": lang,
        "generated_ms": data.generated_ms,
        "since_ms": data.since_ms,
        "until_ms": data.until_ms,
        "filters": {"department": data.department, "county": data.county},
        "summary": data.summary._asdict(),
        "incidents_per_day": [{**d.day._asdict(), **d.by_severity} for d in data.per_day],
        "incidents": {
            "total": data.incidents_total,
            "shown": len(data.incidents),
            "omitted": data.incidents_omitted,
            "rows": [entry.row._asdict() for entry in data.incidents],
        },
        "links": {
            "bucket_ms": LINK_BUCKET_MS,
            "days": [d._asdict() for d in data.days],
            "zones": [
                {
                    "zone": link.zone,
                    "direction": link.direction,
                    "capacity_bps": link.capacity_bps,
                    "period": link.period._asdict(),
                    "days": [None if r is None else r._asdict() for r in link.days],
                }
                for link in data.links
            ],
        },
        "migration": {
            "by_department": [g._asdict() for g in m.by_department],
            "by_county": [g._asdict() for g in m.by_county],
            "overall": m.overall._asdict(),
            "regressed": [p._asdict() for p in m.regressed],
            "expiring_exemptions": [e._asdict() for e in m.expiring],
            "trend": m.trend,
        },
        "coverage": {
            "agents": c.agents._asdict(),
            "silent": [a._asdict() for a in c.silent],
            "capture": {
                "agents_reporting": c.capture_agents,
                "packets": c.capture_packets,
                "drops": c.capture_drops,
                "rows": [a._asdict() for a in c.capture_losses],
            },
            "rejected": [r._asdict() for r in c.rejected],
            "health_since_ms": c.health_since_ms,
            "health_until_ms": c.health_until_ms,
        },
    }


def incident_json(detail: incidents.IncidentDetail) -> dict[str, Any]:
    """An incident as `incidents show --format json` prints it."""
    return incidents.detail_document(detail)

"""What each section of a report shows: ReportData turned into headings, tables and charts.

The templates (templates.py) only lay these out; every word comes from i18n.py and every figure
is formatted here, once, the same way in every table (rates as `bandwidth` prints them, times in
local time). Values stay plain text: the templates escape them, so agents' strings never become
markup. Charts are Markup made by svg.py, which escapes what it draws.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from markupsafe import Markup

from collector.migration import STATES
from collector.output import human_bps
from collector.report import svg
from collector.report.data import (
    LINK_BUCKET_MS,
    Coverage,
    GroupProgress,
    LinkLoad,
    MigrationProgress,
    ReportData,
)
from collector.report.i18n import LABELS, format_datetime, format_day, name
from collector.store.incidents import SEVERITIES, STATUSES, IncidentDetail

# The store orders severities least to most severe; a report lists and stacks the worst first.
SEVERITIES_WORST_FIRST = tuple(reversed(SEVERITIES))
SEVERITY_COLORS = {
    "informational": "#9ca3af",
    "low": "#2563eb",
    "medium": "#d97706",
    "high": "#dc2626",
    "critical": "#7f1d1d",
}
STATE_COLORS = {
    "not_started": "#9ca3af",
    "dual_homed": "#d97706",
    "migrated": "#16a34a",
    "regressed": "#dc2626",
    "exempt": "#6366f1",
    "unknown": "#d1d5db",
}
AGENT_STATUSES = ("online", "stale", "offline")
# Host fields every evidence event repeats: the incident shows them once, above its events.
HOST_FIELDS = frozenset({"agent_id", "hostname", "department", "county", "site", "role"})
# In the period's report an incident shows its newest events; its own report shows them all.
EVENTS_IN_SUMMARY = 20
# Longer values are cut in tables ("…"); the JSON block keeps them whole.
MAX_CELL = 300
# Rows of an agent list shown; the JSON block has every one.
MAX_AGENT_ROWS = 200
# A link this loaded at p95 is near saturation (queues grow well before 100 %); at its peak, only
# beyond its capacity is it marked.
BUSY_P95 = 0.8
BUSY_PEAK = 1.0


class Cell(NamedTuple):
    text: str
    css: str = ""
    span: int = 1


class Row(NamedTuple):
    cells: list[Cell]
    css: str = ""


class Table(NamedTuple):
    headers: list[Cell]
    rows: list[Row]
    css: str = ""
    more: str = ""  # "" or how many rows were left out, formatted


class IncidentView(NamedTuple):
    id: int
    severity: str
    severity_name: str
    status_name: str
    title: str
    facts: list[tuple[str, str]]
    events: Table
    events_note: str
    others: list[tuple[str, str]]
    processes: Table
    actions: Table


class Formats:
    """Figures and names as one language writes them."""

    def __init__(self, lang: str) -> None:
        self.lang = lang
        self.t = LABELS[lang]

    def when(self, ms: int | None) -> str:
        return format_datetime(ms, self.lang) if ms else "–"

    def day(self, day: str) -> str:
        return format_day(day, self.lang)

    def name(self, kind: str, value: str) -> str:
        return name(self.lang, kind, value)

    def length(self, ms: int) -> str:
        if ms % 3_600_000 == 0:
            return f"{ms // 3_600_000} " + ("小时" if self.lang == "zh" else "h")
        return f"{ms / 60_000:g} " + ("分钟" if self.lang == "zh" else "min")


def num(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction * 100:.1f} %"


def cut(value: Any) -> str:
    """A value as one cell shows it: text as it is, anything else as JSON; cut at MAX_CELL."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _headers(*texts: str, numeric: Sequence[int] = ()) -> list[Cell]:
    return [Cell(text, "num" if i in numeric else "") for i, text in enumerate(texts)]


def _capped(headers: list[Cell], rows: list[Row], limit: int | None = None, css: str = "") -> Table:
    if limit is None or len(rows) <= limit:
        return Table(headers, rows, css)
    return Table(headers, rows[:limit], css, num(len(rows) - limit))


# --- (a) summary ------------------------------------------------------------------------------------


def summary(data: ReportData, f: Formats) -> dict[str, Any]:
    t, s = f.t, data.summary
    by_severity = Table(
        [Cell(t["by_severity"]), *(Cell(f.name("severity", v), "num") for v in SEVERITIES_WORST_FIRST)],
        [Row([Cell(t["count"]), *(Cell(num(s.by_severity[v]), "num") for v in SEVERITIES_WORST_FIRST)])],
        "by-severity",
    )
    by_status = Table(
        [Cell(t["by_status"]), *(Cell(f.name("status", v), "num") for v in STATUSES)],
        [Row([Cell(t["count"]), *(Cell(num(s.by_status[v]), "num") for v in STATUSES)])],
        "by-status",
    )
    series = [
        svg.Series(f.name("severity", v), SEVERITY_COLORS[v], [d.by_severity[v] for d in data.per_day])
        for v in SEVERITIES_WORST_FIRST
    ]
    chart = svg.stacked_columns(
        chart_id="chart-incidents-per-day",
        title=t["per_day"],
        categories=[f.day(d.day.day) for d in data.per_day],
        series=series,
        x_label=t["day"],
        y_label=t["incidents_axis"],
    )
    return {
        "incidents": num(s.incidents),
        "new": num(s.new),
        "by_severity": by_severity,
        "by_status": by_status,
        "chart": Markup(chart),
    }


# --- (b) incidents ----------------------------------------------------------------------------------


def incident(d: IncidentDetail, f: Formats, newest: int | None) -> IncidentView:
    """One incident: its facts, evidence events (the newest ``newest``, None: all), other evidence,
    processes and the actions taken on it."""
    t = f.t
    structured = isinstance(d.evidence.get("events"), list) or isinstance(d.evidence.get("processes"), list)
    every_event = _dicts(d.evidence.get("events"))
    events = every_event if newest is None else every_event[-newest:]
    others = d.evidence
    if structured:
        others = {k: v for k, v in d.evidence.items() if k not in ("events", "processes")}
    host = (d.hostname or "–") + (f" ({d.agent_id[:12]})" if d.agent_id else "")
    dedup = ", ".join(f"{k}={cut(v)}" for k, v in sorted(d.dedup_fields.items())) or cut(d.dedup_key)
    facts = [
        (t["rule"], d.rule + (f" ({d.rule_id})" if d.rule_id else "")),
        (t["host"], host),
        (f"{t['department']} / {t['county']}",
         " / ".join(v for v in (d.department, d.county, d.site, d.role) if v) or "–"),
        (t["dedup"], dedup),
        (t["first_seen"], f.when(d.first_seen_ms)),
        (t["last_seen"], f.when(d.last_seen_ms)),
        (t["matches"], num(d.matches)),
    ]  # fmt: skip
    note = t["evidence_shown"].format(count=len(every_event))
    if len(events) < len(every_event):
        note = f"{len(events)} / {len(every_event)}"
    event_rows = [
        Row(
            [
                Cell(_event_time(e, f), "time"),
                Cell(cut(e.get("category", ""))),
                Cell(_event_details(e), "mono"),
            ]
        )
        for e in events
    ]
    process_rows = [
        Row([Cell(cut(p.get("name", p.get("process", "")) or "–")), Cell(cut(p.get("pid", "–")), "num"),
             Cell(cut(p.get("user", ""))), Cell(_process_command(p), "mono")])
        for p in _dicts(d.evidence.get("processes"))
    ]  # fmt: skip
    action_rows = [
        Row([Cell(f.when(a.time_ms), "time"), Cell(a.actor), Cell(f.name("action", a.action)),
             Cell(f"{f.name('status', a.from_status)} → {f.name('status', a.to_status)}"
                  if a.from_status != a.to_status else ""),
             Cell(a.comment)])
        for a in d.actions
    ]  # fmt: skip
    return IncidentView(
        id=d.id,
        severity=d.severity,
        severity_name=f.name("severity", d.severity),
        status_name=f.name("status", d.status),
        title=d.title,
        facts=facts,
        events=Table(_headers(t["time"], t["category"], t["details"]), event_rows, "evidence"),
        events_note=note,
        others=[(k, cut(v)) for k, v in sorted(others.items())],
        processes=Table(
            _headers(t["process"], t["pid"], t["user"], t["cmdline"], numeric=(1,)), process_rows
        ),
        actions=Table(_headers(t["time"], t["actor"], t["action"], t["change"], t["comment"]), action_rows),
    )


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _event_time(event: dict[str, Any], f: Formats) -> str:
    time_ms = event.get("time_ms")
    return f.when(time_ms) if isinstance(time_ms, int) and not isinstance(time_ms, bool) else "–"


def _event_details(event: dict[str, Any]) -> str:
    return "  ".join(
        f"{key}={cut(value)}"
        for key, value in sorted(event.items())
        if key not in ("time_ms", "category") and key not in HOST_FIELDS
    )


def _process_command(process: dict[str, Any]) -> str:
    extra = [f"{k}={cut(v)}" for k, v in sorted(process.items())
             if k not in ("name", "process", "pid", "user", "cmdline")]  # fmt: skip
    return "  ".join([cut(process.get("cmdline", "")), *extra]).strip()


# --- (c) link load ----------------------------------------------------------------------------------


def links(data: ReportData, f: Formats) -> tuple[list[str], list[dict[str, Any]]]:
    """The notes above the links, and per link its heading, chart and table."""
    t = f.t
    notes = [t["links_note"].format(bucket=f.length(LINK_BUCKET_MS))]
    coarser = next((x.period.bucket_ms for x in data.links if x.period.bucket_ms != LINK_BUCKET_MS), None)
    if coarser:
        notes.append(t["links_coarser"].format(bucket=f.length(coarser)))
    return notes, [_link(index, link, data, f) for index, link in enumerate(data.links)]


def _link(index: int, link: LinkLoad, data: ReportData, f: Formats) -> dict[str, Any]:
    t = f.t
    days = [f.day(d.day) for d in data.days]

    def values(field: str) -> list[float]:
        return [float(getattr(r, field)) if r is not None else 0.0 for r in link.days]

    series = [
        svg.Series(t["p95_in"], "#2563eb", values("p95_in_bps")),
        svg.Series(t["p95_out"], "#16a34a", values("p95_out_bps")),
        svg.Series(t["peak_in"], "#2563eb", values("peak_in_bps"), dashed=True),
        svg.Series(t["peak_out"], "#16a34a", values("peak_out_bps"), dashed=True),
    ]
    chart = svg.line_chart(
        chart_id=f"chart-link-{index}",
        title=f"{link.zone}: {t['rate_axis']}",
        categories=days,
        series=series,
        x_label=t["day"],
        y_label=t["rate_axis"],
        fmt=human_bps,
        limit=svg.Limit(t["capacity"], link.capacity_bps) if link.capacity_bps else None,
    )
    headers = _headers(t["day"], t["p95_in"], t["p95_out"], t["peak_in"], t["peak_out"], t["load_p95"],
                       t["load_peak"], numeric=range(1, 7))  # fmt: skip
    rows = [_link_row(days[i], row, f) for i, row in enumerate(link.days)]
    rows.append(Row(_link_row(t["whole_period"], link.period, f).cells, "total"))
    capacity = human_bps(link.capacity_bps) if link.capacity_bps else t["unknown_capacity"]
    return {
        "heading": f"{link.zone} ({t.get(link.direction, link.direction)}), {t['capacity']} {capacity}",
        "chart": Markup(chart),
        "table": Table(headers, rows, "link"),
    }


def _link_row(label: str, row: Any, f: Formats) -> Row:
    if row is None:
        return Row([Cell(label), Cell(f.t["no_traffic"], "muted", 6)])
    busy_p95 = (row.utilization_p95 or 0.0) >= BUSY_P95
    busy_peak = (row.utilization_peak or 0.0) >= BUSY_PEAK
    return Row(
        [
            Cell(label),
            Cell(human_bps(row.p95_in_bps), "num"),
            Cell(human_bps(row.p95_out_bps), "num"),
            Cell(human_bps(row.peak_in_bps), "num"),
            Cell(human_bps(row.peak_out_bps), "num"),
            Cell(percent(row.utilization_p95), "num over" if busy_p95 else "num"),
            Cell(percent(row.utilization_peak), "num over" if busy_peak else "num"),
        ]
    )


# --- (d) migration ----------------------------------------------------------------------------------


def migration(m: MigrationProgress, f: Formats) -> dict[str, Any]:
    t = f.t
    groups = [
        {
            "heading": t[f"by_{by}"],
            "chart": _migration_chart(by, rows, f),
            "table": _migration_table(t[by], rows, m.overall, f),
        }
        for by, rows in (("department", m.by_department), ("county", m.by_county))
    ]
    regressed = [
        Row(
            [
                Cell(p.hostname),
                Cell(p.department),
                Cell(p.county),
                Cell(p.network),
                Cell(f.when(p.since_ms), "time"),
            ]
        )
        for p in m.regressed
    ]
    expiring = [
        Row([Cell(e.hostname), Cell(e.network), Cell(e.reason), Cell(e.approved_by), Cell(e.reference),
             Cell(f.when(e.until_ms), "time")])
        for e in m.expiring
    ]  # fmt: skip
    return {
        "groups": groups,
        "trend": _trend_chart(m.trend, f),
        "regressed": Table(
            _headers(t["host"], t["department"], t["county"], t["network"], t["since"]), regressed
        ),
        "expiring": Table(
            _headers(t["host"], t["network"], t["reason"], t["approved_by"], t["reference"], t["expires"]),
            expiring,
        ),
    }


def _migration_table(first: str, groups: list[GroupProgress], overall: GroupProgress, f: Formats) -> Table:
    headers = [
        Cell(first),
        Cell(f.t["pairs"], "num"),
        *(Cell(f.name("state", s), "num") for s in STATES),
        Cell(f.t["percent_migrated"], "num"),
    ]

    def row(label: str, g: GroupProgress, css: str = "") -> Row:
        cells = [Cell(label), Cell(num(g.pairs), "num"), *(Cell(num(getattr(g, s)), "num") for s in STATES)]
        return Row([*cells, Cell(f"{g.percent_migrated:.1f} %", "num")], css)

    return Table(headers, [*(row(g.group, g) for g in groups), row(f.t["overall"], overall, "total")])


def _migration_chart(by: str, groups: list[GroupProgress], f: Formats) -> Markup:
    series = [
        svg.Series(f.name("state", s), STATE_COLORS[s], [getattr(g, s) for g in groups]) for s in STATES
    ]
    return Markup(
        svg.stacked_bars(
            chart_id=f"chart-migration-{by}",
            title=f"{f.t['migration']}: {f.t['by_' + by]}",
            categories=[g.group for g in groups],
            series=series,
            x_label=f.t["pairs"],
            notes=[f"{g.percent_migrated:.1f} %" for g in groups],
        )
    )


def _trend_chart(trend: list[dict[str, Any]] | None, f: Formats) -> Markup | None:
    if trend is None:
        return None
    # `migration --history` ends its buckets at UTC midnights: each is labelled with the day it covers.
    days = [time.strftime("%Y-%m-%d", time.gmtime((row["bucket_end_ms"] - 1) / 1000)) for row in trend]
    series = [svg.Series(f.name("state", s), STATE_COLORS[s], [row[s] for row in trend]) for s in STATES]
    return Markup(
        svg.stacked_columns(
            chart_id="chart-migration-trend",
            title=f.t["trend"],
            categories=[f.day(day) for day in days],
            series=series,
            x_label=f.t["day"],
            y_label=f.t["pairs"],
        )
    )


# --- (e) coverage -----------------------------------------------------------------------------------


def coverage(c: Coverage, scope: str, filtered: bool, f: Formats) -> dict[str, Any]:
    t = f.t
    agents = Table(
        [Cell(t["agents"]), Cell(t["agents_total"], "num"),
         *(Cell(f.name("agent", s), "num") for s in AGENT_STATUSES)],
        [Row([Cell(scope), Cell(num(c.agents.total), "num"),
              *(Cell(num(getattr(c.agents, s)), "num") for s in AGENT_STATUSES)])],
        "agents",
    )  # fmt: skip
    silent = [
        Row([Cell(f"{a.hostname} ({a.agent_id[:12]})"), Cell(a.department), Cell(a.county),
             Cell(f.name("agent", a.status)), Cell(f.when(a.last_seen_ms), "time")])
        for a in c.silent
    ]  # fmt: skip
    losses = [
        Row([Cell(f"{a.hostname} ({a.agent_id[:12]})"), Cell(num(a.capture_packets), "num"),
             Cell(num(a.capture_drops), "num"), Cell(percent(a.drop_fraction), "num")])
        for a in c.capture_losses
    ]  # fmt: skip
    rejected = [
        Row([Cell(r.code), Cell(r.field, "mono"), Cell(num(r.times), "num"), Cell(f.when(r.last_ms), "time"),
             Cell(cut(r.example))])
        for r in c.rejected
    ]  # fmt: skip
    fraction = c.capture_drops / c.capture_packets if c.capture_packets else 0.0
    return {
        "agents": agents,
        "silent": _capped(
            _headers(t["host"], t["department"], t["county"], t["status"], t["last_seen_agent"]),
            silent,
            MAX_AGENT_ROWS,
        ),
        "capture_summary": t["capture_summary"].format(
            agents=num(c.capture_agents),
            packets=num(c.capture_packets),
            drops=num(c.capture_drops),
            fraction=percent(fraction),
        ),
        "losses": _capped(
            _headers(t["host"], t["captured"], t["dropped"], t["drop_fraction"], numeric=(1, 2, 3)),
            losses,
            MAX_AGENT_ROWS,
        ),
        "rejected_note": t["rejected_note"] if filtered else "",
        "rejected": Table(
            _headers(t["code"], t["field"], t["times"], t["last_seen"], t["example"], numeric=(2,)), rejected
        ),
    }

"""What the CLI prints, and how it reads the times an operator types.

Three formats: ``table`` for people (human units, local times, coloured status),
``json`` and ``csv`` for programs (raw values, as the queries return them).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TextIO

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from collector.errors import QueryError

if TYPE_CHECKING:
    from collector.store.health import HealthReport

FORMATS = ("table", "json", "csv")


class Column(NamedTuple):
    """One table column: which record field, under which header, formatted how.

    kind: "text", "int", "bps" (bits per second), "speed" (bps, 0 for unknown),
    "bytes", "time" (ms since the epoch, shown in local time), "percent" (a
    fraction, 0.125 shows as 12.5 %), "pct" (already in percent: 12.5 shows as
    12.5 %) or "status" (online/stale/offline, coloured). None shows as "-".
    max_width: in a table, longer cells are cut to this many terminal cells, ending
    in "…" (json and csv keep the whole value).
    """

    field: str
    header: str
    kind: str = "text"
    max_width: int | None = None


AGENT_COLUMNS: tuple[Column, ...] = (
    Column("hostname", "host"),
    Column("agent_id", "agent id"),
    Column("department", "department"),
    Column("county", "county"),
    Column("site", "site"),
    Column("role", "role"),
    Column("agent_version", "version"),
    Column("policy_version", "policy"),
    Column("last_seen_ms", "last seen", "time"),
    Column("clock_skew_ms", "skew ms", "int"),
    Column("status", "status", "status"),
    Column("rss_bytes", "rss", "bytes"),
    Column("sensors", "sensors off"),
)

BANDWIDTH_COLUMNS: tuple[Column, ...] = (
    Column("hostname", "host"),
    Column("department", "department"),
    Column("county", "county"),
    Column("interface", "interface"),
    Column("current_rx_bps", "rx now", "bps"),
    Column("current_tx_bps", "tx now", "bps"),
    Column("avg_rx_bps", "rx avg", "bps"),
    Column("avg_tx_bps", "tx avg", "bps"),
    Column("p95_rx_bps", "rx p95", "bps"),
    Column("p95_tx_bps", "tx p95", "bps"),
    Column("peak_rx_bps", "rx peak", "bps"),
    Column("peak_tx_bps", "tx peak", "bps"),
    Column("speed_bps", "speed", "speed"),
    Column("utilization_p95", "util p95", "percent"),
    Column("utilization_peak", "util peak", "percent"),
    Column("total_rx_bytes", "rx bytes", "bytes"),
    Column("total_tx_bytes", "tx bytes", "bytes"),
    Column("samples", "samples", "int"),
    Column("counter_resets", "resets", "int"),
    Column("last_ms", "last sample", "time"),
)

# What fits a terminal: the figures an operator scans for (now, p95, peak, load).
# `--wide` shows BANDWIDTH_COLUMNS; json and csv always carry every field.
BANDWIDTH_SUMMARY_COLUMNS: tuple[Column, ...] = tuple(
    c
    for c in BANDWIDTH_COLUMNS
    if c.field
    in {
        "hostname", "interface", "current_rx_bps", "current_tx_bps", "p95_rx_bps", "p95_tx_bps",
        "peak_rx_bps", "peak_tx_bps", "speed_bps", "utilization_p95", "samples",
    }
)  # fmt: skip


class ZoneRow(NamedTuple):
    name: str
    kind: str
    direction: str
    department: str
    networks: str
    capacity_bps: int
    line: int


class ZoneLookupRow(NamedTuple):
    address: str
    zone: str
    kind: str


ZONE_COLUMNS: tuple[Column, ...] = (
    Column("name", "zone"),
    Column("kind", "kind"),
    Column("direction", "direction"),
    Column("department", "department"),
    Column("networks", "networks"),
    Column("capacity_bps", "capacity", "speed"),
    Column("line", "line", "int"),
)
ZONE_LOOKUP_COLUMNS: tuple[Column, ...] = (
    Column("address", "address"),
    Column("zone", "zone"),
    Column("kind", "kind"),
)

TRAFFIC_COLUMNS: tuple[Column, ...] = (
    Column("group", "group"),
    Column("kind", "kind"),
    Column("direction", "direction"),
    Column("agents", "agents", "int"),
    Column("bytes_in", "in", "bytes"),
    Column("bytes_out", "out", "bytes"),
    Column("avg_in_bps", "in avg", "bps"),
    Column("avg_out_bps", "out avg", "bps"),
    Column("p95_in_bps", "in p95", "bps"),
    Column("p95_out_bps", "out p95", "bps"),
    Column("peak_in_bps", "in peak", "bps"),
    Column("peak_out_bps", "out peak", "bps"),
    Column("capacity_bps", "capacity", "speed"),
    Column("utilization_p95", "load p95", "percent"),
    Column("utilization_peak", "load peak", "percent"),
)

FLOW_COLUMNS: tuple[Column, ...] = (
    Column("hostname", "host"),
    Column("process", "process"),
    Column("user", "user"),
    Column("remote_addr", "remote"),
    Column("remote_port", "port"),
    Column("ip_protocol", "proto"),
    Column("remote_zone", "zone"),
    Column("flows", "flows", "int"),
    Column("bytes_out", "out", "bytes"),
    Column("bytes_in", "in", "bytes"),
    Column("packets", "packets", "int"),
    Column("first_ms", "first", "time"),
    Column("last_ms", "last", "time"),
    Column("pid", "last pid"),  # not "int": a pid reads 4242, not 4,242
    # Up to 1024 characters: in full it would stretch every row of the table.
    Column("cmdline", "last command line", max_width=60),
)

# `--wide` shows FLOW_COLUMNS; json and csv always carry every field.
FLOW_SUMMARY_COLUMNS: tuple[Column, ...] = tuple(c for c in FLOW_COLUMNS if c.field not in {"pid", "cmdline"})

# Raw interface samples show the time range of the batches holding them; rollups, bucket starts.
RETENTION_COLUMNS: tuple[Column, ...] = (
    Column("data", "data"),
    Column("tier", "tier"),
    Column("rows", "rows", "int"),
    Column("oldest_ms", "oldest", "time"),
    Column("newest_ms", "newest", "time"),
    Column("watermark_ms", "rolled up to", "time"),
    Column("pending", "not rolled up", "int"),
)

TOKEN_COLUMNS: tuple[Column, ...] = (
    Column("id", "id", "int"),
    Column("department", "department"),
    Column("county", "county"),
    Column("site", "site"),
    Column("role", "role"),
    Column("created_ms", "created", "time"),
    Column("expires_ms", "expires", "time"),
    Column("uses_left", "uses left", "int"),
    Column("uses", "used", "int"),
    Column("status", "status"),
    Column("note", "note", max_width=40),
)

# `health`: every field of store/health.py's AgentHealth; the table leaves out health_ms.
AGENT_HEALTH_COLUMNS: tuple[Column, ...] = (
    Column("hostname", "host"),
    Column("agent_id", "agent id"),
    Column("status", "status", "status"),
    Column("last_seen_ms", "last seen", "time"),
    Column("health_ms", "last health report", "time"),
    Column("cpu_percent", "cpu", "pct"),
    Column("rss_bytes", "rss", "bytes"),
    Column("spool_bytes", "spool", "bytes"),
    Column("spool_batches", "spooled batches", "int"),
    Column("capture_packets", "captured", "int"),
    Column("capture_drops", "dropped", "int"),
    Column("drop_fraction", "drop %", "percent"),
    Column("policy_version", "policy"),
    Column("sensors", "sensors off", max_width=60),
)
AGENT_HEALTH_TABLE_COLUMNS: tuple[Column, ...] = tuple(
    c for c in AGENT_HEALTH_COLUMNS if c.field != "health_ms"
)

REJECTION_COLUMNS: tuple[Column, ...] = (
    Column("code", "code"),
    Column("field", "field"),
    Column("times", "times", "int"),
    Column("last_ms", "last", "time"),
    Column("last_agent_id", "last agent"),
    Column("example", "newest message", max_width=70),
)

_EMPTY = {
    AGENT_HEALTH_COLUMNS: "no agents yet",
    AGENT_HEALTH_TABLE_COLUMNS: "no agents yet",
    REJECTION_COLUMNS: "nothing rejected in the window",
    TOKEN_COLUMNS: "no usable tokens (--all lists every one)",
    AGENT_COLUMNS: "no agents",
    BANDWIDTH_COLUMNS: "no samples in range",
    BANDWIDTH_SUMMARY_COLUMNS: "no samples in range",
    ZONE_COLUMNS: "no zones",
    TRAFFIC_COLUMNS: "no zone traffic in range",
    FLOW_COLUMNS: "no flows in range",
    FLOW_SUMMARY_COLUMNS: "no flows in range",
    ZONE_LOOKUP_COLUMNS: "no addresses",
}


class Record(Protocol):
    """What render needs of a row: a NamedTuple."""

    @property
    def _fields(self) -> tuple[str, ...]: ...

    def _asdict(self) -> dict[str, Any]: ...


def render(
    rows: Sequence[Record],
    fmt: str,
    columns: Sequence[Column] | None,
    stream: TextIO,
    *,
    empty_message: str | None = None,
) -> None:
    """Write rows to stream as a table, a JSON array or CSV.

    json carries every field of each record under its field name; table and csv
    show ``columns`` (every field when None), csv with the raw values and the field
    names as header, so a header is printed even when there are no rows. An empty
    table is one line: ``empty_message``, by default the one for those columns.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown output format {fmt!r}: use table, json or csv")
    if columns is None:
        columns = [Column(name, name) for name in rows[0]._fields] if rows else []
    if fmt == "json":
        json.dump([row._asdict() for row in rows], stream, ensure_ascii=False, indent=2)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow([column.field for column in columns])
        writer.writerows([getattr(row, column.field) for column in columns] for row in rows)
    elif not rows:
        stream.write((empty_message or _EMPTY.get(tuple(columns), "no rows")) + "\n")
    else:
        _print_table(rows, columns, stream)


_NUMERIC = frozenset({"int", "bps", "speed", "bytes", "percent", "pct"})
_STATUS_STYLE = {"online": "green", "stale": "yellow", "offline": "red"}


def _print_table(rows: Sequence[Record], columns: Sequence[Column], stream: TextIO) -> None:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, highlight=False)
    for column in columns:
        table.add_column(column.header, justify="right" if column.kind in _NUMERIC else "left", no_wrap=True)
    for row in rows:
        cells = []
        for column in columns:
            cell = _cell(getattr(row, column.field), column.kind)
            if column.max_width is not None:
                cell.truncate(column.max_width, overflow="ellipsis")
            cells.append(cell)
        table.add_row(*cells)
    console = Console(file=stream, highlight=False)
    # Always as wide as the table: squeezed to a terminal (or to 80 columns in a
    # pipe) rich would cut figures to "1.…". A line too long wraps or scrolls (less -S).
    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    console.width = max(console.width, natural)
    console.print(table)


def _cell(value: Any, kind: str) -> Text:
    if kind == "status":
        return Text(str(value), style=_STATUS_STYLE.get(value, ""))
    if value is None or (kind == "speed" and not value):
        return Text("-")
    formatter = _FORMATTERS.get(kind, str)
    return Text(formatter(value))


def human_bps(bps: float) -> str:
    """12_345_678 -> "12.3 Mbit/s" (decimal units, as link speeds are sold)."""
    return _scaled(bps, 1000, ("bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"))


def human_bytes(count: float) -> str:
    """1_288_490_189 -> "1.2 GiB" (binary units, as memory and disks count)."""
    return _scaled(count, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


def _scaled(value: float, base: int, units: tuple[str, ...]) -> str:
    # Move up a unit before rounding would print "1000 bit/s" or "1000.0 kbit/s".
    if abs(value) < base - 0.5:
        return f"{value:.0f} {units[0]}"
    for unit in units[1:]:
        value /= base
        if abs(value) < base - 0.05 or unit == units[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def local_time(ms: int) -> str:
    """ms since the epoch -> "2026-11-28 07:40:01" in the local time zone."""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def percent(fraction: float) -> str:
    return f"{fraction * 100:.1f} %"


_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "text": str,
    "int": lambda value: f"{value:,}",
    "bps": human_bps,
    "speed": human_bps,
    "bytes": human_bytes,
    "time": local_time,
    "percent": percent,
    "pct": lambda value: f"{value:.1f} %",
}


def human_ms(ms: float) -> str:
    """A duration or a signed offset: 850 -> "850 ms", 2100 -> "2.1 s", -90_000 -> "-1.5 min",
    300_000 -> "5 min"."""
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if abs(ms) >= size:
            return f"{ms / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{ms:.0f} ms"


class _Figures(NamedTuple):
    area: str
    figures: str


_SUMMARY_COLUMNS = (Column("area", "area"), Column("figures", "figures"))


def render_health(report: HealthReport, fmt: str, stream: TextIO) -> None:
    """The `health` command's output: json one object with every figure, csv the per-agent rows,
    table a summary, then the rejections by reason and the agents, worst first."""
    if fmt == "json":
        document = {
            "window_ms": report.window_ms,
            "since_ms": report.since_ms,
            "until_ms": report.until_ms,
            "ingest": report.ingest._asdict(),
            "lag_ms": report.lag._asdict(),
            "rejected": [r._asdict() for r in report.rejected],
            "gaps": report.gaps._asdict(),
            "storage": report.storage._asdict(),
            "agents": report.agents._asdict(),
            "agent_health": [a._asdict() for a in report.agent_health],
        }
        json.dump(document, stream, ensure_ascii=False, indent=2)
        stream.write("\n")
        return
    if fmt != "table":
        render(report.agent_health, fmt, AGENT_HEALTH_COLUMNS, stream)
        return
    stream.write(
        f"zonewatch health of {report.storage.path}, the last {human_ms(report.window_ms)}"
        f" ({local_time(report.since_ms)} to {local_time(report.until_ms)})\n\n"
    )
    render(_summary(report), "table", _SUMMARY_COLUMNS, stream)
    if report.storage.warning:
        stream.write(f"\nwarning: {report.storage.warning}\n")
    if report.rejected:
        stream.write("\nRejected in the window, by reason (the newest message as example):\n")
        render(report.rejected, "table", REJECTION_COLUMNS, stream)
    stream.write("\nAgents, worst first (figures from each one's latest health report):\n")
    render(report.agent_health, "table", AGENT_HEALTH_TABLE_COLUMNS, stream)


def _summary(report: HealthReport) -> list[_Figures]:
    ingest, lag, gaps, disk, agents = report.ingest, report.lag, report.gaps, report.storage, report.agents
    stored = "nothing stored in the window"
    if ingest.batches:
        stored = (
            f"{_many(ingest.batches, 'batch', 'batches')}, {_many(ingest.facts, 'fact')} from"
            f" {_many(ingest.agents, 'agent')}: {_per_s(ingest.batches_per_s)} batches/s,"
            f" {_per_s(ingest.facts_per_s)} facts/s"
        )
    late = "no batch stored in the window"
    if lag.p50 is not None and lag.p99 is not None and lag.max is not None:
        late = (
            f"p50 {human_ms(lag.p50)}, p99 {human_ms(lag.p99)}, max {human_ms(lag.max)}"
            f" (received − sent, over {_many(lag.batches, 'batch', 'batches')})"
        )
    if lag.clock_skew_median is not None:
        late += f"; agents' clock skew: median {human_ms(lag.clock_skew_median)}"
    refused = sum(r.times for r in report.rejected)
    rejected = f"{refused:,} ({_many(len(report.rejected), 'reason')}, below)" if refused else "none"
    missing = "no sequence gap"
    if gaps.gaps:
        missing = (
            f"{_many(gaps.gaps, 'sequence gap')} from {_many(gaps.agents, 'agent')},"
            f" {_many(gaps.missing_batches, 'batch', 'batches')} missing"
        )
    missing += f"; {_many(gaps.open_incidents, 'open incident')}"
    space = (
        f"database {human_bytes(disk.db_bytes)} + WAL {human_bytes(disk.wal_bytes)};"
        f" {human_bytes(disk.disk_free_bytes)} free of {human_bytes(disk.disk_total_bytes)}"
        f" ({percent(disk.disk_free_fraction)}){', LOW: see below' if disk.warning else ''}"
    )
    fleet = "no agents yet"
    if agents.total:
        fleet = (
            f"{_many(agents.total, 'agent')}: {agents.online:,} online, {agents.stale:,} stale,"
            f" {agents.offline:,} offline"
        )
    return [
        _Figures("ingest", stored),
        _Figures("lag", late),
        _Figures("rejected", rejected),
        _Figures("gaps", missing),
        _Figures("storage", space),
        _Figures("agents", fleet),
    ]


def _per_s(rate: float) -> str:
    """Three significant digits for a trickle, whole numbers for a flood: 0.0233, 4.67, 12,345."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def _many(count: int, one: str, more: str = "") -> str:
    """3, "agent" -> "3 agents"; 1, "batch", "batches" -> "1 batch"."""
    return f"{count:,} {one if count == 1 else more or one + 's'}"


_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# The ISO 8601 forms we document; datetime.fromisoformat alone would also take
# week dates and compact forms an operator could mistype into.
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(text: str, now_ms: int) -> int:
    """An operator's time -> ms since the epoch.

    "now"; a duration ago ("30s", "15m", "2h", "7d"); a date ("2026-11-28", local
    midnight); a date and time ("2026-11-28T07:00", "2026-11-28 07:00:00"), local
    unless it ends in Z or an offset ("+08:00").
    """
    cleaned = text.strip()
    if cleaned.lower() == "now":
        return now_ms
    duration = _DURATION.fullmatch(cleaned)
    if duration is not None:
        return now_ms - int(duration.group(1)) * _UNIT_MS[duration.group(2)]
    if _ISO.fullmatch(cleaned):
        try:
            moment = datetime.fromisoformat(cleaned)
            if moment.tzinfo is None:
                moment = moment.astimezone()  # naive means local: attach the local offset of that day
            return (moment - _EPOCH) // timedelta(milliseconds=1)
        except (ValueError, OverflowError, OSError):
            pass  # 2026-13-01, 25:00 and friends: the same message as any other typo
    raise QueryError(f"malformed time {text!r}: use 15m, 2h, 7d, 2026-11-28 or 2026-11-28T07:00")


def parse_since(since: str, until: str = "now", *, now_ms: int) -> tuple[int, int]:
    """The CLI's --since/--until pair -> (since_ms, until_ms), a non-empty range."""
    since_ms = parse_time(since, now_ms)
    until_ms = parse_time(until, now_ms)
    check_range(since_ms, until_ms)
    return since_ms, until_ms


def check_range(since_ms: int, until_ms: int) -> None:
    if since_ms >= until_ms:
        raise QueryError(
            f"empty time range: since {_describe(since_ms)} is not before until {_describe(until_ms)}"
        )


def _describe(ms: int) -> str:
    try:
        return local_time(ms)
    except (ValueError, OverflowError, OSError):
        return f"{ms} ms"

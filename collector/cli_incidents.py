"""`zonewatch-collector incidents` and `exceptions`: review what the rules raised, and what they may not.

Operators list and read incidents (or write one as an HTML report, collector/report), acknowledge,
resolve, mark false positives and reopen them (each action signed with --by and kept in the audit
chain, which `incidents verify` checks), and record the exceptions, always expiring, that keep
accepted matches from raising. This module only wires: store/incidents.py and store/exceptions.py
decide. An error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

from collector import cli_report
from collector.errors import CollectorError
from collector.output import Column, local_time, parse_time, render
from collector.store import exceptions, incidents

Handler = Callable[[argparse.Namespace], int]

PROG = "zonewatch-collector"
SEVERITY_STYLE = {
    "critical": "bold white on red",
    "high": "bold red",
    "medium": "yellow",
    "low": "cyan",
    "informational": "dim",
}
STATUS_STYLE = {"open": "bold", "acknowledged": "yellow", "resolved": "green", "false_positive": "dim"}
# Host fields every event repeats: `incidents show` prints them once, for the incident.
HOST_FIELDS = ("agent_id", "hostname", "department", "county", "site", "role")

# json and csv: every field of store/incidents.py's IncidentRow, as stored.
INCIDENT_FIELDS = tuple(Column(name, name) for name in incidents.IncidentRow._fields)
EXCEPTION_FIELDS = tuple(Column(name, name) for name in exceptions.ExceptionRow._fields)
EXCEPTION_COLUMNS = (
    Column("id", "id"),
    Column("rule", "rule"),
    Column("host", "host"),
    Column("peer", "peer"),
    Column("port", "port"),
    Column("owner", "owner"),
    Column("created_ms", "created", "time"),
    Column("expires_ms", "expires", "time"),
    Column("status", "status"),
    Column("reason", "reason", max_width=50),
)

INCIDENTS_EXAMPLES = """\
examples:
  zonewatch-collector incidents list --severity high
  zonewatch-collector incidents show 42
  zonewatch-collector incidents ack 42 --by 张三 --comment "正在排查"
  zonewatch-collector incidents resolve 42 --by 张三 --comment "已封禁该地址"
  zonewatch-collector incidents reopen 42 --by 李四 --comment "又出现了"
  zonewatch-collector incidents verify
  zonewatch-collector incidents report 42 --out incident-42.html
"""
LIST_EXAMPLES = """\
examples:
  zonewatch-collector incidents list
  zonewatch-collector incidents list --severity high --since 24h
  zonewatch-collector incidents list --status all --department 市公安局 --format csv
  zonewatch-collector incidents list --rule port_scan_vertical --agent web-01 --format json
  zonewatch-collector incidents list --follow --severity high
  zonewatch-collector incidents list --follow --format json --max-seconds 3600 >> incidents.jsonl
"""
SHOW_EXAMPLES = """\
examples:
  zonewatch-collector incidents show 42
  zonewatch-collector incidents show 42 --format json
"""
REPORT_EXAMPLES = """\
examples:
  zonewatch-collector incidents report 42 --out incident-42.html
  zonewatch-collector incidents report 42 --lang en --out /srv/share/incident-42-en.html
"""
VERIFY_EXAMPLES = """\
examples:
  zonewatch-collector incidents verify
  zonewatch-collector incidents verify --format json
"""
EXCEPTION_ADD_EXAMPLES = """\
examples:
  zonewatch-collector exceptions add --rule port_scan_vertical --peer 10.20.0.5 --reason "备份服务器巡检" \\
      --owner 张三 --expires 90d
  zonewatch-collector exceptions add --rule '*' --host web-01 --port 22 --reason "vendor maintenance" \\
      --owner alice --expires 2027-03-31
"""
EXCEPTION_LIST_EXAMPLES = """\
examples:
  zonewatch-collector exceptions list
  zonewatch-collector exceptions list --all --format csv
"""
EXCEPTION_REMOVE_EXAMPLES = """\
examples:
  zonewatch-collector exceptions remove 3 --by 张三
"""


def _wrap(description: str) -> str:
    """Descriptions wrapped here: the raw formatter that keeps the examples' lines keeps theirs too."""
    return textwrap.fill(description, 88)


def _examples(action: str, comment_required: bool) -> str:
    comment = ' --comment "原因"' if comment_required else ' --comment "值班已处理"'
    return (
        "examples:\n"
        f"  zonewatch-collector incidents {action} 42 --by 张三{comment}\n"
        f"  zonewatch-collector incidents {action} 42 --by alice --comment 'see ticket OPS-1234'\n"
    )


# subcommand -> (store action, help, description, comment required)
_ACTIONS = {
    "ack": (
        "acknowledge",
        "acknowledge an open incident: someone is on it",
        "Mark an open incident acknowledged. It stays active: further matches still count into it.",
        False,
    ),
    "resolve": (
        "resolve",
        "close an open or acknowledged incident as dealt with",
        "Close an active incident as resolved. A later match of the same rule and key opens a new "
        "incident; this one stays as judged.",
        False,
    ),
    "false-positive": (
        "false_positive",
        "close an open or acknowledged incident as a false positive",
        "Close an active incident as a false positive. To keep such matches from raising again, "
        "record an exception (zonewatch-collector exceptions add).",
        False,
    ),
    "reopen": (
        "reopen",
        "reopen a resolved or false-positive incident (a comment says why)",
        "Make a closed incident open again. --comment is required: the audit log says why.",
        True,
    ),
    "comment": (
        "comment",
        "add a comment to an incident, whatever its status",
        "Record a comment in the incident's history (and the audit chain) without changing its status.",
        True,
    ),
}


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    """Add `incidents` and `exceptions` to the collector's subcommands; return their handlers.

    range_args is taken so every command module registers alike; incidents have no --until (an
    incident is listed by when it was last seen, and --since has no default).
    """
    del range_args
    raw = argparse.RawDescriptionHelpFormatter
    inc = sub.add_parser(
        "incidents",
        help="incidents the rules raised: list, show, acknowledge, resolve, reopen, verify the audit log",
        description=_wrap(
            "One incident per rule and deduplication key while it is active (open or "
            "acknowledged); further matches count into it. Every operator action is signed (--by) and "
            "kept in an append-only, hash-chained audit log."
        ),
        epilog=INCIDENTS_EXAMPLES,
        formatter_class=raw,
    )
    actions = inc.add_subparsers(
        dest="incidents_command",
        required=True,
        metavar="ACTION",
        help="list, show, report, ack, resolve, false-positive, reopen, comment or verify",
    )
    listing = actions.add_parser(
        "list",
        help="incidents, the most recently seen first (default: the active ones)",
        description=_wrap(
            "Incidents with their host, first and last match and how many matches, the most "
            "recently seen first."
        ),
        epilog=LIST_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(listing)
    format_arg(listing)
    listing.add_argument(
        "--status",
        choices=tuple(incidents.STATUS_FILTERS),
        default="active",
        help="active (open and acknowledged, the default), all, or one status",
    )
    listing.add_argument(
        "--severity", choices=incidents.SEVERITIES, help="only incidents at least this severe"
    )
    listing.add_argument("--rule", metavar="NAME", help="only this rule (its name or Sigma id)")
    listing.add_argument(
        "--agent", metavar="HOST_OR_ID", help="only this host: agent id, id prefix or hostname"
    )
    listing.add_argument("--department", help="only hosts of this department (exact name)")
    listing.add_argument(
        "--since",
        help="only incidents seen since: 15m, 24h, 7d, 2026-11-28 or 2026-11-28T07:00 (default: any)",
    )
    listing.add_argument(
        "--limit", type=int, default=200, metavar="N", help="at most N incidents (default 200)"
    )
    _follow_args(listing)

    show = actions.add_parser(
        "show",
        help="one incident: rule, host, evidence, processes and its action history",
        description=_wrap(
            "Everything known of one incident: the rule, severity and status, the host and its "
            "labels, the deduplication fields, first and last match and their count, the evidence events and "
            "processes, and who did what to it, when and why."
        ),
        epilog=SHOW_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(show)
    show.add_argument("id", type=int, help="the incident's id (incidents list)")
    show.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")

    report = actions.add_parser(
        "report",
        help="one incident as a self-contained HTML file (to mail, archive or print)",
        description=_wrap(
            "Write what `incidents show` prints as one HTML file: inline CSS, nothing fetched, "
            "prints to A4, in Chinese or English; the incident is also embedded as JSON, as "
            "`incidents show --format json` prints it."
        ),
        epilog=REPORT_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(report)
    report.add_argument("id", type=int, help="the incident's id (incidents list)")
    cli_report.add_lang_arg(report)
    cli_report.add_out_arg(report)

    for name, (_, helptext, description, comment_required) in _ACTIONS.items():
        parser = actions.add_parser(
            name,
            help=helptext,
            description=_wrap(description),
            epilog=_examples(name, comment_required),
            formatter_class=raw,
        )
        db_arg(parser)
        parser.add_argument("id", type=int, help="the incident's id (incidents list)")
        parser.add_argument("--by", required=True, metavar="NAME", help="who takes the action (recorded)")
        parser.add_argument(
            "--comment",
            required=comment_required,
            default="",
            metavar="TEXT",
            help="why (recorded; required)" if comment_required else "why, or what was done (recorded)",
        )

    verify = actions.add_parser(
        "verify",
        help="check the audit log: exit 1 and the first bad row when it was tampered with",
        description=_wrap(
            "Recompute the audit log's hash chain and check every incident's status against "
            "its actions. Prints the head hash: note it down, and a later chain rewritten whole from an "
            "earlier row shows as a different head."
        ),
        epilog=VERIFY_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(verify)
    verify.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")

    exc = sub.add_parser(
        "exceptions",
        help="rule exceptions: matches an operator accepted, scoped and always expiring",
        description=_wrap(
            "An exception keeps a rule's matches from raising incidents, for one rule (or all), "
            "narrowed by host, peer network and port. It has a reason, an owner and an expiry at most 366 "
            "days ahead; removal is recorded."
        ),
        epilog=EXCEPTION_ADD_EXAMPLES
        + EXCEPTION_LIST_EXAMPLES.removeprefix("examples:\n")
        + EXCEPTION_REMOVE_EXAMPLES.removeprefix("examples:\n"),
        formatter_class=raw,
    )
    exc_actions = exc.add_subparsers(
        dest="exceptions_command", required=True, metavar="ACTION", help="add, list or remove"
    )
    add = exc_actions.add_parser(
        "add",
        help="record an exception (reason, owner and expiry are required)",
        description=_wrap(
            "Record an exception. Without --host, --peer or --port it covers every host, peer or "
            "port of the rule. --expires is required: no exception lasts forever."
        ),
        epilog=EXCEPTION_ADD_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(add)
    add.add_argument("--rule", required=True, help="the rule's name or Sigma id, or '*' for every rule")
    add.add_argument("--host", default="", help="only this host: agent id or hostname (default any)")
    add.add_argument(
        "--peer", default="", metavar="CIDR", help="only this peer address or network (default any)"
    )
    add.add_argument("--port", type=int, default=0, metavar="N", help="only this port (default any)")
    add.add_argument("--reason", required=True, help="why these matches are accepted")
    add.add_argument("--owner", required=True, metavar="NAME", help="who answers for the exception")
    add.add_argument(
        "--expires",
        metavar="WHEN",
        help="required: 30d (from now), 2027-03-31 or 2027-03-31T18:00; at most 366 days ahead",
    )
    exc_list = exc_actions.add_parser(
        "list",
        help="the exceptions in force (--all: expired and removed ones too)",
        description=_wrap(
            "The exceptions in force, soonest to expire first; --all lists every one ever "
            "recorded, newest first, with its status."
        ),
        epilog=EXCEPTION_LIST_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(exc_list)
    format_arg(exc_list)
    exc_list.add_argument("--all", action="store_true", help="also expired and removed exceptions")
    remove = exc_actions.add_parser(
        "remove",
        help="end an exception now (recorded, not deleted)",
        description=_wrap("End an exception before its expiry; who ended it is recorded."),
        epilog=EXCEPTION_REMOVE_EXAMPLES,
        formatter_class=raw,
    )
    db_arg(remove)
    remove.add_argument("id", type=int, help="the exception's id (exceptions list)")
    remove.add_argument("--by", required=True, metavar="NAME", help="who removes it (recorded)")
    return {"incidents": cmd_incidents, "exceptions": cmd_exceptions}


def cmd_incidents(args: argparse.Namespace) -> int:
    command = args.incidents_command
    if command == "list":
        return _guarded(_list, args, write=False)
    if command == "show":
        return _guarded(_show, args, write=False)
    if command == "report":
        return _guarded(_report, args, write=False)
    if command == "verify":
        return _guarded(_verify, args, write=False)
    return _guarded(_act, args, write=True)


def cmd_exceptions(args: argparse.Namespace) -> int:
    handler = {"add": _add_exception, "list": _list_exceptions, "remove": _remove_exception}
    return _guarded(handler[args.exceptions_command], args, write=args.exceptions_command != "list")


def _guarded(
    handler: Callable[[argparse.Namespace, sqlite3.Connection, int], int],
    args: argparse.Namespace,
    write: bool,
) -> int:
    """Open the database, run the handler; a CollectorError is one line on stderr and exit 1."""
    from collector.store.database import open_database

    try:
        # Readers do not migrate (the running collector does), writers do as every writer does.
        db = open_database(args.db, readonly=not write, create=False)
        try:
            if not write:
                incidents.require_current_schema(db, args.db)
            from collector.cli import now_ms  # here: collector.cli imports this module

            return handler(args, db, now_ms())
        finally:
            db.close()
    except CollectorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a query the store did not translate: still one line
        print(f"{PROG}: error: database: {exc}", file=sys.stderr)
        return 1


# --- incidents ---------------------------------------------------------------------------------


def _list(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    from collector.store.queries import resolve_agent

    if args.follow:
        return _follow(args, db, now)
    rows = incidents.list_incidents(
        db,
        status=args.status,
        severity=args.severity,
        rule=args.rule,
        agent=resolve_agent(db, args.agent) if args.agent else None,
        department=args.department,
        since_ms=parse_time(args.since, now) if args.since else None,
        limit=args.limit,
    )
    if args.format != "table":
        render(rows, args.format, INCIDENT_FIELDS, sys.stdout)
    elif not rows:
        status = "" if args.status == "all" else f"{args.status.replace('_', ' ')} "
        print(f"no {status}incidents" + (" matching the filters" if _filtered(args) else ""))
    else:
        print_incident_table(rows, sys.stdout)
        if len(rows) == args.limit:
            print(
                f"{PROG}: note: the {args.limit} most recently seen shown; --limit for more", file=sys.stderr
            )
    return 0


def _filtered(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) for name in ("severity", "rule", "agent", "department", "since"))


def print_incident_table(rows: Sequence[incidents.IncidentRow], stream: TextIO) -> None:
    """The table of `incidents list`: severity and status coloured on a terminal (rich leaves the
    colours out in a pipe), Chinese text aligned by its display width."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, highlight=False)
    for header in ("id", "severity", "status", "rule", "host", "department", "first seen", "last seen"):
        table.add_column(header, justify="right" if header == "id" else "left", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("title", no_wrap=True)
    for r in rows:
        title = Text(r.title)
        title.truncate(60, overflow="ellipsis")
        table.add_row(
            str(r.id),
            Text(r.severity, style=SEVERITY_STYLE.get(r.severity, "")),
            Text(r.status.replace("_", " "), style=STATUS_STYLE.get(r.status, "")),
            r.rule,
            r.hostname or r.agent_id[:12] or "-",
            r.department or "-",
            local_time(r.first_seen_ms),
            local_time(r.last_seen_ms),
            f"{r.matches:,}",
            title,
        )
    console = Console(file=stream, highlight=False)
    # As wide as the table, as output.render does: squeezed, rich would cut the times.
    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    console.width = max(console.width, natural)
    console.print(table)


# --- incidents list --follow -------------------------------------------------------------------

# json and csv lines of --follow: what happened, the state before an update, then the incident.
FOLLOW_FIELDS = ("change", "previous_status", "previous_matches", *incidents.IncidentRow._fields)
CHANGE_STYLE = {"current": "dim", "new": "bold", "updated": "cyan"}
# The --follow table's columns: (header, width in terminal cells, alignment); the title is last, unpadded.
FOLLOW_COLUMNS = (
    ("time", 19, "<"), ("change", 7, "<"), ("id", 5, ">"), ("severity", 13, "<"), ("status", 14, "<"),
    ("rule", 24, "<"), ("host", 16, "<"), ("department", 22, "<"), ("count", 6, ">"), ("title", 0, "<"),
)  # fmt: skip


def _follow_args(listing: argparse.ArgumentParser) -> None:
    listing.add_argument(
        "--follow",
        action="store_true",
        help="keep watching: after the incidents as they are now, print each new incident and each whose "
        "count or status changes, one line each, until Ctrl-C (json: one object per line)",
    )
    listing.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with --follow: how often to read the database (default 2)",
    )
    listing.add_argument(
        "--max-seconds",
        type=float,
        metavar="N",
        help="with --follow: stop after N seconds, exit 0 (default: until Ctrl-C)",
    )


class Change(NamedTuple):
    """One line of --follow: an incident as it is now, and what it was before an update."""

    change: str  # "current" (there when following began), "new" or "updated"
    row: incidents.IncidentRow
    previous: tuple[str, int] | None  # (status, matches) before an update


class _Watch:
    """What --follow has seen: each incident's (status, matches), and which matched the filters."""

    def __init__(self, db: sqlite3.Connection, query: Callable[[], list[incidents.IncidentRow]]) -> None:
        self.db, self.query = db, query
        self.known: dict[int, tuple[str, int]] = {}
        self.matching: set[int] = set()

    def poll(self) -> list[Change]:
        """The changes since the last poll, in the order they happened (when each incident changed)."""
        rows = self.query()
        # One that no longer matches (resolved while listing the active ones): read it to say so.
        gone = [self._read(i) for i in sorted(self.matching - {r.id for r in rows})]
        changes = []
        for row in [*rows, *(r for r in gone if r is not None)]:
            before = self.known.get(row.id)
            if before != (row.status, row.matches):
                changes.append(Change("new" if before is None else "updated", row, before))
            self.known[row.id] = (row.status, row.matches)
        self.matching = {r.id for r in rows}
        return sorted(changes, key=lambda c: (c.row.updated_ms or c.row.last_seen_ms, c.row.id))

    def _read(self, incident_id: int) -> incidents.IncidentRow | None:
        try:
            detail = incidents.incident_detail(self.db, incident_id)
        except incidents.IncidentError:  # gone from the database: nothing to say
            return None
        return incidents.IncidentRow._make(getattr(detail, f) for f in incidents.IncidentRow._fields)


def _follow(
    args: argparse.Namespace,
    db: sqlite3.Connection,
    now: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """`incidents list --follow`: the matching incidents as they are now (the --limit most recently
    changed, oldest first), then every --interval seconds each new or changed one; exit 0 on Ctrl-C or
    after --max-seconds. The database is only read."""
    from collector.store.queries import resolve_agent

    if not args.interval > 0:
        raise CollectorError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise CollectorError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    if args.limit < 1:
        raise CollectorError(f"--limit must be at least 1, got {args.limit}")
    agent = resolve_agent(db, args.agent) if args.agent else None
    since_ms = parse_time(args.since, now) if args.since else None

    def query() -> list[incidents.IncidentRow]:
        return incidents.list_incidents(
            db, status=args.status, severity=args.severity, rule=args.rule, agent=agent,
            department=args.department, since_ms=since_ms,
        )  # fmt: skip

    deadline = None if args.max_seconds is None else clock() + args.max_seconds
    write = _follow_writer(args.format, sys.stdout)
    watch = _Watch(db, query)
    try:
        first = watch.poll()
        for change in first[-args.limit :]:
            write(change._replace(change="current"))
        if len(first) > args.limit:
            print(f"{PROG}: note: the {args.limit} most recently changed shown first", file=sys.stderr)
        while deadline is None or clock() < deadline:
            sleep(args.interval if deadline is None else max(0.0, min(args.interval, deadline - clock())))
            for change in watch.poll():
                write(change)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # the reader left (| head): stop quietly, as tail -f does
        _silence_stdout()
    return 0


def _follow_writer(fmt: str, stream: TextIO) -> Callable[[Change], None]:
    """One line per change, flushed at once: a table line (severity and status coloured on a terminal,
    Chinese text padded by its display width), a JSON object or a CSV row after a header."""
    import csv

    from rich.console import Console

    def fields(c: Change) -> dict[str, Any]:
        previous = c.previous or (None, None)
        return {"change": c.change, "previous_status": previous[0], "previous_matches": previous[1],
                **c.row._asdict()}  # fmt: skip

    if fmt == "json":

        def write(c: Change) -> None:
            stream.write(json.dumps(fields(c), ensure_ascii=False) + "\n")
            stream.flush()

        return write
    if fmt == "csv":
        rows = csv.DictWriter(stream, FOLLOW_FIELDS, lineterminator="\n")
        rows.writeheader()
        stream.flush()

        def write_row(c: Change) -> None:
            rows.writerow(fields(c))
            stream.flush()

        return write_row
    console = Console(file=stream, highlight=False, soft_wrap=True)
    console.print(_follow_line([(name, "bold") for name, _, _ in FOLLOW_COLUMNS]))
    stream.flush()

    def write_line(c: Change) -> None:
        r = c.row
        line = _follow_line(
            [
                (local_time(r.updated_ms or r.last_seen_ms), ""),
                (c.change, CHANGE_STYLE.get(c.change, "")),
                (str(r.id), ""),
                (r.severity, SEVERITY_STYLE.get(r.severity, "")),
                (r.status.replace("_", " "), STATUS_STYLE.get(r.status, "")),
                (r.rule, ""),
                (r.hostname or r.agent_id[:12] or "-", ""),
                (r.department or "-", ""),
                (f"{r.matches:,}", ""),
                (r.title, ""),
            ]
        )
        if c.previous is not None:
            line.append(f"  ({_what_changed(c.previous, r)})", "cyan")
        console.print(line)
        stream.flush()

    return write_line


def _follow_line(cells: Sequence[tuple[str, str]]) -> Any:
    """One --follow table line: each (text, style) padded to its column's width in terminal cells (a
    Chinese character takes two), so lines align as long as no value is wider than its column."""
    from rich.cells import cell_len
    from rich.text import Text

    line = Text()
    for (_, width, align), (text, style) in zip(FOLLOW_COLUMNS, cells, strict=True):
        pad = " " * max(0, width - cell_len(text))
        if line:
            line.append("  ")
        if align == ">":
            line.append(pad)
        line.append(text, style)
        if align == "<":
            line.append(pad)
    line.rstrip()
    return line


def _what_changed(previous: tuple[str, int], row: incidents.IncidentRow) -> str:
    status, matches = previous
    said = []
    if status != row.status:
        said.append(f"{status} -> {row.status}".replace("_", " "))
    if matches != row.matches:
        more = row.matches - matches
        said.append(f"{more:+,} match{'' if abs(more) == 1 else 'es'}")
    return ", ".join(said)


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null: Python's flush at exit would fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _show(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    detail = incidents.incident_detail(db, args.id)
    if args.format == "json":
        json.dump(incidents.detail_document(detail), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        print_incident(detail, sys.stdout)
    return 0


def _report(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    from collector.report import render_incident_html

    detail = incidents.incident_detail(db, args.id)
    lang = args.lang or cli_report.default_lang()
    cli_report.write_html(args.out, render_incident_html(detail, lang, generated_ms=now))
    print(args.out)
    print(
        f"incident {detail.id} ({lang}): {detail.severity}, {detail.status.replace('_', ' ')}, "
        f"{len(detail.evidence.get('events') or [])} evidence events, {len(detail.actions)} actions"
    )
    return 0


def print_incident(d: incidents.IncidentDetail, out: TextIO) -> None:
    """`incidents show` as text: the incident, its host, evidence and history."""

    def line(label: str, value: str) -> None:
        out.write(f"{label + ':':<14}{value}\n")

    out.write(f"incident {d.id}  {d.severity}  {d.status.replace('_', ' ')}\n")
    line("title", d.title)
    rule = d.rule + (f"  (id {d.rule_id})" if d.rule_id else "")
    line("rule", rule + (f"  {d.rule_title}" if d.rule_title and d.rule_title != d.title else ""))
    host = d.hostname or "-"
    if d.agent_id:
        host += f"  (agent {d.agent_id})"
    line("host", host)
    labels = (("department", d.department), ("county", d.county), ("site", d.site), ("role", d.role))
    line("labels", ", ".join(f"{name} {value}" for name, value in labels if value) or "-")
    fields = ", ".join(f"{k}={_text(v)}" for k, v in sorted(d.dedup_fields.items()))
    line("dedup", fields or d.dedup_key)
    line("first seen", local_time(d.first_seen_ms))
    line("last seen", local_time(d.last_seen_ms))
    line("matches", f"{d.matches:,}")
    if d.updated_ms:
        line("updated", local_time(d.updated_ms))
    events = d.evidence.get("events")
    processes = d.evidence.get("processes")
    if isinstance(events, list) or isinstance(processes, list):
        events = events if isinstance(events, list) else []
        out.write(f"\nevidence: {len(events)} event{'s' if len(events) != 1 else ''}, oldest first\n")
        for event in events:
            _print_event(event, out)
        others = {k: v for k, v in d.evidence.items() if k not in ("events", "processes")}
        for key, value in sorted(others.items()):
            out.write(f"  {key}: {_text(value)}\n")
        if isinstance(processes, list) and processes:
            out.write(f"\nprocesses: {len(processes)}\n")
            for process in processes:
                _print_process(process, out)
    elif d.evidence:
        out.write("\nevidence:\n")
        for key, value in sorted(d.evidence.items()):
            out.write(f"  {key}: {_text(value)}\n")
    out.write("\nhistory:\n" if d.actions else "\nhistory: no action taken yet\n")
    for a in d.actions:
        change = (
            f"{a.from_status} -> {a.to_status}".replace("_", " ")
            if a.from_status != a.to_status
            else "comment"
        )
        out.write(f"  {local_time(a.time_ms)}  {a.actor}: {a.action.replace('_', ' ')} ({change})\n")
        if a.comment:
            for text in a.comment.splitlines():
                out.write(f"      {text}\n")


def _print_event(event: Any, out: TextIO) -> None:
    if not isinstance(event, dict):
        out.write(f"  - {_text(event)}\n")
        return
    time_ms = event.get("time_ms")
    when = local_time(time_ms) if isinstance(time_ms, int) and not isinstance(time_ms, bool) else "-"
    out.write(f"  - {when}  {event.get('category', '')}\n")
    for key, value in sorted(event.items()):
        if key in ("time_ms", "category") or key in HOST_FIELDS:
            continue
        out.write(f"      {key}: {_text(value)}\n")


def _print_process(process: Any, out: TextIO) -> None:
    if not isinstance(process, dict):
        out.write(f"  - {_text(process)}\n")
        return
    name = process.get("name", process.get("process", "")) or "(unattributed)"
    head = f"  - {name} (pid {process.get('pid', '-')})"
    if process.get("user"):
        head += f" user {process['user']}"
    out.write(head + "\n")
    for key, value in sorted(process.items()):
        if key not in ("name", "process", "pid", "user"):
            out.write(f"      {key}: {_text(value)}\n")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _act(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    action = _ACTIONS[args.incidents_command][0]
    done = incidents.act(db, args.id, action, args.by, args.comment, now)
    if done.from_status == done.to_status:
        print(f"incident {done.incident}: comment recorded (audit row {done.id})")
    else:
        print(
            f"incident {done.incident}: {done.from_status.replace('_', ' ')} -> "
            f"{done.to_status.replace('_', ' ')} by {done.actor} (audit row {done.id})"
        )
    return 0


def _verify(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    check = incidents.verify_audit(db)
    if args.format == "json":
        json.dump(check._asdict(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    elif check.ok:
        rows = f"{check.rows:,} row{'' if check.rows == 1 else 's'}"
        print(f"audit log intact: {rows}; head hash {check.head_hash}")
    else:
        print(f"audit log TAMPERED: {check.message}")
        if check.first_bad_id is not None:
            bad = incidents.audit_action(db, check.first_bad_id)
            if bad is not None:
                for name, value in bad._asdict().items():
                    print(f"  {name}: {value}")
    return 0 if check.ok else 1


# --- exceptions --------------------------------------------------------------------------------


class ExceptionView(NamedTuple):
    """An exception as the table shows it: "any" for an open scope."""

    id: int
    rule: str
    host: str
    peer: str
    port: str
    owner: str
    created_ms: int
    expires_ms: int
    status: str
    reason: str


def _view(row: exceptions.ExceptionRow) -> ExceptionView:
    status = row.status
    if row.removed_ms is not None:
        status = f"removed by {row.removed_by} {local_time(row.removed_ms)}"
    return ExceptionView(
        row.id,
        "* (every rule)" if row.rule == "*" else row.rule,
        row.host or "any",
        row.peer or "any",
        str(row.port) if row.port else "any",
        row.owner,
        row.created_ms,
        row.expires_ms,
        status,
        row.reason,
    )


def _add_exception(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    row = exceptions.add_exception(
        db,
        rule=args.rule,
        host=args.host,
        peer=args.peer,
        port=args.port,
        reason=args.reason,
        owner=args.owner,
        expires_ms=_expiry(args.expires, now),
        now_ms=now,
    )
    v = _view(row)
    print(
        f"exception {row.id}: rule {v.rule}, host {v.host}, peer {v.peer}, port {v.port}; "
        f"until {local_time(row.expires_ms)} (owner {row.owner})"
    )
    return 0


def _expiry(text: str | None, now: int) -> int | None:
    """--expires: a duration counts from now on ("30d": in 30 days), a date is that date."""
    if text is None or not text.strip():
        return None
    moment = parse_time(text, now)
    return now + (now - moment) if text.strip()[-1:] in ("s", "m", "h", "d") else moment


def _list_exceptions(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    rows = exceptions.list_exceptions(db, include_expired=args.all, now_ms=now)
    if args.format != "table":
        render(rows, args.format, EXCEPTION_FIELDS, sys.stdout)
        return 0
    empty = "no exceptions recorded" if args.all else "no exceptions in force (--all lists every one)"
    render([_view(r) for r in rows], "table", EXCEPTION_COLUMNS, sys.stdout, empty_message=empty)
    return 0


def _remove_exception(args: argparse.Namespace, db: sqlite3.Connection, now: int) -> int:
    row = exceptions.remove_exception(db, args.id, args.by, now)
    print(f"exception {row.id} removed by {row.removed_by}: rule {row.rule} raises again")
    return 0

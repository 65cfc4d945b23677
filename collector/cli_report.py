"""`zonewatch-collector report`: one HTML file of a period, for people who do not run the CLI.

It only wires: parse the period and filters, read the database (read-only) through
collector/report's gather, render, write the file. The report's language defaults to the
locale's (LC_ALL, then LC_MESSAGES, then LANG: zh* is Chinese, anything else English), read here
because the CLI is the only place that reads the environment. An error is one line on stderr
and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.errors import CollectorError

if TYPE_CHECKING:
    from collector.report.data import ReportData

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"

EXAMPLES = """\
examples:
  zonewatch-collector report --out weekly.html
  zonewatch-collector report --since 30d --department 市公安局 --lang zh --out 公安局-月报.html
  zonewatch-collector report --from 2026-11-01 --to 2026-12-01 --county 高新区 --out nov.html
  zonewatch-collector incidents report 42 --out incident-42.html
"""


def default_lang(environ: dict[str, str] | None = None) -> str:
    """The report language of the locale: the first of LC_ALL, LC_MESSAGES, LANG that is set."""
    from collector.report.i18n import lang_of_locale

    env = os.environ if environ is None else environ
    locale = next((env[name] for name in ("LC_ALL", "LC_MESSAGES", "LANG") if env.get(name)), "")
    return lang_of_locale(locale)


def add_lang_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lang",
        choices=("zh", "en"),
        default=None,
        help="the report's language (default: the locale's, from LC_ALL, LC_MESSAGES or LANG: "
        "zh_CN.UTF-8 gives zh, anything else en)",
    )


def add_out_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE.html", help="the HTML file to write (replaced)"
    )


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    """Add `report` to the collector's subcommands; return its handler.

    format_arg and range_args are taken so every command module registers alike: a report is
    HTML, and its period defaults to a week, not the hour other commands default to.
    """
    del format_arg, range_args
    report = sub.add_parser(
        "report",
        help="one self-contained HTML report of a period: incidents, link load, migration, coverage",
        description=textwrap.fill(
            "Write one HTML file (inline CSS and charts, nothing fetched, prints to A4) of a period: "
            "incidents by severity and status, per day, and each with its evidence and the actions "
            "taken; the load of the extranet links per day against their capacity; migration "
            "progress by department and county, regressed hosts and expiring exemptions; agents "
            "silent, capture loss and rejected input. Every figure is the one the matching command "
            "prints for the same period; they are also embedded as JSON "
            '(<script type="application/json" id="zonewatch-report-data">).',
            88,
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    db_arg(report)
    start = report.add_mutually_exclusive_group()
    start.add_argument(
        "--since",
        default="7d",
        help="the period's start, as long ago as this or at this time: 24h, 7d, 30d, 2026-11-01 (default 7d)",
    )
    start.add_argument(
        "--from",
        dest="from_",
        metavar="DATE",
        help="the period's start: 2026-11-01 (local midnight) or 2026-11-01T08:00",
    )
    report.add_argument(
        "--to",
        "--until",
        dest="to",
        default="now",
        metavar="DATE",
        help="the period's end, excluded: 2026-12-01 (local midnight), 2026-12-01T08:00 or now (default)",
    )
    report.add_argument("--department", help="only hosts of this department (exact name)")
    report.add_argument("--county", help="only hosts of this county or district (exact name)")
    add_lang_arg(report)
    add_out_arg(report)
    return {"report": cmd_report}


def cmd_report(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.output import parse_since
    from collector.report import gather, render_html

    lang = args.lang or default_lang()
    try:
        now = now_ms()
        since_ms, until_ms = parse_since(args.from_ or args.since, args.to, now_ms=now)
        with _database(args.db) as db, _progress() as progress:
            data = gather(
                db,
                since_ms=since_ms,
                until_ms=until_ms,
                department=args.department,
                county=args.county,
                now_ms=now,
                db_path=args.db,
                progress=progress,
            )
            progress(1, 1, "rendering")
            html = render_html(data, lang)
        write_html(args.out, html)
    except CollectorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(args.out)
    print(summary_line(data, lang))
    return 0


def summary_line(data: ReportData, lang: str) -> str:
    """One line of what the report holds: the period, incidents, links, migration, silent agents."""
    from collector.output import local_time

    s, m, c = data.summary, data.migration, data.coverage
    severe = ", ".join(f"{s.by_severity[v]} {v}" for v in ("critical", "high") if s.by_severity[v])
    return (
        f"{lang} report of {local_time(data.since_ms)} to {local_time(data.until_ms)}"
        f"{' for ' + ' / '.join(v for v in (data.department, data.county) if v) if data.filtered else ''}: "
        f"{s.incidents} incidents ({severe or 'none critical or high'}), {len(data.links)} extranet links, "
        f"{m.overall.pairs} host/network pairs {m.overall.percent_migrated:.1f} % migrated, "
        f"{c.agents.stale + c.agents.offline} of {c.agents.total} agents silent"
    )


@contextmanager
def _database(path: Path) -> Iterator[sqlite3.Connection]:
    """The database read-only, as every read command opens it; sqlite3 errors as one line."""
    from collector.errors import StoreError
    from collector.store.database import open_database

    db = open_database(path, readonly=True, create=False)
    try:
        yield db
    except sqlite3.Error as exc:  # a query the store did not translate: still one line
        raise StoreError(f"database: {exc}") from exc
    finally:
        db.close()


@contextmanager
def _progress() -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr (a terminal only: rich draws nothing into a pipe), gone when done."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("report", total=1)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=what)

    with bar:
        yield update


def write_html(path: Path, html: str) -> None:
    """Write the file whole or not at all: a reader never sees half a report.

    The file is readable by its owner only (the temporary file's mode): a report carries
    incident evidence, host names and command lines.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as out:
            try:
                out.write(html)
            except BaseException:
                os.unlink(out.name)
                raise
        try:
            os.replace(out.name, path)
        except BaseException:
            os.unlink(out.name)
            raise
    except OSError as exc:
        raise CollectorError(f"cannot write {path}: {exc.strerror or exc}") from exc

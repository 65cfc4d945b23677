"""`zonewatch-collector siem` and serve's --siem-* options: export incidents to a SIEM.

serve exports continuously (collector/siem/exporter.py); `siem status` shows each destination's
cursor, backlog and last error from the database; `siem export` writes a one-shot JSON lines file
(no cursor); `siem test` sends one test message to a syslog receiver and says whether its TCP
acknowledged it. This module only wires.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from agent import clidoc
from collector.errors import CollectorError
from collector.siem import DeliveryError
from collector.siem.config import DEFAULT_SD_ID, SiemConfig, parse_sd_id, parse_syslog_url

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"
PROGRESS_EVERY = 10_000  # incidents between two progress lines of `siem export`


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    """serve's SIEM export options."""
    serve.add_argument(
        "--siem-syslog",
        metavar="URL",
        help="export incidents as RFC 5424 syslog to tcp://HOST:PORT or tls://HOST:PORT (RFC 5425; "
        "default ports 514, 6514), at least once: each raised, changed or acted on (docs/siem.md)",
    )
    serve.add_argument(
        "--siem-ca",
        type=Path,
        metavar="FILE",
        help="CA certificates (PEM) a tls:// receiver is verified with (default: the system's)",
    )
    serve.add_argument(
        "--siem-facility",
        default="local0",
        metavar="NAME|N",
        help="syslog facility of the messages: local0-local7, authpriv, ... or 0-23 (default local0)",
    )
    serve.add_argument(
        "--siem-sd-id",
        default=DEFAULT_SD_ID,
        metavar="NAME@NUMBER",
        help="SD-ID of the incident's structured data, with your enterprise number "
        f"(default {DEFAULT_SD_ID}, the documentation number of RFC 5612)",
    )
    serve.add_argument(
        "--siem-jsonl",
        type=Path,
        metavar="FILE",
        help="also append every incident change to FILE as one JSON object per line, fsynced; a rotated "
        "file is created again",
    )
    serve.add_argument(
        "--siem-retry-max",
        type=float,
        default=SiemConfig.retry_max_s,
        metavar="SECONDS",
        help="longest wait between two attempts on a failing destination "
        f"(default {SiemConfig.retry_max_s:g})",
    )


def serve_config(args: argparse.Namespace) -> SiemConfig:
    from collector.siem.format import parse_facility

    if args.siem_ca is not None and args.siem_syslog is None:
        raise CollectorError("--siem-ca needs --siem-syslog tls://HOST:PORT")
    if not args.siem_retry_max > 0:
        raise CollectorError(f"--siem-retry-max must be positive, got {args.siem_retry_max:g}")
    if args.siem_jsonl is not None and not args.siem_jsonl.resolve().parent.is_dir():
        raise CollectorError(f"--siem-jsonl {args.siem_jsonl}: no such directory {args.siem_jsonl.parent}")
    syslog = parse_syslog_url(args.siem_syslog, args.siem_ca) if args.siem_syslog else None
    if syslog is not None and syslog.scheme == "tls":
        from collector.siem.transport import tls_context

        tls_context(str(syslog.ca_file) if syslog.ca_file else None)  # an unreadable CA file stops us here
    return SiemConfig(
        syslog=syslog,
        jsonl=args.siem_jsonl,
        facility=parse_facility(args.siem_facility),
        sd_id=parse_sd_id(args.siem_sd_id),
        retry_max_s=args.siem_retry_max,
    )


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    """Add `siem` to the collector's subcommands; return its handler."""
    del range_args  # an export has --since only: every change up to now
    siem = sub.add_parser(
        "siem",
        help="SIEM export: each destination's cursor and backlog, a one-shot JSON lines export, "
        "a test message",
        description="serve --siem-syslog and --siem-jsonl export every incident when it is raised and "
        "whenever it changes (more matches, an operator's action), at least once: each destination has a "
        "cursor in the database that moves only after delivery. These commands look at the export and help "
        "set it up.",
        epilog=clidoc.examples(
            PROG,
            "siem status",
            "siem export --jsonl incidents.jsonl --since 7d",
            "siem test --syslog tls://siem.example.gov.cn:6514 --ca /etc/zonewatch/siem-ca.pem",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    actions = siem.add_subparsers(
        dest="siem_command", required=True, metavar="ACTION", help="status, export or test"
    )
    status = actions.add_parser(
        "status",
        help="each destination: delivered up to which change, backlog, last delivery, last error",
        description="Every destination serve has exported to from this database: its cursor (the last "
        "incident change delivered), the backlog after it, messages delivered, the last delivery and the "
        "last error. State failing: the last attempt failed and nothing was delivered since. Exit status 1 "
        "when one is failing.",
        epilog=clidoc.examples(PROG, "siem status", "siem status --format json"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(status)
    format_arg(status)
    export = actions.add_parser(
        "export",
        help="write incidents as JSON lines once (no cursor), e.g. to load history into a SIEM",
        description="Every incident changed since --since (default: all), as it is now, one JSON object per "
        "line in the schema serve --siem-jsonl writes (docs/siem.md), in the order they changed. FILE is "
        "replaced once complete; - writes to stdout. The running collector's cursors are not touched.",
        epilog=clidoc.examples(
            PROG,
            "siem export --jsonl incidents.jsonl",
            "siem export --jsonl - --since 24h | gzip > today.jsonl.gz",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(export)
    export.add_argument("--jsonl", required=True, metavar="FILE|-", help="the file to write, - for stdout")
    export.add_argument(
        "--since",
        help="only incidents changed since: 15m, 24h, 7d, 2026-11-28 or 2026-11-28T07:00 (default: all)",
    )
    test = actions.add_parser(
        "test",
        help="send one test message to a syslog receiver and report whether it was acknowledged",
        description="Connect to the receiver as serve --siem-syslog would (TLS verified with --ca), send one "
        "RFC 5424 notice with MSGID test, and wait for the receiver's TCP acknowledgement. Exit 1 when it "
        "fails, with the reason.",
        epilog=clidoc.examples(
            PROG,
            "siem test --syslog tcp://10.10.0.20:514",
            "siem test --syslog tls://siem.example.gov.cn:6514 --ca /etc/zonewatch/siem-ca.pem",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    test.add_argument("--syslog", required=True, metavar="URL", help="tcp://HOST:PORT or tls://HOST:PORT")
    test.add_argument(
        "--ca", type=Path, metavar="FILE", help="CA certificates (PEM) for tls:// (default: the system's)"
    )
    test.add_argument(
        "--facility", default="local0", metavar="NAME|N", help="syslog facility (default local0)"
    )
    test.add_argument(
        "--sd-id", default=DEFAULT_SD_ID, metavar="NAME@NUMBER", help=f"SD-ID (default {DEFAULT_SD_ID})"
    )
    test.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="connect and acknowledgement timeout (default 10)",
    )
    return {"siem": cmd_siem}


def cmd_siem(args: argparse.Namespace) -> int:
    command = args.siem_command
    if command == "test":
        return _test(args)
    try:
        return _status(args) if command == "status" else _export(args)
    except BrokenPipeError:  # | head: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class StatusView(NamedTuple):
    destination: str
    state: str
    change_seq: int
    backlog: int
    delivered: int
    last_delivery_ms: int | None
    last_error_ms: int | None
    last_error: str


STATUS_EMPTY = "no SIEM export from this database yet (serve --siem-syslog URL or --siem-jsonl FILE)"


def _status(args: argparse.Namespace) -> int:
    from collector.output import Column, render
    from collector.store.export import cursor_statuses

    statuses = cursor_statuses(_open(args.db))
    if args.format == "json":
        render(statuses, "json", None, sys.stdout)
    else:
        columns = (
            Column("destination", "destination"),
            Column("state", "state"),
            Column("change_seq", "cursor", "int"),
            Column("backlog", "backlog", "int"),
            Column("delivered", "delivered", "int"),
            Column("last_delivery_ms", "last delivery", "time"),
            Column("last_error_ms", "last error", "time"),
            Column("last_error", "error", max_width=60),
        )
        views = [StatusView(*(getattr(s, f) for f in StatusView._fields)) for s in statuses]
        render(views, args.format, columns, sys.stdout, empty_message=STATUS_EMPTY)
    return 1 if any(s.state == "failing" for s in statuses) else 0


def _open(path: Path) -> Any:
    from collector.store.database import open_database
    from collector.store.incidents import require_current_schema

    db = open_database(path, readonly=True)
    require_current_schema(db, path)
    return db


def _export(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.output import parse_time
    from collector.siem.format import json_line, local_hostname
    from collector.store.export import changes_since

    since_ms = parse_time(args.since, now_ms()) if args.since else None
    db = _open(args.db)
    hostname = local_hostname()
    lines = (json_line(change, hostname=hostname) for change in changes_since(db, since_ms))
    if args.jsonl == "-":
        count = _write(lines, sys.stdout.buffer, "stdout")
        sys.stdout.flush()
    else:
        count = _write_file(Path(args.jsonl), lines)
    print(f"{PROG}: exported {count} incident{'' if count == 1 else 's'} to {args.jsonl}", file=sys.stderr)
    return 0


def _write(lines: Any, stream: Any, where: str) -> int:
    count = 0
    for line in lines:
        stream.write(line)
        count += 1
        if count % PROGRESS_EVERY == 0:
            print(f"{PROG}: {count} incidents written to {where} …", file=sys.stderr)
    return count


def _write_file(path: Path, lines: Any) -> int:
    """Written beside FILE and renamed over it once complete and fsynced: never half a file."""
    if not path.resolve().parent.is_dir():
        raise CollectorError(f"cannot write {path}: no such directory {path.parent}")
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            count = _write(lines, out, str(path))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise CollectorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return count


def _test(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.siem.format import facility_name, frame, local_hostname, parse_facility, syslog_test
    from collector.siem.transport import SyslogClient

    if not args.timeout > 0:
        raise CollectorError(f"--timeout must be positive, got {args.timeout:g}")
    target = parse_syslog_url(args.syslog, args.ca)
    facility = parse_facility(args.facility)
    message = syslog_test(
        hostname=local_hostname(), facility=facility, sd_id=parse_sd_id(args.sd_id), time_ms=now_ms()
    )
    client = SyslogClient(target, timeout_s=args.timeout)
    try:
        delivery = client.send([frame(message)])
    except DeliveryError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(
        f"{target.url}: test message delivered ({delivery.bytes} bytes, facility {facility_name(facility)}, "
        f"severity notice); the receiver's TCP acknowledged it in {delivery.ack_ms:.1f} ms"
    )
    return 0

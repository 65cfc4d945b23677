"""`zonewatch-collector tiers list|incidents|migration|traffic`: the upstream's view, grouped by tier
(the parsers are in cli_tiers.py; the queries in store/tiers_view.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from collector.errors import CollectorError


def _open(args: argparse.Namespace) -> Any:
    from collector.store.database import open_database
    from collector.store.incidents import require_current_schema

    db = open_database(args.db, readonly=True)
    require_current_schema(db, args.db)
    return db


def cmd_list(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.output import Column, render
    from collector.store.tiers_view import list_tiers

    db = _open(args)
    try:
        rows = list_tiers(db, now_ms())
    finally:
        db.close()
    columns = [
        Column("tier", "tier"),
        Column("last_report_ms", "last report", "time"),
        Column("lag_s", "lag s"),
        Column("backlog", "backlog", "int"),
        Column("critical", "critical", "int"),
        Column("high", "high", "int"),
        Column("medium", "medium", "int"),
        Column("low", "low", "int"),
        Column("hosts", "pairs", "int"),
        Column("migrated_pct", "migrated", "pct"),
        Column("regressed", "regressed", "int"),
        Column("peak_zone", "busiest link"),
        Column("peak_utilization", "peak load", "percent"),
    ]
    render(rows, args.format, columns, sys.stdout)
    return 0


def cmd_incidents(args: argparse.Namespace) -> int:
    from collector.output import Column, render
    from collector.store.tiers_view import tier_incidents

    if args.limit is not None and args.limit < 1:
        raise CollectorError(f"--limit must be at least 1, got {args.limit}")
    db = _open(args)
    try:
        rows = tier_incidents(
            db, tier=args.tier, status=args.status, severity=args.severity, limit=args.limit
        )
    finally:
        db.close()
    columns = [
        Column("tier", "tier"),
        Column("incident_id", "id", "int"),
        Column("severity", "severity"),
        Column("status", "status"),
        Column("title", "title", max_width=60),
        Column("hostname", "host"),
        Column("department", "department"),
        Column("county", "county"),
        Column("matches", "matches", "int"),
        Column("last_seen_ms", "last seen", "time"),
    ]
    render(rows, args.format, columns, sys.stdout, empty_message="no incidents from lower tiers")
    return 0


def cmd_migration(args: argparse.Namespace) -> int:
    from collector.output import Column, render
    from collector.store.tiers_view import tier_migration

    db = _open(args)
    try:
        rows = tier_migration(db, by=args.by)
    finally:
        db.close()
    columns = [
        Column("group", args.by),
        Column("pairs", "pairs", "int"),
        *(
            Column(s, s.replace("_", " "), "int")
            for s in ("not_started", "dual_homed", "migrated", "regressed", "exempt", "unknown")
        ),
        Column("percent_migrated", "migrated", "pct"),
    ]
    render(rows, args.format, columns, sys.stdout, empty_message="no migration states yet")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.output import Column, check_range, parse_time, render
    from collector.store.tiers_view import tier_traffic

    now = now_ms()
    since, until = parse_time(args.since, now), parse_time(args.until, now)
    check_range(since, until)
    db = _open(args)
    try:
        rows = tier_traffic(db, since_ms=since, until_ms=until, tier=args.tier)
    finally:
        db.close()
    columns = [
        Column("tier", "tier"),
        Column("zone", "zone"),
        Column("direction", "direction"),
        Column("hours", "hours", "int"),
        Column("rx_bytes", "in", "bytes"),
        Column("tx_bytes", "out", "bytes"),
        Column("peak_bps", "peak", "bps"),
        Column("capacity_bps", "capacity", "speed"),
        Column("peak_utilization", "peak load", "percent"),
        Column("hosts", "hosts", "int"),
    ]
    render(rows, args.format, columns, sys.stdout, empty_message="no traffic from lower tiers in this range")
    return 0

"""`zonewatch-collector migration`: fleet progress, one host's evidence and blockers, exemptions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from agent import clidoc
from collector.migration import DAY_MS, STATES
from collector.store.migration import GroupProgress, Pair

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"


class TrendRow(NamedTuple):
    bucket_end_ms: int
    not_started: int
    dual_homed: int
    migrated: int
    regressed: int
    exempt: int
    unknown: int


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    mig = sub.add_parser(
        "migration",
        help="dedicated-network migration: progress by department/county/network, hosts, exemptions",
        description="Per host and dedicated network: not_started (dedicated only), dual_homed (both), "
        "migrated (no dedicated address, route or traffic for the quiet period), regressed (dedicated "
        "traffic after migrated), exempt (approved exception) or unknown (no recent data). Without an "
        "action: counts and percentage per state for each group, the regressed hosts and the exemptions "
        "expiring within 14 days.",
        epilog=clidoc.examples(
            PROG,
            "migration --by county",
            "migration --state regressed --format csv",
            "migration --history --since 90d",
            "migration host ga-ws-01",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(mig)
    format_arg(mig)
    mig.add_argument(
        "--by",
        choices=("department", "county", "network"),
        default="department",
        help="group the counts by (default department)",
    )
    mig.add_argument("--state", choices=STATES, help="list the host/network pairs in this state instead")
    mig.add_argument("--network", help="only this dedicated network")
    mig.add_argument(
        "--history", action="store_true", help="the trend: pairs per state at the end of each day"
    )
    range_args(mig)
    actions = mig.add_subparsers(
        dest="migration_command", metavar="ACTION", help="host, exempt or unexempt (none: the fleet view)"
    )
    host = actions.add_parser(
        "host",
        help="one host: state, evidence and blockers per dedicated network",
        description="The evidence behind each state: dedicated and extranet addresses, "
        "routes and traffic, and the blockers: processes, users, peers and ports still "
        "exchanging traffic with the dedicated network.",
        epilog=clidoc.examples(PROG, "migration host ga-ws-01", "migration host 3f9a2c1e --format json"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(host)
    format_arg(host)
    host.add_argument("host", help="agent id (or its first characters) or hostname")
    exempt = actions.add_parser(
        "exempt",
        help="approve an exception for a host and network",
        description="Record an approved exception: the pair is exempt until the "
        "expiry, then judged again. Reason, approver and expiry are required.",
        epilog=clidoc.examples(
            PROG,
            'migration exempt ga-db-02 --network 公安专网 --reason "旧计费系统" --approved-by 张三 '
            "--reference OA-2026-118 --until 2027-03-31",
            'migration exempt ga-ws-07 --network 公安专网 --reason "vendor support" --approved-by alice '
            "--until 90d",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(exempt)
    exempt.add_argument("host", help="agent id (or its first characters) or hostname")
    exempt.add_argument("--network", required=True, help="the dedicated network (zone name)")
    exempt.add_argument("--reason", required=True, help="why the host may stay on it")
    exempt.add_argument("--approved-by", required=True, help="who approved the exception")
    exempt.add_argument("--reference", default="", help="the approval's reference (document, ticket)")
    exempt.add_argument("--until", required=True, help="expiry: 2027-03-31, 2027-03-31T18:00 or 90d")
    unexempt = actions.add_parser(
        "unexempt",
        help="end an exception before its expiry",
        description="End the exception in force for a host and network.",
        epilog=clidoc.examples(PROG, "migration unexempt ga-db-02 --network 公安专网 --by 张三"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(unexempt)
    unexempt.add_argument("host", help="agent id (or its first characters) or hostname")
    unexempt.add_argument("--network", required=True, help="the dedicated network (zone name)")
    unexempt.add_argument("--by", dest="ended_by", default="", help="who ended it (recorded)")
    return {"migration": cmd_migration}


def cmd_migration(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.store.database import open_database

    action = getattr(args, "migration_command", None)
    writes = action in ("exempt", "unexempt")
    db = open_database(args.db, readonly=not writes, create=False)
    try:
        if action == "host":
            return _host(args, db)
        if action == "exempt":
            return _exempt(args, db, now_ms())
        if action == "unexempt":
            return _unexempt(args, db, now_ms())
        return _fleet(args, db, now_ms())
    finally:
        db.close()


def _fleet(args: argparse.Namespace, db: Any, now: int) -> int:
    from collector.output import check_range, parse_time, render
    from collector.store import migration

    rows = migration.states(db, network=args.network)
    if args.history:
        since, until = (
            parse_time(args.since if args.since != "1h" else "30d", now),
            parse_time(args.until, now),
        )
        check_range(since, until)
        trend = [TrendRow(**t) for t in migration.trend(db, since_ms=since, until_ms=until, bucket_ms=DAY_MS)]
        render(trend, args.format, _columns(TrendRow, time_field="bucket_end_ms"), sys.stdout)
        return 0
    if args.state:
        pairs = [migration.pair(r) for r in rows if r.state == args.state]
        render(
            pairs,
            args.format,
            _columns(Pair, time_field="since_ms"),
            sys.stdout,
            empty_message=f"no host is {args.state}",
        )
        return 0
    groups = migration.progress(rows, args.by)
    regressed = [migration.pair(r) for r in rows if r.state == "regressed"]
    expiring = [e for e in migration.exemptions(db, now) if e.until_ms - now <= migration.EXPIRING_MS]
    if args.format == "json":
        json.dump(
            {
                "by": args.by,
                "groups": [g._asdict() for g in groups],
                "regressed": [r._asdict() for r in regressed],
                "expiring_exemptions": [e._asdict() for e in expiring],
            },
            sys.stdout,
            ensure_ascii=False,
            indent=2,
        )
        sys.stdout.write("\n")
        return 0
    render(
        groups,
        args.format,
        _columns(GroupProgress, first_header=args.by),
        sys.stdout,
        empty_message="no migration states yet (a zone catalog with dedicated networks, and agents)",
    )
    if args.format == "table":
        if regressed:
            print("\nregressed: dedicated-network traffic after migrating")
            render(regressed, "table", _columns(Pair, time_field="since_ms"), sys.stdout)
        if expiring:
            print("\nexemptions expiring within 14 days")
            render(expiring, "table", None, sys.stdout)
    return 0


def _host(args: argparse.Namespace, db: Any) -> int:
    from collector.store import migration
    from collector.store.queries import resolve_agent

    rows = migration.states(db, agent=resolve_agent(db, args.host))
    if args.format == "json":
        json.dump([r._asdict() for r in rows], sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.format == "csv":
        from collector.output import render

        render([migration.pair(r) for r in rows], "csv", None, sys.stdout)
        return 0
    if not rows:
        print("no migration state for this host yet")
        return 0
    for r in rows:
        e = r.evidence
        print(f"{r.hostname} ({r.agent_id[:12]})  {r.department} {r.county}  network {r.network}: {r.state}")
        for side in ("dedicated", "extranet"):
            s = e.get(side, {})
            print(f"  {side:<10} addresses: {', '.join(s.get('addresses', [])) or '-'}")
            print(f"  {'':<10} routes:    {'; '.join(s.get('routes', [])) or '-'}")
            print(
                f"  {'':<10} traffic:   {s.get('bytes', 0)} bytes, last at {_when(s.get('last_traffic_ms'))}"
            )
        if "exemption" in e:
            x = e["exemption"]
            print(
                f"  exempt until {_when(x['until_ms'])}: {x['reason']} (approved by {x['approved_by']},"
                f" {x['reference'] or 'no reference'})"
            )
        if e.get("blockers"):
            print("  blockers (still exchanging traffic with it):")
            for b in e["blockers"]:
                print(
                    f"    {b['process'] or '(unattributed)'} user {b['user'] or '-'} -> {b['remote_addr']}:"
                    f"{b['remote_port']} {b['bytes']} bytes in {b['flows']} flows  {b['cmdline'][:80]}"
                )
    return 0


def _exempt(args: argparse.Namespace, db: Any, now: int) -> int:
    from collector.output import parse_time
    from collector.store import migration
    from collector.store.queries import resolve_agent

    key = resolve_agent(db, args.host)
    # A duration means from now on ("90d": in 90 days), unlike --since's "ago"; a date is a date.
    ago = parse_time(args.until, now)
    until = now + (now - ago) if args.until.strip()[-1:] in ("s", "m", "h", "d") else ago
    exemption = migration.exempt(
        db,
        key,
        args.network,
        reason=args.reason,
        approved_by=args.approved_by,
        reference=args.reference,
        until_ms=until,
        now_ms=now,
    )
    print(f"exemption {exemption}: {args.host} may stay on {args.network} until {_when(until)}")
    return 0


def _unexempt(args: argparse.Namespace, db: Any, now: int) -> int:
    from collector.store import migration
    from collector.store.queries import resolve_agent

    migration.unexempt(db, resolve_agent(db, args.host), args.network, now, args.ended_by)
    print(f"the exemption of {args.host} for {args.network} is ended; it is judged again now")
    return 0


def _columns(record: type, *, time_field: str = "", first_header: str = "") -> list[Any]:
    from collector.output import Column

    columns = []
    for i, name in enumerate(record._fields):  # type: ignore[attr-defined]
        kind = "time" if name == time_field else ("int" if name in STATES or name == "pairs" else "text")
        header = first_header if i == 0 and first_header else name.replace("_", " ")
        columns.append(Column(name, header, kind))
    return columns


def _when(ms: int | None) -> str:
    if not ms:
        return "never"
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M")

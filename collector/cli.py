"""zonewatch-collector: the command line. It only wires: parse, build the config, call, print.

Library errors (CollectorError) become one readable line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import clidoc, logfmt
from collector import (
    __version__,
    cli_bundle,
    cli_explore,
    cli_incidents,
    cli_migration,
    cli_report,
    cli_rules,
    cli_siem,
    cli_tiers,
    cli_trust,
)
from collector.config import DEFAULT_DB, DEFAULT_LISTEN, CollectorConfig, default_rules_dir
from collector.errors import CollectorError
from collector.migration import MigrationPolicy
from collector.policy import AgentPolicy
from collector.store.retention import RetentionPolicy

FORMATS = ("table", "json", "csv")
PROG = "zonewatch-collector"

EXAMPLES = """\
examples:
  zonewatch-collector serve --db /var/lib/zonewatch/collector.db --listen 0.0.0.0:7390
  zonewatch-collector agents --status offline
  zonewatch-collector bandwidth --since 1h --top 10
  zonewatch-collector bandwidth --agent web-01 --iface eth0 --since 2026-11-27 --until 2026-11-28 --format csv
  zonewatch-collector watch
  zonewatch-collector traffic --by zone --since 24h
  zonewatch-collector flows --zone 公安专网 --since 24h --top 20
  zonewatch-collector flows --zone 公安专网 --user app --process java --wide
  zonewatch-collector retention
  zonewatch-collector health --since 15m
  zonewatch-collector serve --raw-hours 72 --minute-days 90 --hour-days 730
  zonewatch-collector zones validate /etc/zonewatch/zones.yaml
  zonewatch-collector zones show /etc/zonewatch/zones.yaml --address 10.10.3.4
  zonewatch-collector incidents list --follow
  zonewatch-collector explore --port 0
  zonewatch-collector completion bash > ~/.local/share/bash-completion/completions/zonewatch-collector
"""


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get("ZONEWATCH_DB", DEFAULT_DB)),
        help=f"the collector's SQLite file (default: $ZONEWATCH_DB or ./{DEFAULT_DB})",
    )


def _format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table for people (default), json or csv for scripts",
    )


def _duration(text: str) -> int:
    """'90s', '10m', '2h', '1d' -> milliseconds."""
    units = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    try:
        value = float(text[:-1]) if text[-1] in units else float(text)
        scale = units.get(text[-1], 1000)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"malformed duration {text!r}: use 90s, 10m, 2h or 1d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return int(value * scale)


def _range_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", default="1h", help="start: 15m, 2h, 7d, 2026-11-28 or 2026-11-28T07:00 (default 1h)"
    )
    parser.add_argument("--until", default="now", help="end, same forms (default now)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zonewatch-collector",
        description="zonewatch collector: receives agents' facts over gRPC, stores them in SQLite, "
        "answers operators' queries.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zonewatch-collector {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the collector (gRPC server + embedded SQLite) until SIGTERM/Ctrl-C",
        description="Listen for agents, validate and durably store their reports, serve them their policy. "
        "SIGTERM or Ctrl-C stops it gracefully: in-flight batches are committed and acknowledged first.",
        epilog=clidoc.examples(
            PROG,
            "serve --db /var/lib/zonewatch/collector.db --listen 0.0.0.0:7390",
            "serve --zones /etc/zonewatch/zones.yaml --rules /etc/zonewatch/rules",
            "serve --raw-hours 72 --minute-days 90 --hour-days 730",
            "serve --metrics-listen 127.0.0.1:9390 --log-format json",
            "serve --siem-syslog tls://siem.example.gov.cn:6514 --siem-ca /etc/zonewatch/siem-ca.pem",
            "serve --insecure --listen 127.0.0.1:7390 --db lab.db   # a lab: no TLS",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(serve)
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT agents report to over mTLS (default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--enroll-listen",
        metavar="HOST:PORT",
        help="where agents without a certificate enroll (TLS, Enroll only; default: --listen's port + 1)",
    )
    cli_trust.pki_arg(serve)
    serve.add_argument(
        "--agent-rate",
        type=float,
        default=2000.0,
        metavar="FACTS/S",
        help="facts per second one agent may send; beyond it the agent is slowed and keeps the rest "
        "in its spool (default 2000)",
    )
    serve.add_argument(
        "--agent-burst",
        type=float,
        metavar="FACTS",
        help="facts one agent may send at once beyond its rate, e.g. a backlog after an outage "
        "(default: 10 s worth of --agent-rate)",
    )
    serve.add_argument(
        "--max-streams",
        type=int,
        default=20_000,
        metavar="N",
        help="agent streams open at once; more are refused and retry (default 20000)",
    )
    serve.add_argument(
        "--hello-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a stream that says nothing this long after opening is ended (default 30)",
    )
    serve.add_argument(
        "--migration-quiet",
        type=_duration,
        default=MigrationPolicy.quiet_ms,
        metavar="DURATION",
        help="a host with no dedicated-network address, route or traffic this long is migrated (default 7d)",
    )
    serve.add_argument(
        "--migration-stale",
        type=_duration,
        default=MigrationPolicy.stale_ms,
        metavar="DURATION",
        help="a host silent this long has migration state unknown (default 1d)",
    )
    serve.add_argument(
        "--migration-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often migration states are decided again (default 10)",
    )
    serve.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="DIR",
        help="the Sigma rules judged against every stored fact (default: the rules/ pack shipped with "
        "zonewatch); reloaded on SIGHUP and when a file changes",
    )
    serve.add_argument(
        "--no-rules", action="store_true", help="judge nothing: store facts only, raise no rule incidents"
    )
    serve.add_argument(
        "--detection-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often silent agents are judged and the rules directory checked for changes (default 2)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS: agents are not authenticated and name themselves (a lab only, never production)",
    )
    serve.add_argument(
        "--sample-interval",
        type=int,
        default=AgentPolicy.sample_interval_s,
        metavar="SECONDS",
        help="policy: how often agents sample their interfaces (default 10)",
    )
    serve.add_argument(
        "--interface",
        action="append",
        dest="interfaces",
        metavar="NAME",
        default=[],
        help="policy: interface agents watch (repeatable; default all but loopback)",
    )
    serve.add_argument(
        "--zones",
        type=Path,
        metavar="FILE",
        help="zone catalog (YAML) served to agents; reloaded on SIGHUP and when the file changes "
        "(a broken file is refused with file:line and the previous catalog stays)",
    )
    serve.add_argument(
        "--raw-hours",
        type=int,
        default=RetentionPolicy.raw_hours,
        metavar="HOURS",
        help="keep raw interface samples, zone traffic and flows this long "
        f"(default {RetentionPolicy.raw_hours})",
    )
    serve.add_argument(
        "--minute-days",
        type=int,
        default=RetentionPolicy.minute_days,
        metavar="DAYS",
        help=f"keep per-minute rollups this long (default {RetentionPolicy.minute_days})",
    )
    serve.add_argument(
        "--hour-days",
        type=int,
        default=RetentionPolicy.hour_days,
        metavar="DAYS",
        help=f"keep per-hour rollups this long (default {RetentionPolicy.hour_days})",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; port 0 picks a "
        "free one, logged)",
    )
    logfmt.add_format_option(serve)
    cli_tiers.serve_args(serve)
    cli_siem.add_serve_args(serve)

    agents = sub.add_parser(
        "agents",
        help="list agents with online/stale/offline status",
        description="Every agent that has reported, with its labels, last contact and status.",
        epilog=clidoc.examples(
            PROG,
            "agents",
            "agents --status offline --format json",
            "agents --stale-after 2m --offline-after 30m",
            'agents revoke web-01 --reason "host decommissioned"',
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(agents)
    _format_arg(agents)
    agents.add_argument("--status", choices=("online", "stale", "offline"), help="only agents in this state")
    agents.add_argument(
        "--stale-after",
        type=_duration,
        default=60_000,
        metavar="DURATION",
        help="silent longer than this: stale (default 60s)",
    )
    agents.add_argument(
        "--offline-after",
        type=_duration,
        default=600_000,
        metavar="DURATION",
        help="silent longer than this: offline (default 10m)",
    )
    cli_trust.add_agent_actions(agents, _db_arg)
    trust_handlers = cli_trust.add_parsers(sub, _db_arg, _format_arg, _duration)
    trust_handlers.update(cli_migration.add_parser(sub, _db_arg, _format_arg, _range_args))
    trust_handlers.update(cli_incidents.add_parser(sub, _db_arg, _format_arg, _range_args))
    trust_handlers.update(cli_rules.add_parser(sub, _db_arg, _format_arg))
    trust_handlers.update(cli_report.add_parser(sub, _db_arg, _format_arg, _range_args))
    trust_handlers.update(cli_explore.add_parser(sub, _db_arg, _format_arg, _range_args))
    trust_handlers.update(cli_bundle.add_parser(sub, _db_arg))
    trust_handlers.update(cli_tiers.add_parser(sub, _db_arg, _format_arg, _range_args))
    trust_handlers.update(cli_siem.add_parser(sub, _db_arg, _format_arg, _range_args))
    clidoc.add_parser(sub, PROG)

    bw = sub.add_parser(
        "bandwidth",
        help="traffic per agent and interface: current, average, p95, peak, utilization",
        description="Per agent and interface over a time range: current, average, p95 and peak "
        "bit rates each way, and utilization of the link speed. Where the range is older than the raw "
        "samples kept (serve --raw-hours), their per-minute or per-hour sums answer: totals and averages "
        "stay exact, peaks are per sample, and p95, current rates and utilization become averages over "
        "such buckets (a note on stderr says so).",
        epilog=clidoc.examples(
            PROG,
            "bandwidth --since 1h --top 10",
            "bandwidth --agent web-01 --iface eth0 --since 2026-11-27 --until 2026-11-28 --format csv",
            "bandwidth --since 24h --wide",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(bw)
    _format_arg(bw)
    bw.add_argument("--agent", help="agent id, id prefix (4+ chars) or hostname")
    bw.add_argument("--iface", help="interface name")
    _range_args(bw)
    bw.add_argument("--top", type=int, help="only the N busiest interfaces")
    bw.add_argument(
        "--wide",
        action="store_true",
        help="table: every column (averages, byte totals, resets, last sample); json/csv always have all",
    )

    tr = sub.add_parser(
        "traffic",
        help="bytes and load per zone, department, county or agent",
        description="Traffic exchanged with each zone as the agents' kernel counters measured it, summed "
        "over "
        "the fleet per time bucket: total bytes, average, p95 and peak bit rates each way, and, by zone, the "
        "load of the zone's link against its capacity (the vertical and horizontal extranet links). "
        "Where the range is older than the raw traffic kept (serve --raw-hours), its per-minute or "
        "per-hour sums answer: bytes stay exact, and the bucket grows to a multiple of theirs (a note "
        "on stderr says so).",
        epilog=clidoc.examples(
            PROG,
            "traffic --by zone --since 24h",
            "traffic --zone 省电子政务外网（纵向） --since 7d --bucket 1h",
            "traffic --by department --since 2026-11-01 --until 2026-12-01 --format csv",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(tr)
    _format_arg(tr)
    tr.add_argument(
        "--by",
        choices=("zone", "department", "county", "agent"),
        default="zone",
        help="what to group by (default zone)",
    )
    tr.add_argument("--zone", help="only traffic with this zone")
    _range_args(tr)
    tr.add_argument(
        "--bucket",
        type=_duration,
        default=60_000,
        metavar="DURATION",
        help="rates are computed per bucket of this length (default 1m); at least 1m or 1h where "
        "the range is older than the raw traffic kept",
    )

    fl = sub.add_parser(
        "flows",
        help="which program, run by whom, on which host talks to which remote endpoint and zone, how much",
        description="Flows the agents reported, summed per agent, process, user, remote address and port, "
        "protocol and remote zone: how many flows, bytes each way, packets, first and last seen, and the "
        "pid and command line of the most recent flow; most bytes first. The list a migration acts on: "
        "which program still talks to a dedicated network.",
        epilog=clidoc.examples(
            PROG,
            "flows --zone 公安专网 --since 24h --top 20",
            "flows --zone 公安专网 --user app --process java --wide",
            "flows --agent web-01 --since 2026-11-28 --format csv",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(fl)
    _format_arg(fl)
    fl.add_argument("--agent", help="agent id, id prefix (4+ chars) or hostname")
    fl.add_argument("--zone", help="only flows with this remote zone")
    fl.add_argument(
        "--process", help="only flows whose process name or command line contains this (any case)"
    )
    fl.add_argument("--user", metavar="NAME", help="only flows of processes run by this user (exact name)")
    _range_args(fl)
    fl.add_argument("--top", type=int, help="only the N groups with the most bytes")
    fl.add_argument(
        "--wide",
        action="store_true",
        help="table: also the last pid and command line (cut at 60 columns); json/csv always have all",
    )

    ret = sub.add_parser(
        "retention",
        help="raw data and rollups per tier: rows, time range, how far rolled up",
        description="For interface samples and zone traffic, per tier (raw, minute and hour rollups): "
        "how many rows, the oldest and newest time, up to when the rollups are complete (buckets "
        "ending at or before it), and how many raw rows are not rolled up yet. The collector rolls up "
        "and prunes as it runs (serve --raw-hours, --minute-days, --hour-days).",
        epilog=clidoc.examples(
            PROG, "retention", "retention --db /var/lib/zonewatch/collector.db --format json"
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(ret)
    _format_arg(ret)

    health = sub.add_parser(
        "health",
        help="is monitoring itself working: ingest, lag, rejections, gaps, disk, each agent's own health",
        description="Over a window (--since): batches and facts stored per second; lag (receive time "
        "minus the agent's send time: real delay minus the agent's clock offset, so the agents' median "
        "clock skew is shown beside it); what was rejected, by code and field, with the newest message; "
        "sequence gaps and batches missing, and incidents open now; the database and WAL sizes and the "
        "free disk space (a warning below 10 % or 1 GiB); agents online, stale and offline, and each "
        "agent's CPU, memory, spool backlog, capture drops, policy version and sensors that are off, "
        "worst first (offline, then the biggest backlog), as of its latest health report.",
        epilog=clidoc.examples(
            PROG, "health", "health --since 1h --format json", "health --offline-after 30m --format csv"
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(health)
    health.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table for people (default: a summary, then rejections and agents); json: one object with "
        "every figure; csv: the per-agent rows only",
    )
    health.add_argument(
        "--since",
        default="5m",
        help="the window: from 15m, 2h, 2026-11-28T07:00 ... until now (default 5m)",
    )
    health.add_argument(
        "--stale-after",
        type=_duration,
        default=60_000,
        metavar="DURATION",
        help="silent longer than this: stale (default 60s, as for agents)",
    )
    health.add_argument(
        "--offline-after",
        type=_duration,
        default=600_000,
        metavar="DURATION",
        help="silent longer than this: offline (default 10m, as for agents)",
    )

    zones = sub.add_parser(
        "zones",
        help="check or show a zone catalog (YAML)",
        description="The zone catalog names the networks agents' traffic is accounted to: "
        "extranet (vertical/horizontal), dedicated networks, the internet, classified and local "
        "zones. See deploy/zones.sample.yaml.",
        epilog=clidoc.examples(
            PROG,
            "zones validate /etc/zonewatch/zones.yaml",
            "zones show /etc/zonewatch/zones.yaml --address 10.10.3.4",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    zones_sub = zones.add_subparsers(
        dest="zones_command", required=True, metavar="ACTION", help="validate or show"
    )
    zv = zones_sub.add_parser(
        "validate",
        help="check a catalog; errors name file:line",
        description="Load the catalog as the collector would; print a summary or the first "
        "error as FILE:LINE: message and exit 2.",
        epilog=clidoc.examples(
            PROG, "zones validate /etc/zonewatch/zones.yaml", "zones validate deploy/zones.sample.yaml"
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    zv.add_argument("file", type=Path, help="the catalog file")
    zs = zones_sub.add_parser(
        "show",
        help="list the zones of a catalog, or which zone addresses fall in",
        description="List every zone with its kind, networks and capacity; with --address, "
        "the zone each address belongs to (longest prefix wins).",
        epilog=clidoc.examples(
            PROG,
            "zones show /etc/zonewatch/zones.yaml",
            "zones show /etc/zonewatch/zones.yaml --address 10.10.3.4 --address 172.20.1.9",
            "zones show deploy/zones.sample.yaml --format json",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    zs.add_argument("file", type=Path, help="the catalog file")
    zs.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="look up the zone of this address (repeatable)",
    )
    _format_arg(zs)

    watch = sub.add_parser(
        "watch",
        help="live fleet view (agents and bandwidth), refreshed until Ctrl-C",
        description="Redraw the agents and bandwidth tables every few seconds.",
        epilog=clidoc.examples(PROG, "watch", "watch --every 5 --since 5m --wide"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _db_arg(watch)
    watch.add_argument(
        "--every", type=float, default=2.0, metavar="SECONDS", help="refresh period (default 2)"
    )
    watch.add_argument("--since", default="1m", help="bandwidth window (default 1m)")
    watch.add_argument("--count", type=int, default=0, help="stop after N refreshes (default: until Ctrl-C)")
    watch.add_argument("--wide", action="store_true", help="every bandwidth column")
    parser.set_defaults(trust_handlers=trust_handlers)
    return parser


def now_ms() -> int:
    """The time every command takes as "now": $ZONEWATCH_NOW_MS when set (ms since the epoch), for
    tests and reports reproduced as of a given moment; else the clock."""
    fixed = os.environ.get("ZONEWATCH_NOW_MS", "").strip()
    if fixed:
        try:
            return int(fixed)
        except ValueError:
            raise CollectorError(f"ZONEWATCH_NOW_MS must be ms since the epoch, got {fixed!r}") from None
    return time.time_ns() // 1_000_000


def serve_config(args: argparse.Namespace) -> CollectorConfig:
    if not args.agent_rate > 0 or args.max_streams < 1 or not args.hello_timeout > 0:
        raise CollectorError("--agent-rate, --max-streams and --hello-timeout must be positive")
    if not args.migration_interval > 0 or not args.detection_interval > 0:
        raise CollectorError("--migration-interval and --detection-interval must be positive")
    rules_dir = None if args.no_rules else (args.rules or default_rules_dir())
    if rules_dir is not None and not rules_dir.is_dir():
        raise CollectorError(f"--rules {rules_dir}: no such directory")
    if args.sample_interval < 1:
        raise CollectorError(f"--sample-interval must be at least 1 second, got {args.sample_interval}")
    if args.metrics_listen is not None:
        from collector.metrics_http import split_address

        split_address(args.metrics_listen)  # a malformed address stops us before anything starts
    for flag, value in (("--raw-hours", args.raw_hours), ("--minute-days", args.minute_days),
                        ("--hour-days", args.hour_days)):  # fmt: skip
        if value < 1:
            raise CollectorError(f"{flag} must be at least 1, got {value}")
    return CollectorConfig(
        db_path=args.db,
        listen=args.listen,
        enroll_listen=args.enroll_listen,
        pki_dir=args.pki,
        insecure=args.insecure,
        agent_facts_per_s=args.agent_rate,
        agent_burst_facts=args.agent_burst,
        max_streams=args.max_streams,
        hello_timeout_s=args.hello_timeout,
        migration=MigrationPolicy(quiet_ms=args.migration_quiet, stale_ms=args.migration_stale),
        migration_interval_s=args.migration_interval,
        rules_dir=rules_dir,
        detection_interval_s=args.detection_interval,
        zones_path=args.zones,
        policy=AgentPolicy(sample_interval_s=args.sample_interval, interfaces=tuple(args.interfaces)),
        retention=RetentionPolicy(
            raw_hours=args.raw_hours, minute_days=args.minute_days, hour_days=args.hour_days
        ),
        metrics_listen=args.metrics_listen,
        siem=cli_siem.serve_config(args),
        **cli_tiers.serve_fields(args),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from collector.server import serve

    config = serve_config(args)

    def ready(collector: Any) -> None:
        host = config.listen.rsplit(":", 1)[0]
        enroll_host = config.enroll_address.rsplit(":", 1)[0]
        logging.getLogger("zonewatch").info(
            "collector listening on %s:%d (%s), database %s, policy %s",
            host,
            collector.port,
            f"mTLS; enrollment on {enroll_host}:{collector.enroll_port}"
            if collector.enroll_port
            else "NO TLS",
            config.db_path,
            config.policy.version,
        )

    asyncio.run(serve(config, on_ready=ready))
    return 0


def _open(args: argparse.Namespace) -> Any:
    from collector.store import open_database

    return open_database(args.db, readonly=True)


def cmd_agents(args: argparse.Namespace) -> int:
    if getattr(args, "agents_command", None):
        return cli_trust.cmd_agent_action(args)
    from collector.output import AGENT_COLUMNS, render
    from collector.store.queries import list_agents

    db = _open(args)
    rows: list[Any] = list_agents(db, now_ms(), args.stale_after, args.offline_after)
    if args.status:
        rows = [r for r in rows if r.status == args.status]
    render(rows, args.format, AGENT_COLUMNS, sys.stdout)
    return 0


def _bandwidth_rows(db: Any, args: argparse.Namespace, since: str, until: str) -> list[Any]:
    from collector.output import check_range, parse_time
    from collector.store.queries import bandwidth, resolve_agent

    now = now_ms()
    since_ms, until_ms = parse_time(since, now), parse_time(until, now)
    check_range(since_ms, until_ms)
    agent = resolve_agent(db, args.agent) if getattr(args, "agent", None) else None
    return bandwidth(
        db,
        since_ms=since_ms,
        until_ms=until_ms,
        agent=agent,
        interface=getattr(args, "iface", None),
        top=getattr(args, "top", None),
    )


def _bandwidth_columns(args: argparse.Namespace) -> Any:
    from collector.output import BANDWIDTH_COLUMNS, BANDWIDTH_SUMMARY_COLUMNS

    wide = args.wide or getattr(args, "format", "table") != "table"
    return BANDWIDTH_COLUMNS if wide else BANDWIDTH_SUMMARY_COLUMNS


def cmd_bandwidth(args: argparse.Namespace) -> int:
    from collector.output import render

    db = _open(args)
    rows = _bandwidth_rows(db, args, args.since, args.until)
    render(rows, args.format, _bandwidth_columns(args), sys.stdout)
    if rows and rows[0].bucket_ms:
        _note_coarser(
            f"p95, current rates and utilization are averages over {_length(rows[0].bucket_ms)} buckets"
            " (peaks per sample)"
        )
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from collector.output import AGENT_COLUMNS, render
    from collector.store.queries import list_agents

    console = Console()
    db = _open(args)
    shown = 0
    while True:
        agents: list[Any] = list_agents(db, now_ms(), 60_000, 600_000)
        rows = _bandwidth_rows(db, args, args.since, "now")
        console.clear()
        console.print(
            f"[bold]zonewatch fleet[/bold]  {args.db}  {time.strftime('%Y-%m-%d %H:%M:%S')}  (Ctrl-C to quit)"
        )
        render(agents, "table", AGENT_COLUMNS, sys.stdout)
        render(rows, "table", _bandwidth_columns(args), sys.stdout)
        shown += 1
        if args.count and shown >= args.count:
            return 0
        time.sleep(args.every)


def cmd_traffic(args: argparse.Namespace) -> int:
    from collector.output import TRAFFIC_COLUMNS, check_range, parse_time, render
    from collector.store.traffic import traffic

    db = _open(args)
    now = now_ms()
    since_ms, until_ms = parse_time(args.since, now), parse_time(args.until, now)
    check_range(since_ms, until_ms)
    rows = traffic(
        db, by=args.by, since_ms=since_ms, until_ms=until_ms, bucket_ms=args.bucket, zone=args.zone
    )
    render(rows, args.format, TRAFFIC_COLUMNS, sys.stdout)
    if rows and rows[0].bucket_ms != args.bucket:
        _note_coarser(
            f"rates are averages over {_length(rows[0].bucket_ms)} buckets, not {_length(args.bucket)}"
        )
    return 0


def _note_coarser(what: str) -> None:
    """Say on stderr that the figures are coarser than asked: the output itself stays as it is."""
    print(f"zonewatch-collector: note: the range is older than the raw horizon: {what}", file=sys.stderr)


def _length(ms: int) -> str:
    """A bucket length as people say it: 1 min, 2 h, 90 s."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000} h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000} min"
    return f"{ms / 1000:g} s"


def cmd_flows(args: argparse.Namespace) -> int:
    from collector.output import FLOW_COLUMNS, FLOW_SUMMARY_COLUMNS, check_range, parse_time, render
    from collector.store.flows import flows
    from collector.store.queries import resolve_agent

    db = _open(args)
    now = now_ms()
    since_ms, until_ms = parse_time(args.since, now), parse_time(args.until, now)
    check_range(since_ms, until_ms)
    rows = flows(
        db,
        since_ms=since_ms,
        until_ms=until_ms,
        agent=resolve_agent(db, args.agent) if args.agent else None,
        zone=args.zone,
        process=args.process,
        user=args.user,
        top=args.top,
    )
    wide = args.wide or args.format != "table"
    render(rows, args.format, FLOW_COLUMNS if wide else FLOW_SUMMARY_COLUMNS, sys.stdout)
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from collector.output import RETENTION_COLUMNS, render
    from collector.store.retention_view import retention_status

    render(retention_status(_open(args)), args.format, RETENTION_COLUMNS, sys.stdout)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from collector.output import check_range, parse_time, render_health
    from collector.store.health import health_report

    now = now_ms()
    since_ms = parse_time(args.since, now)
    check_range(since_ms, now)
    report = health_report(
        _open(args),
        args.db,
        since_ms=since_ms,
        now_ms=now,
        stale_after_ms=args.stale_after,
        offline_after_ms=args.offline_after,
    )
    render_health(report, args.format, sys.stdout)
    return 0


def cmd_zones(args: argparse.Namespace) -> int:
    from collector.output import ZONE_COLUMNS, ZONE_LOOKUP_COLUMNS, ZoneLookupRow, ZoneRow, render
    from collector.zones import load_catalog

    catalog = load_catalog(args.file)
    if args.zones_command == "validate":
        kinds: dict[str, int] = {}
        for zone in catalog.zones:
            kinds[zone.kind] = kinds.get(zone.kind, 0) + 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        networks = sum(len(z.networks) for z in catalog.zones)
        print(
            f"{args.file}: OK, {len(catalog.zones)} zones ({summary}), {networks} networks, "
            f"version {catalog.version}"
        )
        return 0
    if args.address:
        from ipaddress import ip_address

        lookups = []
        for text in args.address:
            try:
                address = ip_address(text)
            except ValueError:
                raise CollectorError(f"not an IP address: {text!r}") from None
            owner = catalog.zone_of(address)
            lookups.append(
                ZoneLookupRow(text, owner.name if owner else "unknown", owner.kind if owner else "")
            )
        render(lookups, args.format, ZONE_LOOKUP_COLUMNS, sys.stdout)
        return 0
    rows = [
        ZoneRow(
            z.name, z.kind, z.direction, z.department, ", ".join(map(str, z.networks)), z.capacity_bps, z.line
        )
        for z in catalog.zones
    ]
    render(rows, args.format, ZONE_COLUMNS, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only serve offers --log-format; the other commands log (rarely) as text.
    logfmt.configure(
        getattr(args, "log_format", "text"),
        verbose=getattr(args, "verbose", False),
        journal_stream=os.environ.get("JOURNAL_STREAM"),
    )
    handlers = {
        "serve": cmd_serve,
        "agents": cmd_agents,
        "bandwidth": cmd_bandwidth,
        "watch": cmd_watch,
        "zones": cmd_zones,
        "traffic": cmd_traffic,
        "flows": cmd_flows,
        "retention": cmd_retention,
        "health": cmd_health,
        "completion": lambda args: clidoc.print_script(build_parser(), args.shell),
        **args.trust_handlers,
    }
    try:
        return handlers[args.command](args)
    except CollectorError as exc:
        logfmt.report_error(PROG, str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

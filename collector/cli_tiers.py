"""`zonewatch-collector tiers`: county -> city -> province. Enroll a lower tier into its upstream,
see how its forwarding goes, and on the upstream the view grouped by tier.

Also the `serve --upstream` options (serve_args, serve_fields): the CLI only wires.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from agent import clidoc
from collector.errors import CollectorError

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"


class StatusRow(NamedTuple):
    name: str
    upstream: str
    agent_id: str
    running: bool  # the forwarder wrote its status within three intervals
    connected: bool
    backlog_batches: int
    backlog_bytes: int
    oldest_unacked_ms: int | None
    acked_seq: int
    last_ack_ms: int | None
    facts_sent: int  # since the forwarder started
    last_error: str
    policy_version: str
    cursors: dict[str, int]


def serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="a lower tier: forward incidents, migration states and hourly rollups to this upstream "
        "collector, and take its rule pack and zone catalog (enroll first: `tiers enroll`)",
    )
    serve.add_argument(
        "--upstream-state",
        type=Path,
        metavar="DIR",
        help="the tier's identity, spool and cursors (default: upstream/ beside the database)",
    )
    serve.add_argument(
        "--upstream-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often changes are read and spooled for the upstream (default 5)",
    )
    serve.add_argument(
        "--upstream-rollup-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the hourly zone rollups still filling are computed and sent up (default 60)",
    )


def serve_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CollectorConfig fields the upstream options set."""
    if args.upstream is None:
        return {}
    from agent.config import check_address
    from agent.errors import ConfigError

    try:
        check_address(args.upstream)
    except ConfigError as exc:
        raise CollectorError(f"--upstream: {exc}") from exc
    if not args.upstream_interval > 0 or not args.upstream_rollup_interval > 0:
        raise CollectorError("--upstream-interval and --upstream-rollup-interval must be positive")
    state = args.upstream_state or args.db.resolve().parent / "upstream"
    return {
        "upstream": args.upstream,
        "upstream_state_dir": state,
        "upstream_interval_s": args.upstream_interval,
        "upstream_rollup_interval_s": args.upstream_rollup_interval,
    }


def _state_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        type=Path,
        metavar="DIR",
        help="the tier's state directory (default: upstream/ beside --db)",
    )


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    tiers = sub.add_parser(
        "tiers",
        help="collector tiers: enroll into an upstream, forwarding status, the view by tier",
        description="Collectors form tiers as the network does (county -> city -> province). A lower "
        "tier enrolls into its upstream with a token of role collector and runs `serve --upstream`: "
        "its incidents, migration states and hourly zone rollups go up, the upstream's rule pack and "
        "zone catalog come down. On the upstream, these commands show what arrived, grouped by tier.",
        epilog=clidoc.examples(
            PROG,
            "tokens create --role collector   # on the upstream",
            "tiers enroll --upstream 10.1.0.5:7390 --token T --ca ca.crt --name 城关区",
            "tiers status",
            "tiers list",
            "tiers incidents --tier 市局/城关区 --severity high",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    actions = tiers.add_subparsers(
        dest="tiers_command",
        metavar="ACTION",
        required=True,
        help="enroll, status, list, incidents, migration or traffic",
    )

    enroll = actions.add_parser(
        "enroll",
        help="make this collector a client of its upstream (once, with a token of role collector)",
        description="Trade a one-time token from the upstream (`tokens create --role collector`) for a "
        "client certificate, as an agent enrolls. The name is how the upstream files this tier; the CA "
        "file is the upstream's pki/ca.crt, handed over by its operator.",
        epilog=clidoc.examples(
            PROG,
            "tiers enroll --upstream 10.1.0.5:7390 --token T --ca /etc/zonewatch/city-ca.crt --name 城关区",
            "tiers enroll --upstream 10.1.0.5:7390 --token T --ca ca.crt --name 城关区 --force",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(enroll)
    _state_arg(enroll)
    enroll.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the upstream's mTLS port")
    enroll.add_argument("--token", required=True, help="the enrollment token the upstream issued")
    enroll.add_argument(
        "--ca", required=True, type=Path, metavar="CA.pem", help="the upstream's CA certificate"
    )
    enroll.add_argument("--name", required=True, help="this tier's name upstream (a county, a city: 城关区)")
    enroll.add_argument(
        "--enroll-port", type=int, default=0, help="the upstream's enrollment port (default: its port + 1)"
    )
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment (spool kept)")

    status = actions.add_parser(
        "status",
        help="on a lower tier: upstream, connected?, spool backlog, last ack, cursors",
        description="What the forwarder of `serve --upstream` reports about itself: the upstream, "
        "whether it is connected, how much waits in the spool and since when, the last ack.",
        epilog=clidoc.examples(PROG, "tiers status", "tiers status --format json"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(status)
    _state_arg(status)
    format_arg(status)

    listing = actions.add_parser(
        "list",
        help="on an upstream: every tier, its last report, backlog, incidents, migration, link load",
        description="One row per tier that reported (a relayed tier as city/county), and (local) for "
        "this collector: the last report and its age, the sender's spool backlog, active incidents by "
        "severity, migration pairs and the share migrated, and the busiest link of the last 24 h.",
        epilog=clidoc.examples(PROG, "tiers list", "tiers list --format json"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(listing)
    format_arg(listing)

    incidents = actions.add_parser(
        "incidents",
        help="on an upstream: the incidents lower tiers sent",
        description="Incidents as the tier that raised them sees them (status, count), newest first. "
        "--tier takes a tier and everything below it.",
        epilog=clidoc.examples(
            PROG,
            "tiers incidents",
            "tiers incidents --tier 市局 --status all",
            "tiers incidents --tier 市局/城关区 --severity high --format json",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(incidents)
    format_arg(incidents)
    incidents.add_argument("--tier", help="this tier and those below it (城关区, 市局/城关区)")
    incidents.add_argument(
        "--status",
        choices=("active", "open", "acknowledged", "resolved", "false_positive", "closed", "all"),
        default="active",
        help="active (open and acknowledged, the default), a status, closed or all",
    )
    incidents.add_argument(
        "--severity",
        choices=("informational", "low", "medium", "high", "critical"),
        help="this severity or worse",
    )
    incidents.add_argument("--limit", type=int, help="at most this many")

    migration = actions.add_parser(
        "migration",
        help="on an upstream: dedicated-network migration by tier, department or county",
        description="Host/network pairs per state and the share migrated, over every tier and this "
        "collector's own hosts ((local)).",
        epilog=clidoc.examples(PROG, "tiers migration", "tiers migration --by county --format csv"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(migration)
    format_arg(migration)
    migration.add_argument(
        "--by", choices=("tier", "department", "county"), default="tier", help="group by (default tier)"
    )

    traffic = actions.add_parser(
        "traffic",
        help="on an upstream: hourly zone traffic the tiers sent, busiest link first",
        description="Per tier and zone over whole hours: bytes both ways, the busiest minute's rate and "
        "its share of the link's capacity.",
        epilog=clidoc.examples(PROG, "tiers traffic --since 24h", "tiers traffic --tier 市局 --since 7d"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(traffic)
    format_arg(traffic)
    traffic.add_argument("--tier", help="this tier and those below it")
    range_args(traffic)
    return {"tiers": cmd_tiers}


def cmd_tiers(args: argparse.Namespace) -> int:
    from collector import cli_tiers_view as view

    handlers: dict[str, Handler] = {
        "enroll": _enroll,
        "status": _status,
        "list": view.cmd_list,
        "incidents": view.cmd_incidents,
        "migration": view.cmd_migration,
        "traffic": view.cmd_traffic,
    }
    return handlers[args.tiers_command](args)


def _state_dir(args: argparse.Namespace) -> Path:
    from collector.upstream.state import default_state_dir

    return args.state if args.state is not None else default_state_dir(args.db)


def _enroll(args: argparse.Namespace) -> int:
    from collector.upstream.enroll import enroll_tier

    state = _state_dir(args)
    agent_id = enroll_tier(
        args.upstream, args.token, args.ca, args.name, state, enroll_port=args.enroll_port, force=args.force
    )
    print(f"enrolled into {args.upstream} as tier {args.name} (id {agent_id}); state in {state}")
    print(f"now run: {PROG} serve --db {args.db} --upstream {args.upstream}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from agent.credentials import read_enrollment
    from agent.errors import AgentError
    from agent.spool import Spool
    from collector.cli import now_ms
    from collector.output import Column, render
    from collector.upstream.state import TierState

    state = TierState(_state_dir(args))
    identity = state.identity()
    try:
        enrollment = read_enrollment(state.state_dir)
        with Spool(state.spool_path) as spool:
            stats = spool.stats()
            oldest = spool.pending(limit=1)
    except AgentError as exc:
        raise CollectorError(str(exc)) from exc
    status = state.status()
    cursors = state.cursors()
    now = now_ms()
    running = (
        status is not None and now - status.last_cycle_ms <= 3 * max(status.interval_s, 1.0) * 1000 + 5000
    )
    row = StatusRow(
        identity.name,
        status.upstream if status and status.upstream else identity.upstream,
        enrollment.agent_id if enrollment else "",
        running,
        bool(running and status and status.connected),
        stats.batches,
        stats.bytes,
        oldest[0].created_ms if oldest else None,
        status.acked_seq if status else 0,
        (status.last_ack_ms or None) if status else None,
        status.facts_sent if status else 0,
        status.last_error if status else "",
        status.policy_version if status else "",
        {
            name: getattr(cursors, name)
            for name in (
                "incidents",
                "migrations",
                "relayed_incidents",
                "relayed_migrations",
                "relayed_rollups",
            )
        },
    )
    if args.format == "json":
        json.dump(row._asdict(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    columns = [
        Column("name", "tier"),
        Column("upstream", "upstream"),
        Column("running", "forwarder running"),
        Column("connected", "connected"),
        Column("backlog_batches", "backlog batches", "int"),
        Column("backlog_bytes", "backlog", "bytes"),
        Column("oldest_unacked_ms", "oldest unacked", "time"),
        Column("last_ack_ms", "last ack", "time"),
        Column("acked_seq", "acked seq", "int"),
        Column("facts_sent", "facts sent", "int"),
        Column("last_error", "last error", max_width=60),
        Column("policy_version", "upstream policy"),
    ]
    render([row], args.format, columns, sys.stdout)
    return 0

"""The trust commands of zonewatch-collector: init, tokens, agents revoke and rename.

They write to the database beside a running collector (short transactions; WAL and
busy_timeout make that safe), which notices revocations within a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import clidoc
from collector.config import DEFAULT_LISTEN, default_pki_dir
from collector.errors import CollectorError
from collector.model import HostLabels

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"


def add_parsers(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    duration: Callable[[str], int],
) -> dict[str, Handler]:
    """Add init and tokens to the collector's subcommands; return their handlers."""
    init = sub.add_parser(
        "init",
        help="create the certificate authority and the collector's TLS certificate",
        description="Create the CA and the server certificate agents will pin (by the printed SHA-256 "
        "fingerprint) and the collector will present. Keys are EC P-256, mode 0600, in a 0700 directory "
        "(default: 'pki' beside the database). Refuses to replace an existing PKI unless --force: every "
        "agent would have to enroll again.",
        epilog=clidoc.examples(
            PROG,
            "init --db /var/lib/zonewatch/collector.db",
            "init --pki /etc/zonewatch/pki --san collector.example.gov.cn --san 10.10.0.5",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(init)
    pki_arg(init)
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="an extra DNS name or IP address for the server certificate (repeatable; agents verify the "
        "fixed name zonewatch-collector, so this is only for other TLS clients)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing PKI")

    tokens = sub.add_parser(
        "tokens",
        help="enrollment tokens: create, list, revoke",
        description="An enrollment token lets one host (or --uses hosts) enroll its agent, with the labels "
        "the token carries. Only a hash is stored: the token is printed once, with the command to run.",
        epilog=clidoc.examples(
            PROG,
            "tokens create --department 市公安局 --county 高新区 --expires 24h --collector 10.10.0.5:7390",
            "tokens list --all",
            "tokens revoke 7",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    tsub = tokens.add_subparsers(
        dest="tokens_command", required=True, metavar="ACTION", help="create, list or revoke"
    )
    create = tsub.add_parser(
        "create",
        help="issue a token bound to labels",
        description="Issue a token.",
        epilog=clidoc.examples(
            PROG,
            "tokens create --department 市公安局 --county 高新区 --site 主机房 --role server",
            "tokens create --department 市教育局 --uses 50 --expires 7d --note 学校机房批量部署",
            "tokens create --replace web-01 --department 市公安局   # a reinstalled host",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(create)
    pki_arg(create)
    for label in ("department", "county", "site", "role"):
        create.add_argument(f"--{label}", default="", help=f"host label: {label}")
    create.add_argument(
        "--expires", type=duration, default=86_400_000, metavar="DURATION", help="validity (default 24h)"
    )
    create.add_argument("--uses", type=int, default=1, help="how many hosts may enroll with it (default 1)")
    create.add_argument("--note", default="", help="free text: what or whom the token is for")
    create.add_argument(
        "--replace",
        metavar="AGENT",
        help="for a reinstalled host: the agent (id or hostname) whose record, history and name the new "
        "enrollment takes over; its old certificates are revoked",
    )
    create.add_argument(
        "--collector",
        default="",
        metavar="HOST:PORT",
        help="the address agents reach the collector at, for the printed enroll command",
    )
    listing = tsub.add_parser(
        "list",
        help="tokens still usable (--all: every one)",
        description="List tokens.",
        epilog=clidoc.examples(PROG, "tokens list", "tokens list --all --format csv"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(listing)
    format_arg(listing)
    listing.add_argument("--all", action="store_true", help="also expired, used and revoked tokens")
    revoke = tsub.add_parser(
        "revoke",
        help="make a token unusable",
        description="Revoke a token by its id.",
        epilog=clidoc.examples(PROG, "tokens revoke 7"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(revoke)
    revoke.add_argument("id", type=int, help="the token's id (tokens list)")
    return {"init": cmd_init, "tokens": cmd_tokens}


def add_agent_actions(
    agents: argparse.ArgumentParser, db_arg: Callable[[argparse.ArgumentParser], None]
) -> None:
    """`agents revoke ID` and `agents rename ID NAME` beside the listing `agents` does by itself."""
    actions = agents.add_subparsers(
        dest="agents_command", metavar="ACTION", help="revoke or rename an agent (none: list the agents)"
    )
    revoke = actions.add_parser(
        "revoke",
        help="revoke an agent's certificates: refused at once, open streams too",
        description="Revoke every certificate of the agent. The running collector ends its streams within "
        "a second and refuses it from then on; the agent must enroll again with a new token.",
        epilog=clidoc.examples(
            PROG, 'agents revoke web-01 --reason "host decommissioned"', "agents revoke 3f9a2c1e"
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(revoke)
    revoke.add_argument("agent", help="agent id (or its first characters) or hostname")
    revoke.add_argument("--reason", default="revoked by an operator", help="recorded with the revocation")
    rename = actions.add_parser(
        "rename",
        help="give an agent the name operators know it by",
        description="Set the name shown for the agent; the hostname it reports no longer replaces it.",
        epilog=clidoc.examples(
            PROG, "agents rename 3f9a2c1e 市公安局-web-01", "agents rename web-01 web-01-old"
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(rename)
    rename.add_argument("agent", help="agent id (or its first characters) or hostname")
    rename.add_argument("name", help="the new name")


def pki_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pki", type=Path, metavar="DIR", help="the PKI directory (default: 'pki' beside the database)"
    )


def pki_dir(args: argparse.Namespace) -> Path:
    return args.pki if args.pki is not None else default_pki_dir(args.db)


def cmd_init(args: argparse.Namespace) -> int:
    from collector import pki

    directory = pki_dir(args)
    pki.init_pki(directory, server_names=args.san, force=args.force)
    authority = pki.load_pki(directory)
    print(f"PKI created in {directory}")
    print(f"CA fingerprint  {authority.ca_fingerprint}")
    print(f"next: zonewatch-collector serve --db {args.db}   (agents: port {DEFAULT_LISTEN.rsplit(':')[1]},"
          f" enrollment: the next port)")  # fmt: skip
    print("      zonewatch-collector tokens create --department ... --county ...")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.store import enrollment
    from collector.store.database import open_database

    db = open_database(args.db, create=args.tokens_command == "create")
    try:
        if args.tokens_command == "create":
            return _create_token(args, db, now_ms())
        if args.tokens_command == "list":
            from collector.output import TOKEN_COLUMNS, render

            render(
                enrollment.list_tokens(db, now_ms(), all_tokens=args.all),
                args.format,
                TOKEN_COLUMNS,
                sys.stdout,
            )
            return 0
        enrollment.revoke_token(db, args.id, now_ms())
        print(f"token {args.id} revoked")
        return 0
    finally:
        db.close()


def _create_token(args: argparse.Namespace, db: Any, now: int) -> int:
    from collector import pki
    from collector.store import enrollment

    if args.uses < 1:
        raise CollectorError(f"--uses must be at least 1, got {args.uses}")
    labels = HostLabels(args.department, args.county, args.site, args.role)
    for name, value in zip(HostLabels._fields, labels, strict=True):
        if len(value) > 128 or not value.isprintable():
            raise CollectorError(f"--{name} must be at most 128 printable characters")
    authority = pki.load_pki(pki_dir(args))  # a token is useless without the CA agents will pin
    replaces = None
    if args.replace:
        from collector.store.queries import resolve_agent

        replaces = resolve_agent(db, args.replace)
    token = pki.new_token()
    token_id = enrollment.create_token(
        db,
        pki.token_hash(token),
        labels,
        now_ms=now,
        expires_ms=now + args.expires,
        uses=args.uses,
        note=args.note,
        replaces=replaces,
    )
    collector = args.collector or f"<collector-address>:{DEFAULT_LISTEN.rsplit(':')[1]}"
    print(f"token {token_id}: {token}")
    print(
        "labels: "
        + (", ".join(f"{k}={v}" for k, v in zip(HostLabels._fields, labels, strict=True) if v) or "-")
    )
    print(
        f"valid for {args.uses} enrollment(s) until {_when(now + args.expires)}; shown once, stored as a hash"
    )
    print("on the host, as root:")
    print(
        f"  zonewatch-agent enroll --collector {collector} --token {token} "
        f"--ca-fingerprint {authority.ca_fingerprint}"
    )
    return 0


def cmd_agent_action(args: argparse.Namespace) -> int:
    from collector.cli import now_ms
    from collector.store import enrollment
    from collector.store.database import open_database
    from collector.store.queries import resolve_agent

    db = open_database(args.db, create=False)
    try:
        key = resolve_agent(db, args.agent)
        if args.agents_command == "revoke":
            count = enrollment.revoke_agent(db, key, now_ms(), args.reason)
            print(f"agent {args.agent}: {count} certificate(s) revoked; it is refused from now on")
        else:
            enrollment.rename_agent(db, key, args.name)
            print(f"agent {args.agent} is now named {args.name.strip()}")
        return 0
    finally:
        db.close()


def _when(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M %Z")

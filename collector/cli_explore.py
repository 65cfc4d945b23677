"""`zonewatch-collector explore`: browse the database in Datasette, read-only, with facets and canned
queries ready (store/explore.py), for questions the fixed commands do not ask.

Datasette is an optional extra: the collector never needs it, so it is not a dependency. Without it
the command says in one line how to install it and exits 1. With it, Datasette runs as a child
process on the database file; a live collector's database is opened with ``mode=ro`` (Datasette's
default for a file it may see change), a copy with ``--immutable``. Datasette 1.0 moved canned
queries and table settings from the metadata file to a configuration file: both forms are written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import clidoc
from collector.store import explore

Handler = Callable[[argparse.Namespace], int]

PROG = "zonewatch-collector"
INSTALL = "pip install 'zonewatch[explore]'"
# Datasette stops a query after 1 s by default; a year of hourly link load takes longer.
SQL_TIME_LIMIT_MS = 10_000


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
    range_args: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    """Add `explore` to the collector's subcommands; return its handler. It prints no table and takes
    no time range: format_arg and range_args are taken so every command module registers alike."""
    del format_arg, range_args
    parser = sub.add_parser(
        "explore",
        help="browse the database read-only in Datasette, with facets and canned queries (optional extra)",
        description="Serve the database read-only in Datasette on this machine: every table, incidents "
        "faceted by severity, status and rule, migration states by state and network, and canned queries: "
        "active incidents with host and department, incidents and migration state per department, link "
        f"load per zone per hour. Needs Datasette: {INSTALL}.",
        epilog=clidoc.examples(
            PROG,
            "explore --db /var/lib/zonewatch/collector.db",
            "explore --port 0   # any free port: Datasette prints the address",
            "explore --db backup.db --immutable --port 8002",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1: this machine only; the data is not public)",
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port to serve on (default 8001; 0 picks a free one)"
    )
    parser.add_argument(
        "--immutable",
        action="store_true",
        help="the file is a copy nothing writes to (a backup): read faster, never re-read; never use it "
        "on a running collector's database",
    )
    return {"explore": cmd_explore}


def datasette_version() -> str | None:
    """The installed Datasette's version ("0" when unknown), None when it cannot be imported."""
    try:
        import datasette  # noqa: F401  (only whether it imports)
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("datasette")
    except PackageNotFoundError:
        return "0"


def metadata(database: str) -> dict[str, Any]:
    """What Datasette shows about the database named ``database`` (the file's stem): titles and
    descriptions."""
    return {
        "title": "zonewatch collector",
        "description": "The collector's database, read-only. Times are ms since the epoch; "
        "the canned queries show them in local time.",
        "databases": {
            database: {
                "tables": {
                    "incidents": {"description": "One row per rule and deduplication key while active."},
                    "migration_states": {"description": "One row per host and dedicated network."},
                }
            }
        },
    }


def config(database: str) -> dict[str, Any]:
    """How Datasette presents the database: table facets and sort order, and the canned queries."""
    tables = {
        table: {"facets": list(columns), "sort_desc": explore.TABLE_SORT_DESC[table]}
        for table, columns in explore.TABLE_FACETS.items()
    }
    queries = {
        q.name: {"title": q.title, "description": q.description, "sql": q.sql} for q in explore.CANNED_QUERIES
    }
    return {"databases": {database: {"tables": tables, "queries": queries}}}


def documents(database: str, version: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metadata, configuration) for this Datasette version: before 1.0 the metadata holds both."""
    meta, conf = metadata(database), config(database)
    if _major(version) >= 1:
        return meta, conf
    described, presented = meta["databases"][database], conf["databases"][database]
    for table, settings in presented["tables"].items():
        described["tables"].setdefault(table, {}).update(settings)
    described["queries"] = presented["queries"]
    return meta, None


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def cmd_explore(args: argparse.Namespace) -> int:
    from collector.store.database import open_database

    version = datasette_version()
    if version is None:
        print(f"{PROG}: error: explore needs Datasette: {INSTALL}", file=sys.stderr)
        return 1
    open_database(args.db, readonly=True).close()  # a missing or foreign file: one line, before Datasette
    database = Path(args.db).stem
    meta, conf = documents(database, version)
    with tempfile.TemporaryDirectory(prefix="zonewatch-explore-") as directory:
        meta_path = Path(directory) / "metadata.json"
        meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
        command = [
            sys.executable, "-m", "datasette", "serve",
            *(["-i", str(args.db)] if args.immutable else [str(args.db)]),
            "--host", args.host, "--port", str(args.port), "--metadata", str(meta_path),
            "--setting", "sql_time_limit_ms", str(SQL_TIME_LIMIT_MS),
        ]  # fmt: skip
        if conf is not None:
            conf_path = Path(directory) / "datasette.json"
            conf_path.write_text(json.dumps(conf, ensure_ascii=False, indent=2), encoding="utf-8")
            command += ["-c", str(conf_path)]
        print(
            f"{PROG}: serving {args.db} read-only with Datasette {version} (Ctrl-C to stop)", file=sys.stderr
        )
        child = subprocess.Popen(command)
        try:
            return child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached Datasette too (same process group): let it finish
            child.wait()
            return 0

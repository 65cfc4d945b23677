"""zonewatch-agent: the command line. It only wires: parse, build the config, call, print."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import DEFAULT_CONFIG, load_config
from agent.errors import AgentError
from agent.sensors.interfaces import InterfaceSampler
from agent.wire import batch_request, hello_request, to_json

EXAMPLES = """\
examples:
  zonewatch-agent once --json                      print one report, send nothing
  zonewatch-agent run --collector 10.0.0.5:7390 --department 市公安局 --county 高新区
  zonewatch-agent status --state-dir /var/lib/zonewatch-agent
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help=f"TOML config file (default: {DEFAULT_CONFIG} if present)"
    )
    parser.add_argument("--collector", help="collector HOST:PORT (default 127.0.0.1:7390)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the agent keeps its id and spool (default /var/lib/zonewatch-agent)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        dest="interval_s",
        help="sampling interval in seconds until the collector's policy says otherwise (default 10)",
    )
    parser.add_argument(
        "--interface",
        action="append",
        dest="interfaces",
        metavar="NAME",
        help="interface to watch (repeatable; default: all but loopback)",
    )
    for label in ("department", "county", "site", "role"):
        parser.add_argument(f"--{label}", help=f"host label: {label} (overrides the config file)")
    parser.add_argument("--hostname", help="hostname to report (default: this host's)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zonewatch-agent",
        description="zonewatch agent: samples this host's network and reports facts to a collector.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zonewatch-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="sample and report to the collector until stopped (SIGTERM/Ctrl-C)",
        description="Sample every interval, keep reports in the durable spool, deliver them "
        "to the collector and delete them once acknowledged.",
    )
    _common(run)
    once = sub.add_parser(
        "once",
        help="take one sample and print the report that would be sent",
        description="Sample the interfaces twice, --interval apart (default 1 s), and print "
        "the report. Contacts no collector and writes nothing.",
    )
    _common(once)
    once.add_argument(
        "--json", action="store_true", help="print the report as JSON (the proto3 JSON mapping)"
    )
    status = sub.add_parser(
        "status",
        help="show the agent's id and spool backlog",
        description="Read the state directory: agent id, spooled batches, dropped facts.",
    )
    _common(status)
    return parser


def _config(args: argparse.Namespace) -> Any:
    overrides = {
        key: getattr(args, key, None)
        for key in (
            "collector",
            "state_dir",
            "interval_s",
            "department",
            "county",
            "site",
            "role",
            "hostname",
        )
    }
    if getattr(args, "interfaces", None):
        overrides["interfaces"] = tuple(args.interfaces)
    return load_config(args.config, overrides)


def cmd_once(args: argparse.Namespace) -> int:
    config = _config(args)
    interval = args.interval_s if args.interval_s is not None else 1.0
    sampler = InterfaceSampler(include=config.interfaces)
    sampler.sample()
    time.sleep(interval)
    samples = sampler.sample()
    now = time.time_ns() // 1_000_000
    hello = hello_request("(assigned at first run)", config.hostname, __version__, config.labels, "", now)
    batch = batch_request(1, now, now, samples)
    if args.json:
        print('{"hello": ' + to_json(hello.hello) + ',\n "batch": ' + to_json(batch.batch) + "}")
        return 0
    print(f"host {config.hostname}  labels {config.labels}")
    print(
        f"{'interface':<16}{'rx bit/s':>14}{'tx bit/s':>14}{'rx pkts':>10}{'tx pkts':>10}{'errs':>6}"
        f"{'drops':>7}{'speed':>12}{'util':>8}"
    )
    for s in samples:
        util = f"{s.utilization * 100:.1f}%" if s.utilization >= 0 else "-"
        speed = f"{s.speed_bps / 1e6:.0f}Mb" if s.speed_bps else "-"
        print(
            f"{s.interface:<16}{s.rx_bps:>14.0f}{s.tx_bps:>14.0f}{s.rx_packets:>10}{s.tx_packets:>10}"
            f"{s.rx_errors + s.tx_errors:>6}{s.rx_drops + s.tx_drops:>7}{speed:>12}{util:>8}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runner import Agent  # heavier imports only where needed

    config = _config(args)
    agent = Agent(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(main())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.identity import load_or_create_agent_id
    from agent.spool import Spool

    config = _config(args)
    if not config.spool_path.exists():
        raise AgentError(f"no agent state in {config.state_dir} (has the agent run here?)")
    agent_id = load_or_create_agent_id(config.state_dir)
    with Spool(config.spool_path, max_bytes=config.spool_max_bytes) as spool:
        s = spool.stats()
    print(f"agent id        {agent_id}")
    print(f"collector       {config.collector}")
    print(f"spooled         {s.batches} batches, {s.bytes} bytes (seq {s.oldest_seq}..{s.newest_seq})")
    print(f"next seq        {s.next_seq}")
    print(f"dropped (total) {s.dropped_batches_total} batches, {s.dropped_facts_total} facts")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handlers = {"once": cmd_once, "run": cmd_run, "status": cmd_status}
    try:
        return handlers[args.command](args)
    except AgentError as exc:
        print(f"zonewatch-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""zonewatch-agent: the command line. It only wires: parse, build the config, call, print."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from agent import __version__, clidoc, logfmt
from agent.config import DEFAULT_CONFIG, AgentConfig, load_config
from agent.credentials import Credentials, is_enrolled, load_credentials, read_enrollment
from agent.errors import AgentError, ConfigError, CredentialsError, NotEnrolledError
from agent.sensors.interfaces import InterfaceSampler
from agent.wire import batch_request, hello_request, to_json

PROG = "zonewatch-agent"
TOKEN_ENV = "ZONEWATCH_TOKEN"  # enroll's token, out of the process list
EXAMPLES = """\
examples:
  zonewatch-agent enroll --collector 10.0.0.5:7390 --token zwt_… --ca-fingerprint SHA256:9f86…
  zonewatch-agent run                              report to the collector it enrolled with
  zonewatch-agent once --json                      print one report, send nothing
  zonewatch-agent run --insecure --collector 127.0.0.1:7390 --department 市公安局   (lab, no TLS)
  zonewatch-agent status --state-dir /var/lib/zonewatch-agent
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help=f"TOML config file (default: {DEFAULT_CONFIG} if present)"
    )
    parser.add_argument(
        "--collector",
        help="collector HOST:PORT (default: the one it enrolled with, else 127.0.0.1:7390)",
    )
    _state_dir(parser)
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext gRPC and a random agent id, for a lab collector without TLS"
        " (config: insecure = true)",
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


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the agent keeps its key, certificate and spool (default /var/lib/zonewatch-agent)",
    )


def _enroll_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help=f"TOML config file (default: {DEFAULT_CONFIG} if present)"
    )
    parser.add_argument(
        "--collector",
        required=True,
        help="the collector's address HOST:PORT (its mTLS port; recorded for `run`)",
    )
    # A token on the command line is visible to every user in the process list: the file or the
    # environment (readable by this user and root only) keep it out of there.
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        help="one-time enrollment token from `zonewatch-collector tokens create` (seen in the process"
        f" list: prefer --token-file or ${TOKEN_ENV})",
    )
    token.add_argument(
        "--token-file", type=Path, metavar="FILE", help="read the token from FILE (its first line)"
    )
    parser.add_argument(
        "--ca-fingerprint",
        required=True,
        help="SHA-256 fingerprint of the collector's CA, as `zonewatch-collector init` printed it",
    )
    parser.add_argument(
        "--enroll-port",
        type=int,
        default=0,
        help="the collector's enrollment port (default: the --collector port + 1)",
    )
    _state_dir(parser)
    parser.add_argument("--hostname", help="hostname to enroll as (default: this host's)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing enrollment: a new key and identity (the spool is kept)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the collector at each step (default 30)",
    )
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
    enroll = sub.add_parser(
        "enroll",
        help="get this agent's certificate from the collector with a one-time token",
        description="Check the collector's CA against --ca-fingerprint, make this host's key, and "
        "trade the token for a client certificate. Stores tls/agent.key (0600), tls/agent.crt, "
        "tls/ca.crt and enrollment.json in the state directory. The token comes from --token, "
        f"--token-file or the environment variable {TOKEN_ENV}, in that order.",
        epilog=clidoc.examples(
            PROG,
            "enroll --collector 10.0.0.5:7390 --token zwt_… --ca-fingerprint SHA256:9f86…",
            "enroll --collector 10.0.0.5:7390 --token zwt_… --ca-fingerprint SHA256:9f86… --force",
            "enroll --collector 10.0.0.5:7390 --token-file /root/token --ca-fingerprint SHA256:9f86…",
            f"enroll --collector 10.0.0.5:7390 --ca-fingerprint SHA256:9f86…   # the token from ${TOKEN_ENV}",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _enroll_arguments(enroll)
    logfmt.add_format_option(enroll)
    run = sub.add_parser(
        "run",
        help="sample and report to the collector until stopped (SIGTERM/Ctrl-C)",
        description="Sample every interval, keep reports in the durable spool, deliver them "
        "to the collector and delete them once acknowledged.",
        epilog=clidoc.examples(
            PROG,
            "run",
            "run --config /etc/zonewatch/agent.toml -v",
            "run --log-format json   # one JSON object per log line, also on a terminal",
            "run --insecure --collector 127.0.0.1:7390 --department 市公安局   # a lab: no TLS",
            "run --cpu-budget 2 --rss-budget 60   # a busy gateway: a larger budget",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _common(run)
    run.add_argument(
        "--cpu-budget",
        type=float,
        dest="cpu_budget_percent",
        metavar="PERCENT",
        help="CPU budget in %% of one core; over it the agent samples the capture, then lengthens"
        " intervals, then stops the capture (default 1; 0: not watched)",
    )
    run.add_argument(
        "--rss-budget",
        type=float,
        dest="rss_budget_mb",
        metavar="MB",
        help="memory budget (RSS); over it the agent frees memory, shrinks capture tables, then"
        " degrades as for CPU (default 40; 0: not watched)",
    )
    run.add_argument(
        "--budget-window",
        type=float,
        dest="budget_window_s",
        metavar="SECONDS",
        help="CPU is judged over this rolling window (default 30)",
    )
    logfmt.add_format_option(run)
    once = sub.add_parser(
        "once",
        help="take one sample and print the report that would be sent",
        description="Sample the interfaces twice, --interval apart (default 1 s), and print "
        "the report. Contacts no collector and writes nothing.",
        epilog=clidoc.examples(PROG, "once", "once --json --interface eth0 --interval 5"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _common(once)
    once.add_argument(
        "--json", action="store_true", help="print the report as JSON (the proto3 JSON mapping)"
    )
    status = sub.add_parser(
        "status",
        help="show enrollment, agent id, certificate expiry and spool backlog",
        description="Read the state directory: enrolled or not, agent id, collector, labels, "
        "certificate expiry, spooled batches, dropped facts. Contacts nothing.",
        epilog=clidoc.examples(PROG, "status", "status --state-dir /var/lib/zonewatch-agent"),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    _common(status)
    clidoc.add_parser(sub, PROG).set_defaults(verbose=False)  # main reads args.verbose
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
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
            "insecure",
            "cpu_budget_percent",
            "rss_budget_mb",
            "budget_window_s",
        )
    }
    if getattr(args, "interfaces", None):
        overrides["interfaces"] = tuple(args.interfaces)
    return load_config(args.config, overrides, collector_default=_enrolled_collector)


def _enrolled_collector(config: AgentConfig) -> str | None:
    if config.insecure:
        return None
    try:
        enrollment = read_enrollment(config.state_dir)
    except CredentialsError:
        return None  # run and status report the damage themselves
    return enrollment.collector if enrollment is not None else None


def _credentials(config: AgentConfig) -> Credentials | None:
    """The enrolled identity; None when insecure; NotEnrolledError (with the fix) when neither."""
    return None if config.insecure else load_credentials(config.state_dir)


def _token(args: argparse.Namespace) -> str:
    """The enrollment token from --token, --token-file or $ZONEWATCH_TOKEN; ConfigError when none."""
    if args.token:
        return str(args.token).strip()
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no enrollment token: pass --token, --token-file FILE or set {TOKEN_ENV}")
    return token


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import EnrollOptions, enroll  # cryptography: only for this command
    from agent.renewal import format_ms, renewal_due_ms

    args.token = _token(args)
    logfmt.register_secret(args.token)  # a one-time secret: never in a log line, not even in an error
    config = load_config(args.config, {"state_dir": args.state_dir, "hostname": args.hostname})
    result = enroll(
        EnrollOptions(
            collector=args.collector,
            token=args.token,
            ca_fingerprint=args.ca_fingerprint,
            state_dir=config.state_dir,
            hostname=config.hostname,
            enroll_port=args.enroll_port,
            force=args.force,
            timeout_s=args.timeout,
        )
    )
    e = result.enrollment
    due = renewal_due_ms(result.not_before_ms, e.not_after_ms, 0.0)
    print(f"enrolled as agent {e.agent_id}")
    print(f"collector       {e.collector} (enrollment port {e.enroll_port})")
    print(f"labels          {_labels(e.labels)}")
    print(f"certificate     valid until {format_ms(e.not_after_ms)}", end="")
    print(f"; renewed automatically from about {format_ms(due)}")
    paths = result.paths
    print(f"stored in       {paths.tls_dir}/ (agent.key 0600, agent.crt, ca.crt), {paths.enrollment}")
    if result.kept_spool:
        print("spool           kept: undelivered batches go out under the new identity;", end="")
        print(" sequence numbers continue")
    return 0


def _labels(labels: dict[str, str]) -> str:
    shown = " ".join(f"{name}={value}" for name, value in labels.items() if value)
    return shown or "(none)"


def cmd_once(args: argparse.Namespace) -> int:
    config = _config(args)
    interval = args.interval_s if args.interval_s is not None else 1.0
    sampler = InterfaceSampler(include=config.interfaces)
    sampler.sample()
    time.sleep(interval)
    samples = sampler.sample()
    now = time.time_ns() // 1_000_000
    agent_id, labels = "(assigned at first run)", config.labels
    if not config.insecure:
        try:
            credentials = load_credentials(config.state_dir)
            agent_id, labels = credentials.agent_id, credentials.labels
        except NotEnrolledError:
            agent_id = "(not enrolled)"
    hello = hello_request(agent_id, config.hostname, __version__, labels, "", now)
    batch = batch_request(1, now, now, samples)
    if args.json:
        print('{"hello": ' + to_json(hello.hello) + ',\n "batch": ' + to_json(batch.batch) + "}")
        return 0
    print(f"host {config.hostname}  agent {agent_id}  labels {labels}")
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
    credentials = _credentials(config)
    if credentials is None:
        logging.getLogger("agent").warning(
            "insecure: plaintext gRPC to %s, random agent id, nothing verified (for a lab collector only)",
            config.collector,
        )
    agent = Agent(config, credentials=credentials)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(main())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.identity import read_agent_id
    from agent.renewal import certificate_status, format_ms, renewal_due_ms
    from agent.spool import Spool

    config = _config(args)
    if not config.spool_path.exists() and (config.insecure or not is_enrolled(config.state_dir)):
        raise AgentError(
            f"no agent state in {config.state_dir} (not enrolled, and the agent has not run here)"
        )
    healthy = True
    if config.insecure:
        print("enrolled        insecure mode: plaintext, random id")
        print(f"agent id        {read_agent_id(config.state_dir) or '(assigned at first run)'}")
        print(f"labels          {_labels(config.labels)}")
    else:
        try:
            credentials = load_credentials(config.state_dir)
        except CredentialsError as exc:
            healthy = False
            print(f"enrolled        no: {exc}")
            insecure_id = read_agent_id(config.state_dir)
            if insecure_id:
                print(f"agent id        {insecure_id} (the random id of an earlier insecure run)")
        else:
            e = credentials.enrollment
            renewed = f", renewed {format_ms(e.renewed_ms)}" if e.renewed_ms else ""
            print(f"enrolled        yes, {format_ms(e.enrolled_ms)}{renewed}")
            print(f"agent id        {credentials.agent_id}")
            print(f"labels          {_labels(credentials.labels)}")
            cert = credentials.certificate
            # No spread: "renewal from" is the earliest the agent may renew.
            due = renewal_due_ms(cert.not_before_ms, cert.not_after_ms, 0.0)
            state = certificate_status(cert.not_after_ms, due, time.time_ns() // 1_000_000)
            print(f"certificate     {state} (serial {cert.serial:x})")
            healthy = not state.startswith("expired")
    print(f"collector       {config.collector}")
    if config.spool_path.exists():
        with Spool(config.spool_path, max_bytes=config.spool_max_bytes) as spool:
            s = spool.stats()
        print(f"spooled         {s.batches} batches, {s.bytes} bytes (seq {s.oldest_seq}..{s.newest_seq})")
        print(f"next seq        {s.next_seq}")
        print(f"dropped (total) {s.dropped_batches_total} batches, {s.dropped_facts_total} facts")
    else:
        print("spooled         nothing yet (the agent has not run here)")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only the long-running commands offer --log-format; the others log (rarely) as text.
    logfmt.configure(
        getattr(args, "log_format", "text"),
        verbose=args.verbose,
        journal_stream=os.environ.get("JOURNAL_STREAM"),
    )
    handlers = {
        "enroll": cmd_enroll,
        "once": cmd_once,
        "run": cmd_run,
        "status": cmd_status,
        "completion": lambda args: clidoc.print_script(build_parser(), args.shell),
    }
    try:
        return handlers[args.command](args)
    except AgentError as exc:
        logfmt.report_error(PROG, str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

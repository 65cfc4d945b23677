"""City in a box: build a small city of test hosts, drive it for a couple of minutes, write the report.

    sudo .venv/bin/python deploy/city.py [--minutes 2] [--out city-report.html] [--lang zh|en] [--keep DIR]

Why: the whole chain (agents, mTLS, collector, SQLite, rules, incidents, migration states, the report) is
easiest to judge on a city that behaves like one: departments and counties on the extranet, a province
platform at the far end of the vertical link, a dedicated network being retired, an attacker on the
internet, an operator at the console. Everything here is real (namespaces, packets, processes); nothing
leaves the machine. The scenario is ``run_city()``, which tests/e2e/test_city_netns.py runs in a shorter
version, so the demo and its test build the same city.

The hosts are built by tests/testnet.py and the collector and agents started by tests/e2e/fleet.py, the
helpers every end-to-end test uses; attacks come from tests/e2e/attacks.py.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from fleet import enroll, log_tail, run_agent, start_collector, stop, stored  # noqa: E402
from testnet import EXTRA_SUBNETS, SUBNETS, Host, TestNetError, TestNetwork, missing_capability  # noqa: E402

from collector.store import open_database  # noqa: E402
from collector.store.incidents import list_incidents  # noqa: E402
from collector.store.migration import states  # noqa: E402
from collector.store.traffic import traffic  # noqa: E402

ATTACKS = ROOT / "tests" / "e2e" / "attacks.py"
DEDICATED = "公安专网"
VERTICAL = "省电子政务外网（纵向）"
HORIZONTAL = "市电子政务外网（横向）"
POLICE = "市公安局"
# Small enough that the demo's modest iperf3 rates show as real load on the report's link charts.
VERTICAL_CAPACITY, HORIZONTAL_CAPACITY = "100M", "1G"
VERTICAL_UP, VERTICAL_DOWN, HORIZONTAL_RATE = "30M", "20M", "40M"
WEB_PORT, PORTAL_PORT, SSH_PORT, LEGACY_PORT = 8080, 80, 22, 1521
SCAN_FIRST_PORT, SCAN_PORTS, SCAN_THRESHOLD, SWEEP_PORT, BRUTE_FORCE_ATTEMPTS = 1000, 100, 15, 445, 20
OPERATOR = "值班员 王五"
WAIT_S = 20.0  # how long a stage waits for the collector to see what it did before giving up
STATUS_S = 15.0  # a status line this often while the city runs on by itself

Progress = Callable[[float, str], None]


class CityError(Exception):
    """The city could not be built or did not behave as the scenario expects."""


@dataclass(frozen=True)
class CityHost:
    """One host of the city: its test-network subnets, its labels when it runs an agent, its part."""

    name: str  # the namespace's host name, and the hostname its agent reports
    subnets: tuple[str, ...]
    story: str
    department: str = ""
    county: str = ""
    role: str = ""

    @property
    def agent(self) -> bool:
        return bool(self.department)


CITY = (
    CityHost("collector", ("extranet",), "zonewatch-collector (mTLS), the city's monitoring centre"),
    CityHost("province", ("province",), "省级政务服务平台: portal and data exchange, no agent"),
    CityHost("ga-legacy", ("dedicated",), "户籍/计费 legacy servers on 公安专网, no agent"),
    CityHost("attacker", ("internet",), "an attacker on the internet"),
    CityHost("ga-ws-01", ("extranet", "dedicated"), "dual-homed; 户籍同步 still on 公安专网 (the blocker)",
             POLICE, "高新区", "office"),
    CityHost("ga-ws-02", ("extranet",), "migrated: no 公安专网 address, route or traffic",
             POLICE, "东县", "office"),
    CityHost("ga-ws-03", ("extranet",), "migrated, then regresses: legacy billing talks to 公安专网 again",
             POLICE, "高新区", "office"),
    CityHost("ga-db-01", ("extranet", "dedicated"), "dual-homed database, exempted by the CLI",
             POLICE, "东县", "server"),
    CityHost("cz-ws-01", ("extranet",), "uploads to the province, sends to 市教育局, browses the portal",
             "市财政局", "高新区", "office"),
    CityHost("jy-web-01", ("extranet",), "web and SSH server, downloads from the province; attacked",
             "市教育局", "东县", "server"),
)  # fmt: skip
BLOCKERS = {"ga-ws-01": "hukou_sync.py", "ga-ws-03": "legacy_billing.py"}

# Flows reported every 5 s while they run: blockers show up within seconds, not the default 2 minutes.
AGENT_CONFIG = "flow_idle_timeout = 5\nflow_active_timeout = 5\n"
LEGACY_SERVER = """\
import socket, socketserver, sys
class Drain(socketserver.BaseRequestHandler):
    def handle(self):
        while self.request.recv(65536):
            pass
class Server(socketserver.ThreadingTCPServer):
    daemon_threads = allow_reuse_address = True
Server(("0.0.0.0", int(sys.argv[1])), Drain).serve_forever()
"""
LEGACY_CLIENT = """\
import socket, sys, time
while True:  # a legacy system's sync: a record every half second, reconnecting when the link drops
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
            while True:
                conn.sendall(b"R" * 20_000)
                time.sleep(0.5)
    except OSError:
        time.sleep(1)
"""


class AttackRun(NamedTuple):
    name: str
    rule: str  # the default pack's rule it raises
    source: str  # the attacker's address
    targets: tuple[str, ...]
    started_ms: int
    incident: int  # the incident it raised


class OperatorAction(NamedTuple):
    incident: int
    rule: str
    action: str  # the CLI's verb: ack or resolve
    status: str  # the status it leads to
    by: str
    comment: str


@dataclass
class CityResult:
    """What a run built and did, and what the database must therefore say."""

    workdir: Path
    db: Path
    started_ms: int = 0  # when the agents were all reporting and the drive began
    finished_ms: int = 0
    quiet_s: int = 0  # the collector's migration quiet period
    hosts: dict[str, CityHost] = field(default_factory=dict)
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> subnet -> IPv4 address
    migration: dict[str, str] = field(default_factory=dict)  # host -> expected state towards 公安专网
    regressed: tuple[str, ...] = ()  # hosts seen going migrated -> regressed
    blockers: dict[str, str] = field(default_factory=dict)  # host -> script still using 公安专网
    attacks: list[AttackRun] = field(default_factory=list)
    actions: list[OperatorAction] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    unclean_stops: list[str] = field(default_factory=list)  # processes that did not exit 0 on SIGTERM


def zone_catalog(collector_address: str) -> str:
    """The city's zones. The collector's own address is a zone apart: reporting to it is monitoring,
    not use of the extranet, so it never makes a host look dual-homed or busy."""
    province4, province6 = EXTRA_SUBNETS["province"]
    extranet4, extranet6 = SUBNETS["extranet"]
    dedicated4, dedicated6 = SUBNETS["dedicated"]
    return f"""\
zones:
  - name: {VERTICAL}
    kind: extranet
    direction: vertical
    cidrs: [{province4}, "{province6}"]
    capacity: {VERTICAL_CAPACITY}
  - name: {HORIZONTAL}
    kind: extranet
    direction: horizontal
    cidrs: [{extranet4}, "{extranet6}"]
    capacity: {HORIZONTAL_CAPACITY}
  - name: {DEDICATED}
    kind: dedicated
    department: {POLICE}
    cidrs: [{dedicated4}, "{dedicated6}"]
  - name: 监控中心
    kind: local
    cidrs: [{collector_address}/32]
  - name: 互联网
    kind: internet
    cidrs: [0.0.0.0/0, "::/0"]
"""


def print_stage(elapsed: float, message: str) -> None:
    print(f"[{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


def quiet_period(seconds: float) -> int:
    """The migration quiet period for a drive of ``seconds``: short enough that a host is migrated,
    then regresses, within the first half of the drive; never below the agents' reporting cadence."""
    return int(max(8, min(30, seconds // 4)))


def zonewatch(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`zonewatch-collector ARGS` as an operator types it (on this host: the database is a file)."""
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if check and result.returncode != 0:
        command = " ".join(map(str, args[:2]))
        raise CityError(f"zonewatch-collector {command} … failed: {result.stderr.strip()[-500:]}")
    return result


class _Clock:
    """Elapsed time since the run began, and the stage lines with it (kept for the result)."""

    def __init__(self, progress: Progress, result: CityResult) -> None:
        self.start = time.monotonic()
        self.progress, self.result = progress, result

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        self.result.timeline.append((round(elapsed, 1), message))
        self.progress(elapsed, message)


@contextmanager
def _reader(db: Path) -> Iterator[sqlite3.Connection]:
    con = open_database(db, readonly=True)
    try:
        yield con
    finally:
        con.close()


def _wait(what: str, predicate: Callable[[], object], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise CityError(f"{what}: not seen within {timeout:g} s")
        time.sleep(0.25)


def run_city(workdir: Path, *, seconds: float, progress: Progress = print_stage) -> CityResult:
    """Build the city in ``workdir`` (database, PKI, logs, agents' state), drive it for ``seconds``
    after every agent reports, stop everything it started and return what the database must show.
    The network and every process are gone when it returns or raises (CityError on a stage that
    does not happen in time)."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = CityResult(workdir, workdir / "collector.db", quiet_s=quiet_period(seconds))
    result.hosts = {h.name: h for h in CITY}
    clock = _Clock(progress, result)
    clock(f"building {len(CITY)} test hosts in network namespaces")
    with TestNetwork(extra_subnets=["province"]) as net:
        hosts = {h.name: net.add_host(h.name, *h.subnets) for h in CITY}
        result.addresses = {name: dict(host.addr4) for name, host in hosts.items()}
        _City(hosts, result, clock).run(seconds)
    clock("network namespaces removed")
    return result


class _City:
    """One run of the scenario on a built network (the stages in the order they happen)."""

    def __init__(self, hosts: dict[str, Host], result: CityResult, clock: _Clock) -> None:
        self.hosts, self.result, self.say = hosts, result, clock
        self.work, self.db = result.workdir, result.db
        self.agents: dict[str, subprocess.Popen[Any]] = {}
        self.collector: subprocess.Popen[Any] | None = None
        self.listen = ""  # the collector's HOST:PORT, once it serves
        self.begin = self.last_status = time.monotonic()
        self.seconds = 0.0

    def addr(self, host: str, subnet: str = "extranet") -> str:
        return self.hosts[host].addr4[subnet]

    def run(self, seconds: float) -> None:
        try:
            self.start_services()
            self.start_collector()
            self.start_agents()
            self.drive(seconds)
        finally:
            self.stop_monitoring()

    # --- setup ------------------------------------------------------------------------------

    def start_services(self) -> None:
        """What runs before monitoring starts: it is there already, not a new listener."""
        www = self.work / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("<h1>省级政务服务平台</h1>\n", encoding="utf-8")
        for name, code in (
            ("legacy_server.py", LEGACY_SERVER),
            *((s, LEGACY_CLIENT) for s in BLOCKERS.values()),
        ):
            (self.work / name).write_text(code, encoding="utf-8")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        province, web, legacy = self.hosts["province"], self.hosts["jy-web-01"], self.hosts["ga-legacy"]
        province.python_popen(
            "-m", "http.server", "--bind", "0.0.0.0", "--directory", www, PORTAL_PORT, **quiet
        )
        for port in (5201, 5202):
            province.popen("iperf3", "-s", "-p", port, **quiet)
        web.python_popen("-m", "http.server", "--bind", "0.0.0.0", "--directory", www, WEB_PORT, **quiet)
        web.python_popen(ATTACKS, "serve", SSH_PORT, **quiet)
        web.popen("iperf3", "-s", "-p", 5201, **quiet)
        legacy.python_popen(self.work / "legacy_server.py", LEGACY_PORT, **quiet)
        listening = {province: 3, web: 3, legacy: 1}
        _wait("the services listening", lambda: all(
            h.run("ss", "-Hltn").stdout.count("LISTEN") >= n for h, n in listening.items()
        ))  # fmt: skip
        self.say("services up: province portal and iperf3, 市教育局 web/SSH/iperf3, 公安专网 legacy server")

    def start_collector(self) -> None:
        zones = self.work / "zones.yaml"
        central = self.hosts["collector"]
        zones.write_text(zone_catalog(central.addr4["extranet"]), encoding="utf-8")
        q = self.result.quiet_s
        self.collector, self.listen = start_collector(
            central, self.db, zones, tls=True, log=self.work / "collector.log",
            extra=("--migration-quiet", f"{q}s", "--migration-interval", "1"),
        )  # fmt: skip
        self.say(f"collector serving mTLS on {self.listen} (migration quiet period {q} s)")

    def start_agents(self) -> None:
        config = self.work / "agent.toml"
        config.write_text(AGENT_CONFIG, encoding="utf-8")
        agents = [h for h in CITY if h.agent]

        def enroll_one(h: CityHost) -> None:
            labels = {"department": h.department, "county": h.county, "role": h.role}
            enroll(self.hosts[h.name], self.hosts["collector"], self.db, self.listen, self.work / h.name,
                   h.name, **labels)  # fmt: skip

        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(enroll_one, agents))
        self.say(f"{len(agents)} agents enrolled with one-time tokens (labels: department, county, role)")
        for h in agents:
            host, log = self.hosts[h.name], self.work / f"{h.name}.log"
            self.agents[h.name] = run_agent(
                host, self.work / h.name, h.name, "--config", str(config), log=log
            )

        def reporting() -> bool:
            return all(stored(self.db, name).batches for name in self.agents)

        try:
            _wait("every agent reporting", reporting, timeout=60)
        except CityError as exc:
            logs = "\n".join(log_tail(self.work / f"{n}.log", 5) for n in self.agents)
            raise CityError(f"{exc}\n{logs}") from None
        self.say(f"{len(agents)} agents reporting every second over mTLS")

    # --- the drive --------------------------------------------------------------------------

    def drive(self, seconds: float) -> None:
        """The stages at their share of the drive; a stage that waits on the collector may push the
        later ones back, never the end before ``seconds``."""
        self.result.started_ms = _now_ms()
        self.begin, self.seconds = time.monotonic(), seconds
        self.last_status = self.begin
        self.ordinary_traffic(int(seconds) + 120)  # stopped at the end, whatever the stages took
        self.run_on(0.05)
        self.exempt()
        self.run_on(0.15)
        self.attack()
        self.operate()
        self.migrate()
        self.run_on(0.5)
        self.regress()
        self.run_on(1.0)
        self.status()
        self.result.finished_ms = _now_ms()
        self.say(f"drive over after {time.monotonic() - self.begin:.0f} s")

    def run_on(self, fraction: float) -> None:
        """Let the city run until this share of the drive, with a status line every STATUS_S."""
        until = self.begin + fraction * self.seconds
        while (now := time.monotonic()) < until:
            due = self.last_status + STATUS_S
            time.sleep(max(0.0, min(until, due) - now))
            if time.monotonic() >= due:
                self.status()

    def ordinary_traffic(self, seconds: int) -> None:
        h, quiet = self.hosts, {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        province, web = self.addr("province", "province"), self.addr("jy-web-01")
        h["cz-ws-01"].popen("iperf3", "-c", province, "-p", 5201, "-t", seconds, "-b", VERTICAL_UP, **quiet)
        h["jy-web-01"].popen("iperf3", "-c", province, "-p", 5202, "-t", seconds, "-b", VERTICAL_DOWN, "-R",
                             **quiet)  # fmt: skip
        h["cz-ws-01"].popen("iperf3", "-c", web, "-p", 5201, "-t", seconds, "-b", HORIZONTAL_RATE, **quiet)
        for client, (target, port) in {
            "cz-ws-01": (province, PORTAL_PORT), "ga-ws-02": (province, PORTAL_PORT),
            "ga-db-01": (web, WEB_PORT), "ga-ws-03": (web, WEB_PORT),
        }.items():  # fmt: skip
            h[client].python_popen(ATTACKS, "clients", target, port, seconds, **quiet)
        h["ga-ws-01"].python_popen(self.work / BLOCKERS["ga-ws-01"], self.addr("ga-legacy", "dedicated"),
                                   LEGACY_PORT, **quiet)  # fmt: skip
        self.result.blockers["ga-ws-01"] = BLOCKERS["ga-ws-01"]
        self.say(
            f"ordinary traffic: vertical {VERTICAL_UP} up + {VERTICAL_DOWN} down of {VERTICAL_CAPACITY}, "
            f"horizontal {HORIZONTAL_RATE} of {HORIZONTAL_CAPACITY}, web clients; "
            f"ga-ws-01 syncs 户籍 over {DEDICATED}"
        )

    def state(self, host: str) -> str:
        with _reader(self.db) as con:
            rows = states(con, network=DEDICATED)
        return next((r.state for r in rows if r.hostname == host), "none")

    def wait_state(self, host: str, expected: str, timeout: float = WAIT_S) -> None:
        """Until the collector decides ``host`` is ``expected`` towards 公安专网."""
        deadline = time.monotonic() + timeout
        while (now := self.state(host)) != expected:
            if time.monotonic() > deadline:
                raise CityError(f"{host} is {now} on {DEDICATED}, not {expected}, after {timeout:g} s")
            time.sleep(0.25)
        self.result.migration[host] = expected

    def exempt(self) -> None:
        reason = "户籍数据库待外网链路验收后迁移"
        zonewatch("migration", "exempt", "ga-db-01", "--db", self.db, "--network", DEDICATED,
                  "--reason", reason, "--approved-by", "李局长", "--reference", "OA-2026-118",
                  "--until", "30d")  # fmt: skip
        self.wait_state("ga-db-01", "exempt")
        self.say("exemption granted for ga-db-01 on 公安专网 (migration exempt, until 30d): exempt")

    def attack(self) -> None:
        attacker, source = self.hosts["attacker"], self.addr("attacker", "internet")
        web = self.addr("jy-web-01")
        monitored = tuple(self.addr(h.name) for h in CITY if h.agent)
        for name, rule, targets, args in (
            (f"SYN scan of {SCAN_PORTS} ports", "port_scan_vertical", (web,),
             ("syn-scan", web, SCAN_FIRST_PORT, SCAN_PORTS, SCAN_THRESHOLD)),
            (f"sweep of port {SWEEP_PORT}", "port_scan_horizontal", monitored,
             ("sweep", SWEEP_PORT, *monitored)),
            (f"{BRUTE_FORCE_ATTEMPTS} SSH connections", "admin_brute_force", (web,),
             ("connect", web, SSH_PORT, BRUTE_FORCE_ATTEMPTS)),
        ):  # fmt: skip
            started = _now_ms()
            attacker.python(ATTACKS, *args, timeout=60)
            incident = self.incident(rule)
            self.result.attacks.append(AttackRun(name, rule, source, targets, started, incident))
            self.say(f"attack from {source}: {name} -> incident {incident} ({rule})")

    def incident(self, rule: str) -> int:
        found: list[int] = []

        def raised() -> bool:
            with _reader(self.db) as con:
                found[:] = [i.id for i in list_incidents(con, status="all", rule=rule)]
            return bool(found)

        _wait(f"an incident of {rule}", raised)
        return min(found)  # the one this attack raised: nothing else in the city matches its rule

    def operate(self) -> None:
        by_rule = {a.rule: a.incident for a in self.result.attacks}
        for rule, verb, status, comment in (
            ("port_scan_vertical", "ack", "acknowledged", "正在排查扫描源"),
            ("admin_brute_force", "resolve", "resolved", "已在边界封禁该地址"),
        ):
            incident = by_rule[rule]
            zonewatch("incidents", verb, incident, "--db", self.db, "--by", OPERATOR, "--comment", comment)
            self.result.actions.append(OperatorAction(incident, rule, verb, status, OPERATOR, comment))
            self.say(f"operator: incidents {verb} {incident} ({rule}) -> {status}")

    def migrate(self) -> None:
        timeout = self.result.quiet_s + WAIT_S
        for host, expected in (
            ("ga-ws-01", "dual_homed"),
            ("ga-ws-02", "migrated"),
            ("ga-ws-03", "migrated"),
        ):
            self.wait_state(host, expected, timeout)
        self.say("migration: ga-ws-01 dual_homed, ga-ws-02 and ga-ws-03 migrated, ga-db-01 exempt")

    def regress(self) -> None:
        target = self.addr("ga-legacy", "dedicated")
        self.hosts["ga-ws-03"].python_popen(self.work / BLOCKERS["ga-ws-03"], target, LEGACY_PORT,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.wait_state("ga-ws-03", "regressed")
        self.result.regressed = ("ga-ws-03",)
        self.result.blockers["ga-ws-03"] = BLOCKERS["ga-ws-03"]
        self.say(f"ga-ws-03 talks to {DEDICATED} again (legacy billing): regressed")

    def status(self) -> None:
        """One line while the city runs on: the links' load over the last whole 10 s, incidents, states."""
        self.last_status = time.monotonic()
        elapsed = self.last_status - self.begin
        until = (_now_ms() - 2_000) // 10_000 * 10_000  # a whole bucket the agents have reported
        with _reader(self.db) as con:
            rows = traffic(con, by="zone", since_ms=until - 10_000, until_ms=until, bucket_ms=10_000)
            active = len(list_incidents(con, status="active"))
            counts: dict[str, int] = {}
            for row in states(con, network=DEDICATED):
                counts[row.state] = counts.get(row.state, 0) + 1
        load = ", ".join(
            f"{r.group} ↑{r.avg_out_bps / 1e6:.0f} ↓{r.avg_in_bps / 1e6:.0f} Mbit/s"
            for r in rows
            if r.kind == "extranet"
        )
        migration = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self.say(
            f"{elapsed:.0f}/{self.seconds:.0f} s: {load}; {active} active incidents; {DEDICATED}: {migration}"
        )

    # --- teardown ---------------------------------------------------------------------------

    def stop_monitoring(self) -> None:
        """Agents first (their last batches delivered), then the collector; each must exit 0 on SIGTERM.
        The rest (traffic, services, attackers) goes with the network, by PID."""

        def stop_agent(name: str) -> None:
            try:
                stop(self.hosts[name], self.agents[name], self.work / f"{name}.log")
            except AssertionError as exc:
                self.result.unclean_stops.append(str(exc).splitlines()[0])

        with ThreadPoolExecutor(max_workers=len(self.agents) or 1) as pool:
            list(pool.map(stop_agent, self.agents))
        if self.collector is not None:
            try:
                stop(self.hosts["collector"], self.collector, self.work / "collector.log")
            except AssertionError as exc:
                self.result.unclean_stops.append(str(exc).splitlines()[0])
        if self.agents or self.collector:
            self.say("agents and collector stopped")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the report and the command line ---------------------------------------------------------------


def write_report(db: Path, out: Path, lang: str, since: str = "1h") -> None:
    """The report an operator reads after the run, by the collector's own command."""
    zonewatch("report", "--db", db, "--since", since, "--out", out, "--lang", lang)


EXAMPLES = """\
examples:
  sudo bash deploy/city.sh                                  # 2 minutes, report in ./city-report.html
  sudo .venv/bin/python deploy/city.py --minutes 5 --lang en --out /tmp/city.html
  sudo .venv/bin/python deploy/city.py --keep /tmp/city      # keep the database, logs and PKI
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="city.py",
        description=textwrap.fill(
            "Build a small city of test hosts in network namespaces (a collector, agents in three "
            "departments and two counties, a province platform, a dedicated network being retired, an "
            "attacker), drive it for a few minutes and write the collector's report. Needs root, iproute2, "
            "nftables and iperf3; nothing leaves this machine.",
            88,
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="how long to drive the city once every agent reports, 0.5 to 60 (default 2; setup adds seconds)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("city-report.html"),
        help="the HTML report (default ./city-report.html)",
    )
    parser.add_argument(
        "--lang", choices=("zh", "en"), default="zh", help="the report's language (default zh)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the database, logs, PKI and agents' state in DIR, a new or empty directory "
        "(default: a temporary directory, removed at exit)",
    )
    return parser


def _interrupted(signum: int, frame: object) -> None:
    """The first Ctrl-C or SIGTERM unwinds (which removes the network); more while that runs are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _give_back(path: Path) -> None:
    """Under sudo, hand what we wrote for the user back to the user."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid is None or gid is None or not path.exists():
        return
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chown(p, int(uid), int(gid), follow_symlinks=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.5 <= args.minutes <= 60:
        parser.error(f"--minutes must be between 0.5 and 60, got {args.minutes:g}")
    if args.keep and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        parser.error(f"--keep {args.keep}: give a new or empty directory")
    if reason := missing_capability(iperf3=True):
        print(f"city.py: {reason}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)

    def progress(elapsed: float, message: str) -> None:
        console.print(f"[dim]{elapsed:6.1f} s[/]  {escape(message)}")

    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    workdir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="zonewatch-city-"))
    out = args.out.resolve()
    try:
        result = run_city(workdir, seconds=args.minutes * 60, progress=progress)
        started = time.monotonic()
        write_report(result.db, out, args.lang, since=f"{math.ceil(args.minutes) + 10}m")  # the whole run
        _give_back(out)
        console.print(f"report written in {time.monotonic() - started:.1f} s")
        print(f"report:   {out}")
        for line in result.unclean_stops:
            console.print(f"[yellow]warning:[/] {escape(line)}")
        if args.keep:
            _give_back(workdir)
            print(f"database: {result.db}  (logs, PKI and the agents' state beside it)")
        else:
            print("database: removed with its temporary directory (--keep DIR keeps it)")
        return 0
    except KeyboardInterrupt:
        console.print("interrupted: every process stopped, network namespaces removed")
        return 130
    except (CityError, TestNetError, AssertionError) as exc:
        # One line says what failed; what follows it (a command's stderr, log tails) says why.
        first, _, detail = str(exc).strip().partition("\n")
        console.print(f"[red]city.py: {escape(first)}[/]")
        if detail:
            console.print(f"[dim]{escape(detail)}[/]")
        console.print(f"logs: {workdir}" if args.keep else "(--keep DIR keeps the logs for a look)")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

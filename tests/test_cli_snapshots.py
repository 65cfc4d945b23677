"""What an operator sees: the main text views of zonewatch-collector, compared with stored snapshots.

One deterministic database, written the way the collector writes it (the writer's register and
commit, raise_incidents and act, migration.evaluate, all at fixed times), and the real command line
in a subprocess with a fixed terminal width (COLUMNS), time zone (TZ) and clock (ZONEWATCH_NOW_MS),
and explicit --since/--until. A change to a view shows as a diff here; when it is intended, write
the snapshots again with ``UPDATE_SNAPSHOTS=1 pytest tests/test_cli_snapshots.py`` and review them.

Every table is checked to align in terminal cells: Chinese names take two cells each.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

from collector.migration import MigrationPolicy
from collector.model import AgentHello, HealthRow, HostLabels, InventoryRow, ValidBatch, ZoneTrafficRow
from collector.store import migration
from collector.store.database import open_database
from collector.store.incidents import Raise, act, raise_incidents
from collector.store.writer import Rejected, Writer

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
T0 = 1_795_824_000_000  # 2026-11-28 08:00:00 +08:00: "now" for every view
MIN = 60_000
HOUR = 60 * MIN
TZ = "CST-8"  # POSIX for UTC+8, no tz database needed
SINCE, UNTIL = "2026-11-28T07:00+08:00", "2026-11-28T08:00+08:00"
VERTICAL, HORIZONTAL = "省电子政务外网（纵向）", "市电子政务外网（横向）"
POLICE, LABOUR = "市公安局", "市人力资源和社会保障局"
CATALOG = [
    (VERTICAL, "extranet", "vertical", "", "10.0.0.0/12", 1_000_000_000),
    (HORIZONTAL, "extranet", "horizontal", "", "10.32.0.0/16", 10_000_000_000),
    ("公安专网", "dedicated", "", POLICE, "172.20.0.0/16", 0),
    ("人社专网", "dedicated", "", LABOUR, "172.30.0.0/16", 0),
]
# agent id -> hostname, labels
AGENTS = {
    "a1" * 16: ("web-01", HostLabels(POLICE, "高新区", "主机房", "server")),
    "b2" * 16: ("服务器-甲", HostLabels(LABOUR, "经开区", "二号机房", "server")),
    "c3" * 16: ("db-01", HostLabels(POLICE, "经开区", "主机房", "database")),
    "d4" * 16: ("old-ws-07", HostLabels(LABOUR, "高新区", "", "workstation")),
}
RULES = ("port_scan_vertical.yml", "admin_brute_force.yml", "forbidden_zone_access.yml")


def sample(time_ms: int, rx_bps: float, tx_bps: float) -> tuple[object, ...]:
    """One interface sample of a 60 s interval (rx/tx bytes are the interval's)."""
    rx, tx = int(rx_bps * 60 / 8), int(tx_bps * 60 / 8)
    return (time_ms, "eth0", rx, tx, rx // 1000, tx // 1000, 0, 0, 0, 0, 60_000, rx_bps, tx_bps,
            1_000_000_000, max(rx_bps, tx_bps) / 1e9, False)  # fmt: skip


def build(path: Path) -> None:
    """The fleet at T0: three hosts reporting for the last hour, one silent for three hours."""
    db = open_database(path)
    writer = Writer(db)
    writer.store_catalog(CATALOG, "v1", T0 - 3 * HOUR)
    for agent_id, (hostname, labels) in AGENTS.items():
        writer.register(AgentHello(agent_id, hostname, "0.1.0", labels, "v1", T0 - 3 * HOUR), T0 - 3 * HOUR)
    a1, b2, c3, d4 = AGENTS
    seq = dict.fromkeys(AGENTS, 0)

    def send(
        agent_id: str, time_ms: int, *, samples: Sequence[tuple[object, ...]] = (), **facts: Any
    ) -> None:
        seq[agent_id] += 1
        columns = ValidBatch.columns_of(samples) if samples else ()
        batch = ValidBatch(agent_id, seq[agent_id], time_ms - 250, time_ms, time_ms - 60_000, time_ms - 250,
                           columns, [], **facts)  # fmt: skip
        writer.commit([batch])

    # The silent one: an address on the extranet, nothing since.
    send(d4, T0 - 3 * HOUR, inventory_rows=[inventory(T0 - 3 * HOUR, ("eth0", "10.32.9.7/16"))])
    # web-01: both networks (dual homed); 服务器-甲: extranet only (migrated); db-01: dedicated only.
    send(a1, T0 - 2 * HOUR, inventory_rows=[inventory(T0 - 2 * HOUR, ("eth0", "10.32.1.11/16"),
                                                      ("eth1", "172.20.1.11/16"))])  # fmt: skip
    send(b2, T0 - 2 * HOUR, inventory_rows=[inventory(T0 - 2 * HOUR, ("eth0", "10.32.2.12/16"))])
    send(c3, T0 - 2 * HOUR, inventory_rows=[inventory(T0 - 2 * HOUR, ("eth0", "172.20.3.13/16"))])
    for minute in range(50, 0, -10):  # five reports each in the last hour
        t = T0 - minute * MIN
        send(a1, t, samples=[sample(t, 120e6 + minute * 1e6, 30e6)],
             zone_rows=[zone(t, VERTICAL, 900_000_000, 200_000_000),
                        zone(t, "公安专网", 40_000_000, 10_000_000)],
             health_rows=[HealthRow(t, 2.5, 48 << 20, 0, 0, 120_000, 0, '{"capture": "on"}')])  # fmt: skip
        send(b2, t, samples=[sample(t, 8e6, 2e6 + minute * 1e4)],
             zone_rows=[zone(t, HORIZONTAL, 300_000_000, 80_000_000, sampled=True)],
             health_rows=[HealthRow(t, 11.0, 52 << 20, 2 << 20, 3, 90_000, 1_800,
                                    '{"capture": "on", "flows": "off: no conntrack"}')])  # fmt: skip
        send(c3, t, samples=[sample(t, 1e6, 500e3)], zone_rows=[zone(t, "公安专网", 5_000_000, 1_000_000)])
    # The latest reports, half a minute ago; db-01 skips one (a sequence gap), and 服务器-甲 sends
    # one refused at the edge.
    send(a1, T0 - 30_000)
    seq[c3] += 1
    send(c3, T0 - 30_000)
    send(b2, T0 - 30_000)
    refused = Rejected(b2, seq[b2] + 1, T0 - 20_000, "INVALID_ARGUMENT",
                       "batch.facts[0].interface_sample.rx_bps", "must be a finite number, got nan",
                       "ipv4:10.32.2.12:50000")  # fmt: skip
    writer.commit([refused])
    migration.evaluate(db, T0, MigrationPolicy(quiet_ms=30 * MIN, stale_ms=2 * HOUR))
    keys = {agent_id: writer.agent_key(agent_id) for agent_id in AGENTS}
    scan_events = {
        "events": [{"category": "access", "time_ms": T0 - 20 * MIN, "peer_addr": "10.32.2.12",
                    "distinct_ports": 40, "ports": [22, 23, 3389]}],
        "processes": [{"pid": 812, "process": "sshd", "user": "root", "cmdline": "/usr/sbin/sshd -D"}],
    }  # fmt: skip
    scan, _, brute = raise_incidents(
        db,
        [
            Raise("port_scan_vertical", "10.32.2.12", keys[a1], "high", "端口扫描 from 10.32.2.12",
                  scan_events, T0 - 20 * MIN, rule_id="1c7b2a3e-0d6f-4f5a-9e21-7d3b5c8a9f10",
                  rule_title="Vertical port scan", dedup_fields={"agent_id": a1, "peer_addr": "10.32.2.12"}),
            Raise("forbidden_zone_access", "公安专网", keys[b2], "critical", "访问禁止区域 公安专网",
                  {"events": [{"category": "zone_traffic", "time_ms": T0 - 15 * MIN, "zone": "公安专网"}]},
                  T0 - 15 * MIN, rule_title="Traffic to a forbidden zone"),
            Raise("admin_brute_force", "10.32.5.5", keys[c3], "medium", "SSH 暴力破解 from 10.32.5.5",
                  {"events": []}, T0 - 40 * MIN),
        ],
    )  # fmt: skip
    again = {"events": [{"category": "access", "time_ms": T0 - 10 * MIN, "peer_addr": "10.32.2.12",
                         "distinct_ports": 25}]}  # fmt: skip
    raise_incidents(
        db,
        [
            Raise(
                "port_scan_vertical",
                "10.32.2.12",
                keys[a1],
                "high",
                "端口扫描 from 10.32.2.12",
                again,
                T0 - 10 * MIN,
            )
        ],
    )
    act(db, scan, "acknowledge", "张三", "正在排查", T0 - 8 * MIN)
    act(db, brute, "resolve", "李四", "已封禁该地址", T0 - 5 * MIN)
    db.close()


def zone(time_ms: int, name: str, bytes_in: int, bytes_out: int, *, sampled: bool = False) -> ZoneTrafficRow:
    """Ten minutes of traffic with a zone; a sampled capture saw half the packets."""
    method, rate = ("capture", 0.5) if sampled else ("nftables", 1.0)
    return ZoneTrafficRow(time_ms, name, "", bytes_in, bytes_out, 1, 1, 600_000, method, rate)


def inventory(time_ms: int, *addresses: tuple[str, str]) -> InventoryRow:
    return InventoryRow(time_ms, True, addresses, (), (), (), "[]", "", "Debian", "12")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("snapshots")
    build(directory / "collector.db")
    rules = directory / "rules"
    rules.mkdir()
    for name in RULES:
        shutil.copy(ROOT / "rules" / name, rules / name)
    return directory


def collector(directory: Path, *argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="140", TZ=TZ, ZONEWATCH_NOW_MS=str(T0), NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    env.pop("ZONEWATCH_DB", None)
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


VIEWS = {
    "agents": ["agents", "--db", "collector.db"],
    "bandwidth": ["bandwidth", "--db", "collector.db", "--since", SINCE, "--until", UNTIL],
    "traffic_by_zone": ["traffic", "--db", "collector.db", "--by", "zone", "--since", SINCE, "--until", UNTIL,
                        "--bucket", "10m"],
    "migration": ["migration", "--db", "collector.db"],
    "migration_by_county": ["migration", "--db", "collector.db", "--by", "county"],
    "incidents_list": ["incidents", "list", "--db", "collector.db"],
    "incidents_show": ["incidents", "show", "2", "--db", "collector.db"],
    "health": ["health", "--db", "collector.db", "--since", "1h"],
    "rules_list": ["rules", "list", "--rules", "rules"],
}  # fmt: skip


@pytest.mark.parametrize("view", VIEWS)
def test_view_matches_its_snapshot(fleet: Path, view: str) -> None:
    shown = collector(fleet, *VIEWS[view])
    assert assert_tables_align(shown) or view == "incidents_show", "a table view without a table"
    text = normalized(view, shown)
    snapshot = SNAPSHOTS / f"{view}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        snapshot.write_text(text, encoding="utf-8")
        return
    assert snapshot.exists(), f"no snapshot {snapshot.name}: run UPDATE_SNAPSHOTS=1 pytest {__file__}"
    expected = snapshot.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True), "snapshot", "now"
        )
    )
    assert text == expected, f"`zonewatch-collector {' '.join(VIEWS[view])}` changed:\n{diff}"


def normalized(view: str, text: str) -> str:
    """The output as stored: no trailing blanks (editors strip them); in `health`, the figures of
    this machine's disk masked (the database's size and the free space differ from run to run)."""
    if view == "health":
        text = re.sub(
            r"^( *storage +).*$", r"\1<database, WAL and free disk: this machine's>", text, flags=re.M
        )
        text = re.sub(r"^warning: .*\n\n?", "", text, flags=re.M)
        lines = text.splitlines()
        # The summary's column is as wide as its longest figure, which may be the masked one.
        first_rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
        lines[first_rule] = "─" * 10 + " …"
        text = "\n".join(lines) + "\n"
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def assert_tables_align(text: str) -> int:
    """Each table (a header, a rule of ─, its rows) is as wide in terminal cells on every line: a
    character counted one cell but drawn in two (or the reverse) would shift its row. Returns how
    many tables there are."""
    lines = text.splitlines()
    tables = 0
    for index, rule in enumerate(lines):
        if not rule or set(rule) != {"─"}:
            continue
        tables += 1
        width = cell_len(rule)
        block = [lines[index - 1]]
        for line in lines[index + 1 :]:
            if not line.strip():
                break
            block.append(line)
        for line in block:
            assert cell_len(line) == width, f"misaligned ({cell_len(line)} cells, table {width}):\n{line}"
    return tables


def test_the_database_is_what_the_snapshots_show(fleet: Path) -> None:
    """The views above read what build() wrote: a few figures checked by hand, so a snapshot written
    from a broken fixture would not pass unnoticed."""
    agents = json.loads(collector(fleet, "agents", "--db", "collector.db", "--format", "json"))
    assert {a["hostname"]: a["status"] for a in agents} == {
        "web-01": "online", "服务器-甲": "online", "db-01": "online", "old-ws-07": "offline",
    }  # fmt: skip
    states = json.loads(
        collector(fleet, "migration", "--db", "collector.db", "--by", "network", "--format", "json")
    )
    assert {
        g["group"]: (g["not_started"], g["dual_homed"], g["migrated"], g["unknown"]) for g in states["groups"]
    } == {
        "公安专网": (1, 1, 0, 0),  # db-01 on it only, web-01 on both
        "人社专网": (0, 0, 1, 1),  # 服务器-甲 left it; old-ws-07 silent too long to say
    }
    incidents = json.loads(collector(fleet, "incidents", "list", "--db", "collector.db", "--format", "json"))
    assert [(i["rule"], i["hostname"], i["status"], i["matches"]) for i in incidents] == [
        ("zonewatch.sequence_gap", "db-01", "open", 1),
        ("port_scan_vertical", "web-01", "acknowledged", 2),
        ("forbidden_zone_access", "服务器-甲", "open", 1),
    ]

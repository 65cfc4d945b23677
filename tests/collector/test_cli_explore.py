"""`explore`: the Datasette metadata is valid, its canned queries run on a real collector database and
answer as the CLI does; without Datasette the command says how to install it, in one line.

Datasette itself is not installed for the tests (it is an optional extra): nothing here serves.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collector import cli_explore
from collector.migration import MigrationPolicy
from collector.model import AgentHello, HostLabels, InventoryRow, ValidBatch, ZoneTrafficRow
from collector.store import explore, migration
from collector.store.incidents import Raise, act, list_incidents, raise_incidents
from collector.store.retention import HOUR_MS, Maintenance
from collector.store.writer import Writer

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_795_824_000_000  # an hour boundary
MIN = 60_000
VERTICAL = "省电子政务外网（纵向）"


def zone_row(time_ms: int, zone: str, bytes_in: int, bytes_out: int, rate: float = 1.0) -> ZoneTrafficRow:
    return ZoneTrafficRow(time_ms, zone, "", bytes_in, bytes_out, 1, 1, 60_000, "nftables", rate)


@pytest.fixture
def fleet(db: sqlite3.Connection) -> Writer:
    """Two police hosts (one dual homed, one migrated), one labour host; traffic over two hours."""
    writer = Writer(db)
    writer.store_catalog(
        [(VERTICAL, "extranet", "vertical", "", "10.0.0.0/12", 1_000_000),
         ("公安专网", "dedicated", "", "市公安局", "172.20.0.0/16", 0)],
        "v1", T0 - 3 * HOUR_MS,
    )  # fmt: skip
    hosts = {"a1": "市公安局", "a2": "市公安局", "a3": "市人社局"}
    for agent_id, department in hosts.items():
        labels = HostLabels(department, "高新区", "", "")
        writer.register(AgentHello(agent_id, f"host-{agent_id}", "t", labels, "", 0), T0 - 3 * HOUR_MS)
    addresses = {"a1": (("eth0", "10.1.0.1/12"), ("eth1", "172.20.0.1/16")), "a2": (("eth0", "10.1.0.2/12"),)}
    seq = dict.fromkeys(hosts, 0)
    for agent_id, address in addresses.items():
        seq[agent_id] += 1
        t = T0 - 3 * HOUR_MS
        inventory = InventoryRow(t, True, address, (), (), (), "[]", "", "", "")
        writer.commit([ValidBatch(agent_id, seq[agent_id], t, t, t, t, (), [], inventory_rows=[inventory])])
    # Hour 1: a1 and a2 to the vertical link; hour 2: a3, a sampled capture (a tenth of the packets).
    for agent_id, t, rows in (
        ("a1", T0 - 2 * HOUR_MS + MIN, [zone_row(T0 - 2 * HOUR_MS + MIN, VERTICAL, 90_000_000, 9_000_000)]),
        ("a2", T0 - 2 * HOUR_MS + 2 * MIN, [zone_row(T0 - 2 * HOUR_MS + 2 * MIN, VERTICAL, 45_000_000, 0)]),
        ("a3", T0 - HOUR_MS + MIN, [zone_row(T0 - HOUR_MS + MIN, VERTICAL, 1_000_000, 100_000, rate=0.1)]),
        ("a1", T0 - HOUR_MS + 5 * MIN, [zone_row(T0 - HOUR_MS + 5 * MIN, "公安专网", 500, 0)]),
    ):
        seq[agent_id] += 1
        writer.commit([ValidBatch(agent_id, seq[agent_id], t, t, t, t, (), [], rows)])
    migration.evaluate(db, T0, MigrationPolicy(quiet_ms=30 * MIN, stale_ms=24 * HOUR_MS))
    keys = {agent_id: writer.agent_key(agent_id) for agent_id in hosts}
    ids = raise_incidents(
        db,
        [
            Raise("port_scan_vertical", "10.9.9.9", keys["a1"], "high", "端口扫描", {}, T0 - 30 * MIN),
            Raise("forbidden_zone_access", "公安专网", keys["a3"], "critical", "禁止区域", {}, T0 - 20 * MIN),
            Raise("admin_brute_force", "10.8.8.8", keys["a2"], "low", "暴力破解", {}, T0 - 10 * MIN),
        ],
    )
    act(db, ids[0], "acknowledge", "张三", "", T0 - 5 * MIN)
    act(db, ids[2], "resolve", "张三", "", T0 - 4 * MIN)
    return writer


def query(db: sqlite3.Connection, name: str) -> list[dict[str, object]]:
    (canned,) = [q for q in explore.CANNED_QUERIES if q.name == name]
    cursor = db.execute(canned.sql)
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def test_every_canned_query_runs_on_an_empty_database(db: sqlite3.Connection) -> None:
    assert len(explore.CANNED_QUERIES) >= 4
    for canned in explore.CANNED_QUERIES:
        assert db.execute(canned.sql).fetchall() == [], canned.name
        assert canned.title and canned.description


def test_facets_name_columns_of_their_tables(db: sqlite3.Connection) -> None:
    for table, facets in explore.TABLE_FACETS.items():
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        assert set(facets) <= columns, table
        assert explore.TABLE_SORT_DESC[table] in columns


def test_active_incidents_and_per_department_answer_as_the_cli(db: sqlite3.Connection, fleet: Writer) -> None:
    active = query(db, "active_incidents")
    assert [(r["rule"], r["status"], r["host"], r["department"]) for r in active] == [
        ("forbidden_zone_access", "open", "host-a3", "市人社局"),  # critical first
        ("port_scan_vertical", "acknowledged", "host-a1", "市公安局"),
    ]
    assert {r["id"] for r in active} == {r.id for r in list_incidents(db, status="active")}
    per_department = {
        r["department"]: (r["critical"], r["high"], r["active"]) for r in query(db, "incidents_by_department")
    }
    assert per_department == {"市人社局": (1, 0, 1), "市公安局": (0, 1, 1)}


def test_migration_per_department_equals_the_cli_summary(db: sqlite3.Connection, fleet: Writer) -> None:
    summary = {s.group: s for s in migration.summarize(migration.states(db), "department")}
    rows = query(db, "migration_by_department")
    assert {r["department"] for r in rows} == set(summary)
    for row in rows:
        cli = summary[str(row["department"])]
        assert row["pairs"] == cli.hosts
        assert {state: row[state] for state in cli.counts} == cli.counts
        assert row["percent_migrated"] == cli.percent_migrated
    assert summary["市公安局"].counts["dual_homed"] == 1 and summary["市公安局"].counts["migrated"] == 1


def test_link_load_per_hour_is_the_same_before_and_after_the_rollup(
    db: sqlite3.Connection, fleet: Writer
) -> None:
    def vertical() -> dict[object, tuple[object, ...]]:
        rows = [r for r in query(db, "link_load_per_hour") if r["zone"] == VERTICAL]
        return {r["hour"]: (r["bytes_in"], r["bytes_out"], r["load_percent"]) for r in rows}

    raw = vertical()
    assert sorted(v[:2] for v in raw.values()) == [(10_000_000, 1_000_000), (135_000_000, 9_000_000)]
    # 135 MB in an hour: 300 kbit/s on average, 30 % of the 1 Mbit/s link.
    assert sorted(v[2] for v in raw.values()) == [pytest.approx(2.22), pytest.approx(30.0)]
    maintenance = Maintenance(db)
    while not maintenance.run_step(T0 + 10 * MIN).done:
        pass
    (rolled,) = db.execute(
        "SELECT rolled_id FROM retention_state WHERE source = 'zone_traffic' AND resolution_ms = ?",
        (HOUR_MS,),
    ).fetchone()
    assert rolled > 0, "the rollup ran"
    assert vertical() == raw  # the rolled-up rows are not counted twice


def test_metadata_for_datasette_before_and_after_1_0() -> None:
    legacy, none = cli_explore.documents("collector", "0.65.1")
    assert none is None
    database = legacy["databases"]["collector"]
    assert database["tables"]["incidents"]["facets"] == ["severity", "status", "rule"]
    assert set(database["queries"]) == {q.name for q in explore.CANNED_QUERIES}
    meta, config = cli_explore.documents("collector", "1.0a19")
    assert config is not None and "queries" not in meta["databases"]["collector"]
    assert config["databases"]["collector"]["queries"] == database["queries"]
    json.dumps([legacy, meta, config], ensure_ascii=False)  # what is written for Datasette


def test_without_datasette_the_command_says_how_to_install_it(path: Path, db: sqlite3.Connection) -> None:
    # Hidden whether or not it is installed: an import of it fails, as when it is missing.
    program = (
        "import sys; sys.modules['datasette'] = None\n"
        "from collector.cli import main\n"
        f"sys.exit(main(['explore', '--db', {str(path)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "pip install 'zonewatch[explore]'" in line and result.stdout == ""

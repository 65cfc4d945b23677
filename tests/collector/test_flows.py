"""The flows view: flows summed per host, process, user, remote endpoint, protocol and zone."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from collector.errors import QueryError
from collector.model import AgentHello, FlowRow, HostLabels, ValidBatch
from collector.store import open_database
from collector.store.flows import flows
from collector.store.queries import resolve_agent
from collector.store.retention import HOUR_MS, Maintenance, RetentionPolicy
from collector.store.writer import Writer

T0 = 1_795_000_000_000
MINUTE = 60_000
POLICE = "公安专网"
VERTICAL = "省电子政务外网（纵向）"


def flow(
    time_ms: int,
    remote: str,
    port: int,
    zone: str,
    out: int,
    in_: int,
    process: str = "",
    cmdline: str = "",
    protocol: int = 6,
    user: str = "app",
    pid: int = 100,
) -> FlowRow:
    return FlowRow(
        time_ms, protocol, "10.10.3.4", 50_000, remote, port, "eth0", out, in_, 2, 3,
        time_ms - 5000, time_ms, 0x1B, zone, True, pid if process else 0, process,
        user if process else "", cmdline,
    )  # fmt: skip


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "c.db"
    writer = Writer(open_database(path))
    for agent_id in ("a1", "a2"):
        writer.register(AgentHello(agent_id, f"host-{agent_id}", "t", HostLabels(), "", T0), T0)
    seq = {"a1": 0, "a2": 0}

    def send(agent_id: str, *rows: FlowRow) -> None:
        seq[agent_id] += 1
        t = rows[0].time_ms
        writer.commit([ValidBatch(agent_id, seq[agent_id], t, t, t, t, (), [], [], list(rows))])

    send(
        "a1",
        flow(T0 + 1000, "172.20.1.9", 443, POLICE, 1000, 9000, "java", "java -jar 审批.jar", pid=100),
        # Restarted with another command line: the group shows this one, the most recent.
        flow(T0 + 2000, "172.20.1.9", 443, POLICE, 500, 500, "java", "java -jar 审批.jar --v2", pid=101),
        flow(T0 + 3000, "10.10.0.8", 53, VERTICAL, 80, 120, "systemd-resolved", protocol=17),
        # The same program to the same endpoint, run by another user: another blocker, another row.
        flow(
            T0 + 2500, "172.20.1.9", 443, POLICE, 200, 200, "java", "java -jar 报表.jar", user="root", pid=300
        ),
    )
    send("a1", flow(T0 + 2 * MINUTE, "172.20.1.9", 443, POLICE, 10, 10))  # unattributed
    send(
        "a2",
        flow(T0 + MINUTE, "172.20.7.7", 8080, POLICE, 300, 300, "curl", "curl http://172.20.7.7", pid=7),
        # Ends in the same millisecond: the flow stored last is the most recent.
        flow(T0 + MINUTE, "172.20.7.7", 8080, POLICE, 10, 10, "curl", "curl -v http://172.20.7.7", pid=8),
    )
    return path


@pytest.fixture
def db(path: Path) -> Iterator[sqlite3.Connection]:
    con = open_database(path, readonly=True)
    yield con
    con.close()


def keys(rows: list) -> list[tuple[str, str, str, str, int]]:  # type: ignore[type-arg]
    return [(r.hostname, r.process, r.user, r.remote_addr, r.remote_port) for r in rows]


def test_groups_sum_and_sort_by_bytes(db: sqlite3.Connection) -> None:
    rows = flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE)
    assert keys(rows) == [
        ("host-a1", "java", "app", "172.20.1.9", 443),
        ("host-a2", "curl", "app", "172.20.7.7", 8080),
        ("host-a1", "java", "root", "172.20.1.9", 443),
        ("host-a1", "systemd-resolved", "app", "10.10.0.8", 53),
        ("host-a1", "", "", "172.20.1.9", 443),
    ]
    java = rows[0]
    assert (java.agent_id, java.ip_protocol, java.remote_zone) == ("a1", 6, POLICE)
    assert (java.flows, java.bytes_out, java.bytes_in, java.packets) == (2, 1500, 9500, 10)
    assert (java.first_ms, java.last_ms) == (T0 + 1000 - 5000, T0 + 2000)
    assert rows[3].ip_protocol == 17
    assert (rows[4].pid, rows[4].cmdline) == (0, "")  # unattributed


def test_two_users_of_one_program_are_two_rows(db: sqlite3.Connection) -> None:
    java = [r for r in flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE) if r.process == "java"]
    assert [(r.user, r.flows, r.bytes_out + r.bytes_in, r.cmdline) for r in java] == [
        ("app", 2, 11_000, "java -jar 审批.jar --v2"),
        ("root", 1, 400, "java -jar 报表.jar"),
    ]


def test_pid_and_cmdline_are_of_the_most_recent_flow(db: sqlite3.Connection) -> None:
    rows = {(r.process, r.user): r for r in flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE)}
    assert (rows["java", "app"].pid, rows["java", "app"].cmdline) == (101, "java -jar 审批.jar --v2")
    # Both curl flows end at T0 + MINUTE: the one stored last wins, every time.
    assert (rows["curl", "app"].pid, rows["curl", "app"].cmdline) == (8, "curl -v http://172.20.7.7")
    # Among the flows in range only: before T0 + 1500 the first java flow is the latest.
    (early,) = flows(db, since_ms=T0, until_ms=T0 + 1500)
    assert (early.pid, early.cmdline) == (100, "java -jar 审批.jar")


def test_filters(db: sqlite3.Connection) -> None:
    a2 = resolve_agent(db, "host-a2")
    assert keys(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, agent=a2)) == [
        ("host-a2", "curl", "app", "172.20.7.7", 8080)
    ]
    police = flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, zone=POLICE)
    assert {r.remote_zone for r in police} == {POLICE} and len(police) == 4
    assert flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, zone=VERTICAL)[0].process == "systemd-resolved"
    assert flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, zone="不存在") == []
    # Substring of the process name or the command line, any case.
    assert keys(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, process="JAV")) == [
        ("host-a1", "java", "app", "172.20.1.9", 443),
        ("host-a1", "java", "root", "172.20.1.9", 443),
    ]
    assert keys(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, process="审批")) == [
        ("host-a1", "java", "app", "172.20.1.9", 443)
    ]
    assert keys(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, process="172.20.7")) == [
        ("host-a2", "curl", "app", "172.20.7.7", 8080)
    ]
    assert flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, process="%") == []


def test_user_filter_is_exact(db: sqlite3.Connection) -> None:
    assert keys(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, user="root")) == [
        ("host-a1", "java", "root", "172.20.1.9", 443)
    ]
    assert flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, user="roo") == []
    assert flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, user="ROOT") == []
    app_java = flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, user="app", process="java")
    assert keys(app_java) == [("host-a1", "java", "app", "172.20.1.9", 443)]


def test_top_and_time_bounds(db: sqlite3.Connection) -> None:
    assert len(flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, top=2)) == 2
    with pytest.raises(QueryError):
        flows(db, since_ms=T0, until_ms=T0 + 3 * MINUTE, top=0)
    # [since, until): the minute-1 and minute-2 flows are outside.
    first_minute = flows(db, since_ms=T0, until_ms=T0 + MINUTE)
    assert {r.hostname for r in first_minute} == {"host-a1"}
    assert "" not in {r.process for r in first_minute}
    assert keys(flows(db, since_ms=T0 + 2 * MINUTE, until_ms=T0 + 3 * MINUTE)) == [
        ("host-a1", "", "", "172.20.1.9", 443)
    ]


def test_sums_beyond_int64_stay_exact(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    writer = Writer(open_database(path))
    writer.register(AgentHello("a1", "h", "t", HostLabels(), "", T0), T0)
    big = 2**63 - 1
    rows = [flow(T0 + i, "172.20.1.9", 443, POLICE, big, big, "java", f"java -Dn={i}", pid=i) for i in (1, 0)]
    writer.commit([ValidBatch("a1", 1, T0, T0, T0, T0 + 1, (), [], [], rows)])
    (row,) = flows(open_database(path, readonly=True), since_ms=T0, until_ms=T0 + MINUTE)
    assert (row.flows, row.bytes_out, row.bytes_in, row.packets) == (2, 2 * big, 2 * big, 10)
    assert (row.user, row.pid, row.cmdline) == ("app", 1, "java -Dn=1")  # ends last, though stored first


@pytest.mark.parametrize(
    "only",
    [{}, {"user": "app"}, {"process": "java"}, {"zone": POLICE}],
    ids=["all", "user", "process", "zone"],
)
def test_overflow_fallback_agrees_with_sql(path: Path, only: dict[str, str]) -> None:
    con = open_database(path)
    by_sql = flows(con, since_ms=T0, until_ms=T0 + 3 * MINUTE, **only)  # type: ignore[arg-type]
    # A third host whose byte sums pass INT64_MAX sends the whole query down the Python path.
    writer = Writer(con)
    writer.register(AgentHello("a3", "host-a3", "t", HostLabels(), "", T0), T0)
    big = 2**63 - 1
    huge = [flow(T0 + 5000, "172.20.1.9", 443, POLICE, big, 0, "java", "java -jar 大.jar") for _ in range(2)]
    writer.commit([ValidBatch("a3", 1, T0, T0, T0 + 5000, T0 + 5000, (), [], [], huge)])
    folded = flows(con, since_ms=T0, until_ms=T0 + 3 * MINUTE, **only)  # type: ignore[arg-type]
    assert (folded[0].hostname, folded[0].bytes_out, folded[0].cmdline) == (
        "host-a3",
        2 * big,
        "java -jar 大.jar",
    )
    assert folded[1:] == by_sql


def test_flows_are_pruned_with_the_raw_tier(path: Path) -> None:
    con = open_database(path)
    now = T0 + 2 * MINUTE + HOUR_MS  # the minute-2 flow is just inside one hour, the rest older
    report = Maintenance(con, RetentionPolicy(raw_hours=1)).run_step(now)
    assert report.pruned_flow_rows == 7 - 1
    (left,) = con.execute("SELECT count(*) FROM flows").fetchone()
    assert left == 1


def test_cli_on_an_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    open_database(path).close()
    out = run_cli("zonewatch-collector", "flows", "--db", str(path), "--zone", POLICE).stdout
    assert out.strip() == "no flows in range"
    listed = run_cli("zonewatch-collector", "flows", "--db", str(path), "--format", "json", "--top", "5")
    assert json.loads(listed.stdout) == []


def test_cli_lists_flows(path: Path) -> None:
    result = run_cli(
        "zonewatch-collector", "flows", "--db", str(path), "--since", "2026-11-01", "--until", "2026-12-31",
        "--process", "java", "--format", "json",
    )  # fmt: skip
    app, root = json.loads(result.stdout)
    assert (app["hostname"], app["remote_zone"], app["bytes_in"]) == ("host-a1", POLICE, 9500)
    assert (app["user"], root["user"]) == ("app", "root")


def test_cli_user_filter_and_json_fields(path: Path) -> None:
    result = run_cli(
        "zonewatch-collector", "flows", "--db", str(path), "--since", "2026-11-01", "--until", "2026-12-31",
        "--process", "java", "--user", "root", "--format", "json",
    )  # fmt: skip
    (row,) = json.loads(result.stdout)
    assert (row["user"], row["pid"], row["cmdline"]) == ("root", 300, "java -jar 报表.jar")


def test_cli_table_shows_the_user_and_wide_the_command_line(path: Path) -> None:
    # A command line as long as ingest allows: cut in the table, whole in json and csv.
    long_cmdline = "java -cp " + ":".join(f"/opt/审批/lib/part{i}.jar" for i in range(60))
    long_cmdline = long_cmdline[:1024]
    writer = Writer(open_database(path))
    writer.commit(
        [
            ValidBatch(
                "a2",
                2,
                T0,
                T0,
                T0,
                T0,
                (),
                [],
                [],
                [flow(T0, "172.20.9.9", 443, POLICE, 1, 1, "java", long_cmdline)],
            )
        ]
    )
    query = (
        "zonewatch-collector",
        "flows",
        "--db",
        str(path),
        "--since",
        "2026-11-01",
        "--until",
        "2026-12-31",
    )
    table = run_cli(*query).stdout
    assert "user" in table.splitlines()[0] and "root" in table
    assert "java -jar" not in table and "command line" not in table
    wide = run_cli(*query, "--wide").stdout
    assert "last command line" in wide.splitlines()[0]
    assert "java -jar 审批.jar --v2" in wide and "java -jar 报表.jar" in wide
    assert long_cmdline not in wide and long_cmdline[:40] in wide and "…" in wide
    assert max(map(len, wide.splitlines())) < 300
    csv_out = run_cli(*query, "--format", "csv").stdout
    assert csv_out.splitlines()[0].endswith(",pid,cmdline") and long_cmdline in csv_out
    (long_row,) = [
        r for r in json.loads(run_cli(*query, "--format", "json").stdout) if r["remote_addr"] == "172.20.9.9"
    ]
    assert long_row["cmdline"] == long_cmdline

"""`incidents` and `exceptions` as an operator types them, against a real database file: the handlers
through the same argparse wiring the collector's command line gives them."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

from collector import cli, cli_incidents
from collector.store.exceptions import DAY_MS
from collector.store.incidents import IncidentRow, Raise, act, raise_incidents

NOW = 1_800_000_000_000
HOUR = 3_600_000


def build() -> tuple[argparse.ArgumentParser, dict[str, cli_incidents.Handler]]:
    parser = argparse.ArgumentParser(prog="zonewatch-collector")
    sub = parser.add_subparsers(dest="command", required=True)
    return parser, cli_incidents.add_parser(sub, cli._db_arg, cli._format_arg, cli._range_args)


PARSER, HANDLERS = build()


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def run(path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    def invoke(*argv: str) -> Ran:
        args = PARSER.parse_args([*argv, "--db", str(path)])
        code = HANDLERS[args.command](args)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return invoke


def add_agent(db: sqlite3.Connection, agent_id: str, hostname: str, department: str) -> int:
    cursor = db.execute(
        "INSERT INTO agents (agent_id, hostname, department, county, site, role, first_seen_ms, last_seen_ms)"
        " VALUES (?, ?, ?, '高新区', '主机房', 'server', ?, ?)",
        (agent_id, hostname, department, NOW, NOW),
    )
    return int(cursor.lastrowid or 0)


def scan(key: str, agent: int, severity: str, time_ms: int, rule: str = "admin_port_scan") -> Raise:
    return Raise(
        rule,
        key,
        agent,
        severity,
        f"管理端口扫描 from {key}",
        {
            "events": [
                {
                    "category": "access",
                    "time_ms": time_ms,
                    "agent_id": "ignored",
                    "peer_addr": key,
                    "ports": [22, 3389],
                    "failed": 40,
                }
            ],
            "processes": [{"pid": 4242, "process": "sshd", "user": "root", "cmdline": "/usr/sbin/sshd -D"}],
        },
        time_ms,
        rule_id="5f0c6a57-6a4c-4f3e-9d55-0b1c2d3e4f50" if rule == "admin_port_scan" else "",
        rule_title="Admin port scan",
        dedup_fields={"agent_id": "x", "peer_addr": key},
    )


@pytest.fixture
def fleet(db: sqlite3.Connection) -> dict[str, int]:
    """Four incidents: two on a 公安 host (one resolved), one on an 教育 host, one on a wide-named host."""
    web = add_agent(db, "a" * 32, "web-01", "市公安局")
    school = add_agent(db, "b" * 32, "db-01", "市教育局")
    wide = add_agent(db, "c" * 32, "服务器-甲", "市人力资源和社会保障局")
    ids = raise_incidents(
        db,
        [
            scan("10.0.0.1", web, "high", NOW - 3 * DAY_MS),
            scan("10.0.0.2", web, "low", NOW - 2 * HOUR),
            scan("10.0.0.3", school, "critical", NOW - HOUR, rule="outbound_to_classified"),
            scan("10.0.0.4", wide, "medium", NOW),
        ],
    )
    act(db, ids[0], "resolve", "张三", "firewall", NOW - 2 * DAY_MS)
    return dict(zip(("old", "low", "critical", "wide"), ids, strict=True))


def ids_of(out: str) -> list[int]:
    return [int(r["id"]) for r in json.loads(out)]


# --- list --------------------------------------------------------------------------------------


def test_list_shows_the_active_incidents_newest_first(run: Any, fleet: dict[str, int]) -> None:
    result = run("incidents", "list")
    assert result.code == 0 and result.err == ""
    lines = result.out.splitlines()
    header = lines[0].split()
    assert header[:6] == ["id", "severity", "status", "rule", "host", "department"]
    assert "count" in header and "title" in header
    assert [int(line.split()[0]) for line in lines[2:]] == [fleet["wide"], fleet["critical"], fleet["low"]]
    assert "\x1b[" not in result.out  # no colour into a pipe
    assert "服务器-甲" in result.out and "市人力资源和社会保障局" in result.out


def test_the_table_aligns_chinese_text(run: Any, fleet: dict[str, int]) -> None:
    lines = run("incidents", "list", "--status", "all").out.splitlines()[2:]
    stamp = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
    # The first-seen column starts at the same terminal column on every row, wide characters or not.
    starts = {cell_len(line[: stamp.search(line).start()]) for line in lines}  # type: ignore[union-attr]
    assert len(lines) == 4 and len(starts) == 1


def test_severity_is_coloured_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    row = IncidentRow(7, "critical", "open", "r", "", "标题", "a", "web-01", "市公安局", "", NOW, NOW, 1, NOW)
    out = Terminal()
    cli_incidents.print_incident_table([row], out)
    assert "\x1b[" in out.getvalue() and "critical" in out.getvalue()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--status", "all"], ["wide", "critical", "low", "old"]),
        (["--status", "resolved"], ["old"]),
        (["--status", "open"], ["wide", "critical", "low"]),
        (["--severity", "high", "--status", "all"], ["critical", "old"]),
        (["--rule", "outbound_to_classified"], ["critical"]),
        (["--rule", "5F0C6A57-6A4C-4F3E-9D55-0B1C2D3E4F50", "--status", "all"], ["wide", "low", "old"]),
        (["--agent", "web-01", "--status", "all"], ["low", "old"]),
        (["--agent", "ccccc"], ["wide"]),
        (["--department", "市公安局"], ["low"]),
        (["--department", "市公安局", "--status", "all"], ["low", "old"]),
        (["--limit", "2"], ["wide", "critical"]),
    ],
)
def test_list_filters(run: Any, fleet: dict[str, int], argv: list[str], expected: list[str]) -> None:
    result = run("incidents", "list", *argv, "--format", "json")
    assert result.code == 0, result.err
    assert ids_of(result.out) == [fleet[name] for name in expected]


def test_list_since_a_date(run: Any, fleet: dict[str, int]) -> None:
    day_before = datetime.fromtimestamp((NOW - DAY_MS) / 1000).strftime("%Y-%m-%d")
    result = run("incidents", "list", "--status", "all", "--since", day_before, "--format", "json")
    assert ids_of(result.out) == [fleet["wide"], fleet["critical"], fleet["low"]]


def test_json_and_csv_are_stable(run: Any, fleet: dict[str, int]) -> None:
    first = run("incidents", "list", "--status", "all", "--format", "json").out
    assert first == run("incidents", "list", "--status", "all", "--format", "json").out
    rows = json.loads(first)
    assert list(rows[0]) == list(IncidentRow._fields)
    wide = next(r for r in rows if r["id"] == fleet["wide"])
    assert (wide["hostname"], wide["department"], wide["severity"], wide["matches"]) == (
        "服务器-甲",
        "市人力资源和社会保障局",
        "medium",
        1,
    )
    assert wide["last_seen_ms"] == NOW  # raw values, not local times
    text = run("incidents", "list", "--status", "all", "--format", "csv").out
    assert text == run("incidents", "list", "--status", "all", "--format", "csv").out
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == list(IncidentRow._fields)
    assert [int(r[0]) for r in table[1:]] == [r["id"] for r in rows]
    assert table[1][IncidentRow._fields.index("department")] == "市人力资源和社会保障局"


def test_an_empty_list_says_so(run: Any, db: sqlite3.Connection) -> None:
    assert run("incidents", "list").out == "no active incidents\n"
    assert run("incidents", "list", "--department", "无").out == "no active incidents matching the filters\n"
    assert run("incidents", "list", "--format", "csv").out == ",".join(IncidentRow._fields) + "\n"
    assert run("incidents", "list", "--format", "json").out == "[]\n"


# --- show --------------------------------------------------------------------------------------


def test_show_has_everything(run: Any, fleet: dict[str, int]) -> None:
    incident = fleet["old"]
    result = run("incidents", "show", str(incident))
    assert result.code == 0, result.err
    out = result.out
    assert out.startswith(f"incident {incident}  high  resolved\n")
    for expected in (
        "admin_port_scan  (id 5f0c6a57-6a4c-4f3e-9d55-0b1c2d3e4f50)",
        "管理端口扫描 from 10.0.0.1",
        "web-01  (agent " + "a" * 32 + ")",
        "department 市公安局, county 高新区, site 主机房, role server",
        "agent_id=x, peer_addr=10.0.0.1",
        "matches:      1",
        "peer_addr: 10.0.0.1",
        "ports: [22, 3389]",
        "sshd (pid 4242) user root",
        "cmdline: /usr/sbin/sshd -D",
        "张三: resolve (open -> resolved)",
        "      firewall",
    ):
        assert expected in out, expected
    assert "ignored" not in out  # the host fields of events are the incident's, printed once


def test_show_json(run: Any, fleet: dict[str, int]) -> None:
    document = json.loads(run("incidents", "show", str(fleet["old"]), "--format", "json").out)
    assert (document["status"], document["department"], document["dedup_fields"]) == (
        "resolved",
        "市公安局",
        {"agent_id": "x", "peer_addr": "10.0.0.1"},
    )
    assert document["evidence"]["events"][0]["failed"] == 40
    (action,) = document["actions"]
    assert (action["action"], action["actor"], action["from_status"], action["to_status"]) == (
        "resolve",
        "张三",
        "open",
        "resolved",
    )
    assert len(action["hash"]) == 64


def test_show_an_unknown_incident_is_one_line(run: Any, db: sqlite3.Connection) -> None:
    result = run("incidents", "show", "404")
    assert result.code == 1 and result.out == ""
    assert result.err == "zonewatch-collector: error: no incident 404\n"


# --- actions -----------------------------------------------------------------------------------


def test_ack_resolve_reopen_and_comment(run: Any, fleet: dict[str, int], db: sqlite3.Connection) -> None:
    incident = str(fleet["low"])
    result = run("incidents", "ack", incident, "--by", "李四")
    assert result.code == 0 and result.err == ""
    assert re.fullmatch(rf"incident {incident}: open -> acknowledged by 李四 \(audit row \d+\)\n", result.out)
    assert run("incidents", "comment", incident, "--by", "李四", "--comment", "联系了管理员").code == 0
    assert run("incidents", "false-positive", incident, "--by", "李四", "--comment", "巡检").code == 0
    assert run("incidents", "reopen", incident, "--by", "王五", "--comment", "不是巡检").code == 0
    assert run("incidents", "resolve", incident, "--by", "王五").code == 0
    history = db.execute(
        "SELECT action, actor, comment, to_status FROM incident_actions WHERE incident = ? ORDER BY id",
        (fleet["low"],),
    ).fetchall()
    assert history == [
        ("acknowledge", "李四", "", "acknowledged"),
        ("comment", "李四", "联系了管理员", "acknowledged"),
        ("false_positive", "李四", "巡检", "false_positive"),
        ("reopen", "王五", "不是巡检", "open"),
        ("resolve", "王五", "", "resolved"),
    ]
    assert "王五: reopen (false positive -> open)" in run("incidents", "show", incident).out


def test_an_illegal_action_is_one_line_and_exit_1(run: Any, fleet: dict[str, int]) -> None:
    incident = fleet["old"]  # resolved
    result = run("incidents", "ack", str(incident), "--by", "李四")
    assert result.code == 1 and result.out == ""
    assert result.err == (
        f"zonewatch-collector: error: incident {incident} is resolved; it cannot be acknowledged"
        " (reopen it first)\n"
    )
    result = run("incidents", "reopen", str(fleet["low"]), "--by", "李四", "--comment", "x")
    assert result.code == 1 and "is open; it cannot be reopened" in result.err
    result = run("incidents", "ack", str(fleet["low"]), "--by", " ")
    assert result.code == 1 and result.err.count("\n") == 1 and "--by" in result.err


def test_by_is_required_and_reopen_needs_a_comment(
    fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        PARSER.parse_args(["incidents", "ack", "1"])
    assert usage.value.code == 2 and "--by" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        PARSER.parse_args(["incidents", "reopen", "1", "--by", "x"])
    assert "--comment" in capsys.readouterr().err


# --- verify ------------------------------------------------------------------------------------


def test_verify_intact_and_tampered(run: Any, fleet: dict[str, int], db: sqlite3.Connection) -> None:
    run("incidents", "ack", str(fleet["low"]), "--by", "李四")
    result = run("incidents", "verify")
    assert result.code == 0 and re.fullmatch(
        r"audit log intact: 2 rows; head hash [0-9a-f]{64}\n", result.out
    )
    db.execute("DROP TRIGGER incident_actions_no_update")
    db.execute("UPDATE incident_actions SET actor = '王五' WHERE id = 1")
    result = run("incidents", "verify")
    assert result.code == 1
    assert result.out.startswith("audit log TAMPERED: audit row 1: its hash does not match its contents")
    assert "  actor: 王五\n" in result.out
    document = json.loads(run("incidents", "verify", "--format", "json").out)
    assert (document["ok"], document["first_bad_id"], document["rows"]) == (False, 1, 1)


# --- exceptions --------------------------------------------------------------------------------


def test_exceptions_add_list_remove(run: Any, db: sqlite3.Connection) -> None:
    result = run(
        "exceptions", "add", "--rule", "admin_port_scan", "--peer", "10.20.0.5", "--port", "22",
        "--reason", "备份服务器巡检", "--owner", "张三", "--expires", "30d",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.startswith(
        "exception 1: rule admin_port_scan, host any, peer 10.20.0.5/32, port 22; until "
    )
    too_late = datetime.fromtimestamp(time.time() + 400 * 86_400).strftime("%Y-%m-%d")
    result = run(
        "exceptions", "add", "--rule", "*", "--host", "web-01", "--reason", "维护", "--owner", "李四",
        "--expires", too_late,
    )  # fmt: skip
    assert result.code == 1 and "at most 366 days" in result.err
    listed = json.loads(run("exceptions", "list", "--format", "json").out)
    assert [(e["id"], e["rule"], e["peer"], e["port"], e["owner"], e["status"]) for e in listed] == [
        (1, "admin_port_scan", "10.20.0.5/32", 22, "张三", "active")
    ]
    assert 29 * DAY_MS < listed[0]["expires_ms"] - listed[0]["created_ms"] <= 30 * DAY_MS
    table = run("exceptions", "list").out
    assert "备份服务器巡检" in table and "张三" in table and "any" in table
    result = run("exceptions", "remove", "1", "--by", "王五")
    assert (result.code, result.out) == (
        0,
        "exception 1 removed by 王五: rule admin_port_scan raises again\n",
    )
    assert run("exceptions", "list").out == "no exceptions in force (--all lists every one)\n"
    everything = run("exceptions", "list", "--all", "--format", "csv").out.splitlines()
    assert everything[0].startswith("id,rule,host,peer,port,reason,owner,created_ms,expires_ms,removed_ms")
    assert everything[1].endswith(",王五,removed")
    again = run("exceptions", "remove", "1", "--by", "王五")
    assert again.code == 1 and again.err.startswith(
        "zonewatch-collector: error: exception 1 was already removed"
    )


def test_an_exception_without_an_expiry_is_refused(run: Any, db: sqlite3.Connection) -> None:
    base = ["exceptions", "add", "--rule", "r", "--reason", "x", "--owner", "y"]
    result = run(*base)
    assert result.code == 1
    assert result.err.startswith("zonewatch-collector: error: an exception needs an expiry")
    assert result.err.count("\n") == 1
    assert "at most 366 days" in run(*base, "--expires", "367d").err
    assert "malformed time" in run(*base, "--expires", "someday").err
    assert "not an address or network" in run(*base, "--expires", "1d", "--peer", "10.0.0.300").err
    assert db.execute("SELECT count(*) FROM rule_exceptions").fetchone() == (0,)


# --- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["incidents"],
        *(["incidents", action] for action in ("list", "show", "ack", "resolve", "false-positive", "reopen",
                                                "comment", "verify")),
        ["exceptions"],
        *(["exceptions", action] for action in ("add", "list", "remove")),
    ],
)  # fmt: skip
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        PARSER.parse_args([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n" in out and f"zonewatch-collector {' '.join(command)}" in out


def test_an_old_or_missing_database_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from collector.store import schema
    from collector.store.database import open_database

    old = tmp_path / "old.db"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:9])
    open_database(old).close()
    monkeypatch.undo()
    args = PARSER.parse_args(["incidents", "list", "--db", str(old)])
    assert HANDLERS["incidents"](args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema version 9" in err and "zonewatch-collector serve" in err
    missing = PARSER.parse_args(["exceptions", "remove", "1", "--by", "x", "--db", str(tmp_path / "none.db")])
    assert HANDLERS["exceptions"](missing) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no database at" in err
    assert not (tmp_path / "none.db").exists()

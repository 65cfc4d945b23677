"""`incidents list --follow`: a live view an operator leaves open, and a JSON-lines feed for scripts.

The real command in a subprocess, reading a real database file while this test writes to it the way
the collector does (raise_incidents, act); and the polling schedule with an injected clock.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

from collector import cli, cli_incidents
from collector.store.incidents import Raise, act, raise_incidents

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000_000


def env() -> dict[str, str]:
    variables = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TERM="xterm-256color")
    variables.pop("NO_COLOR", None)
    variables.pop("FORCE_COLOR", None)
    return variables


def scan(agent: int, key: str, severity: str, time_ms: int, rule: str = "admin_port_scan") -> Raise:
    return Raise(rule, key, agent, severity, f"管理端口扫描 from {key}", {}, time_ms)


def add_agent(db: sqlite3.Connection, agent_id: str, hostname: str, department: str) -> int:
    cursor = db.execute(
        "INSERT INTO agents (agent_id, hostname, department, county, site, role, first_seen_ms, last_seen_ms)"
        " VALUES (?, ?, ?, '高新区', '', 'server', ?, ?)",
        (agent_id, hostname, department, NOW, NOW),
    )
    return int(cursor.lastrowid or 0)


@pytest.fixture
def fleet(db: sqlite3.Connection) -> dict[str, int]:
    """Two hosts, one with a wide (Chinese) name and department; two open incidents."""
    web = add_agent(db, "a" * 32, "web-01", "市公安局")
    wide = add_agent(db, "c" * 32, "服务器-甲", "市人力资源和社会保障局")
    first, second = raise_incidents(
        db, [scan(web, "10.0.0.1", "high", NOW), scan(wide, "10.0.0.2", "low", NOW + 1)]
    )
    return {"web": web, "wide": wide, "first": first, "second": second}


class Follower:
    """`incidents list --follow` running against ``path``; its stdout read line by line."""

    def __init__(self, path: Path, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "collector.cli",
                "incidents",
                "list",
                "--follow",
                "--db",
                str(path),
                *argv,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_lines(self, count: int, timeout: float = 20.0) -> list[str]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{len(got)} of {count} lines: {got}\n{self.stop()}") from None
        return got

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def follow(path: Path) -> Iterator[Any]:
    started: list[Follower] = []

    def start(*argv: str) -> Follower:
        started.append(Follower(path, *argv))
        return started[-1]

    yield start
    for follower in started:
        follower.stop()


def test_json_lines_show_new_and_updated_incidents(
    db: sqlite3.Connection, fleet: dict[str, int], follow: Any
) -> None:
    f = follow("--format", "json", "--interval", "0.1", "--max-seconds", "60")
    current = [json.loads(line) for line in f.next_lines(2)]
    assert [(c["change"], c["id"]) for c in current] == [
        ("current", fleet["first"]),
        ("current", fleet["second"]),
    ]
    assert current[1]["hostname"] == "服务器-甲" and current[1]["previous_status"] is None
    # A new match counts into the first incident; another host raises a new one.
    (counted, new) = raise_incidents(
        db,
        [
            scan(fleet["web"], "10.0.0.1", "high", NOW + 10),
            scan(fleet["web"], "10.0.0.9", "critical", NOW + 11),
        ],
    )
    changes = [json.loads(line) for line in f.next_lines(2)]
    assert [(c["change"], c["id"], c["matches"]) for c in changes] == [
        ("updated", counted, 2),
        ("new", new, 1),
    ]
    assert (changes[0]["previous_status"], changes[0]["previous_matches"]) == ("open", 1)
    # Acknowledged: still active. Resolved: no longer listed, yet the change is shown.
    act(db, fleet["second"], "acknowledge", "张三", "", NOW + 20)
    (acked,) = [json.loads(line) for line in f.next_lines(1)]
    assert (acked["id"], acked["status"], acked["previous_status"]) == (
        fleet["second"],
        "acknowledged",
        "open",
    )
    act(db, fleet["first"], "resolve", "张三", "已封禁", NOW + 30)
    (resolved,) = [json.loads(line) for line in f.next_lines(1)]
    assert (resolved["change"], resolved["id"], resolved["status"]) == ("updated", fleet["first"], "resolved")
    assert list(resolved) == list(cli_incidents.FOLLOW_FIELDS)
    # Reopened, it is listed again: an update, not a new incident.
    act(db, fleet["first"], "reopen", "李四", "又出现了", NOW + 40)
    (reopened,) = [json.loads(line) for line in f.next_lines(1)]
    assert (reopened["change"], reopened["previous_status"], reopened["status"]) == (
        "updated",
        "resolved",
        "open",
    )
    time.sleep(0.5)
    assert f.lines.empty(), "nothing changed: nothing printed"


def test_filters_apply_and_max_seconds_ends_with_exit_0(
    db: sqlite3.Connection, fleet: dict[str, int], follow: Any
) -> None:
    f = follow("--format", "json", "--interval", "0.1", "--max-seconds", "3", "--severity", "high")
    (only,) = [json.loads(line) for line in f.next_lines(1)]
    assert only["id"] == fleet["first"]
    raise_incidents(db, [scan(fleet["wide"], "10.0.0.3", "low", NOW + 5)])  # below --severity: not shown
    assert f.proc.wait(20) == 0
    assert f.lines.empty() and f.stop() == ""


def test_the_text_view_aligns_chinese_text_and_has_no_colour_in_a_pipe(
    db: sqlite3.Connection, fleet: dict[str, int], follow: Any
) -> None:
    f = follow("--interval", "0.1", "--max-seconds", "60")
    header, *rows = f.next_lines(3)
    assert header.split()[:5] == ["time", "change", "id", "severity", "status"]
    act(db, fleet["second"], "acknowledge", "张三", "", NOW + 20)
    (update,) = f.next_lines(1)
    assert "\x1b[" not in "".join([header, *rows, update])
    assert "open -> acknowledged" in update and "服务器-甲" in update
    # Every column starts at the same terminal cell on every line, wide characters or not.
    for column in ("department", "count"):
        at = header.index(column)
        for line in [*rows, update]:
            assert cell_len(line[: _char_at_cell(line, at)]) == at, (column, line)


def _char_at_cell(line: str, cell: int) -> int:
    """The index of the character that starts at terminal column ``cell``."""
    width = 0
    for index, char in enumerate(line):
        if width >= cell:
            return index
        width += cell_len(char)
    return len(line)


def test_severity_is_coloured_on_a_terminal(fleet: dict[str, int], path: Path) -> None:
    master, replica = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "incidents", "list", "--follow", "--db", str(path),
         "--max-seconds", "0.5"],
        stdout=replica, stderr=subprocess.PIPE, env=env(), cwd=ROOT,
    )  # fmt: skip
    os.close(replica)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(20) == 0
    text = out.decode()
    assert re.search(r"\x1b\[[0-9;]*m\s*high", text), text  # severity in colour
    assert "web-01" in text


def test_ctrl_c_exits_0(fleet: dict[str, int], follow: Any) -> None:
    f = follow("--interval", "0.1")
    f.next_lines(3)
    f.proc.send_signal(signal.SIGINT)
    assert f.proc.wait(20) == 0
    assert "Traceback" not in f.stop()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--interval", "0"], "--interval must be a positive number"),
        (["--max-seconds", "-1"], "--max-seconds must be positive"),
        (["--agent", "no-such-host"], "unknown agent"),
    ],
)
def test_bad_arguments_are_one_line(
    db: sqlite3.Connection, path: Path, argv: list[str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", "incidents", "list", "--follow", "--db", str(path), *argv],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert expected in line


def test_the_schedule_polls_every_interval_until_max_seconds(
    db: sqlite3.Connection, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    handlers = cli_incidents.add_parser(
        parser.add_subparsers(dest="command"), cli._db_arg, cli._format_arg, cli._range_args
    )
    assert "incidents" in handlers
    args = parser.parse_args(
        ["incidents", "list", "--follow", "--interval", "2", "--max-seconds", "5", "--format", "json"]
    )
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds
        if len(slept) == 2:  # between polls: a new match
            raise_incidents(db, [scan(fleet["web"], "10.0.0.1", "high", NOW + 10)])

    assert cli_incidents._follow(args, db, NOW, sleep=sleep, clock=lambda: now[0]) == 0
    assert slept == [2, 2, 1]  # every interval, the last one cut at the deadline
    changes = [json.loads(line)["change"] for line in capsys.readouterr().out.splitlines()]
    assert changes == ["current", "current", "updated"]

"""`zonewatch-collector report`: a city's week as one HTML file, every figure the CLI's.

A real database filled through the real writer (agents, zone traffic, interface samples, health,
rejections), the rule engine's incidents raised and reviewed through the store, migration states
decided by the store's evaluation. The report is written in both languages; its JSON block is
held against what `incidents list`, `traffic`, `migration`, `agents` and `health` print as JSON for
the same period, and its HTML against what a self-contained, printable, safe file must be. Where
Chromium is installed, it renders both to a PNG and a PDF.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import cli_json, embedded, render_in_chromium, run_cli

from collector import cli, cli_report
from collector.errors import QueryError
from collector.migration import MigrationPolicy
from collector.model import AgentHello, HealthRow, HostLabels, InventoryRow, ValidBatch, ZoneTrafficRow
from collector.report import data as report_data
from collector.report import gather, render_html, render_incident_html, svg
from collector.report.i18n import LABELS, lang_of_locale
from collector.store import migration
from collector.store.database import open_database
from collector.store.incidents import Raise, act, incident_detail, raise_incidents
from collector.store.writer import Rejected, Writer

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
VERTICAL = "省电子政务外网（纵向）"
HORIZONTAL = "市级横向外网"
POLICE = "公安专网"
SOCIAL = "人社专网"
CATALOG = [
    (VERTICAL, "extranet", "vertical", "", "10.10.0.0/16", 1_000_000_000),
    (HORIZONTAL, "extranet", "horizontal", "", "10.250.1.0/24", 10_000),
    (POLICE, "dedicated", "", "市公安局", "10.250.2.0/24", 0),
    (SOCIAL, "dedicated", "", "市人社局", "10.250.3.0/24", 0),
    ("互联网", "internet", "", "", "0.0.0.0/0", 0),
]
POLICY = MigrationPolicy(quiet_ms=10 * MIN, stale_ms=DAY)
HOSTILE = "<script>alert(1)</script>"
HOSTILE_HOST = '<img src=x onerror="alert(2)">'
# agent id -> (hostname, department, county, addresses)
HOSTS = {
    "ga-01": ("ga-web-01", "市公安局", "高新区", (("eth0", "10.250.2.10/24"),)),
    "ga-02": ("ga-db-02", "市公安局", "经开区", (("eth0", "10.250.1.11/24"), ("eth1", "10.250.2.11/24"))),
    "ga-03": ("ga-app-03", "市公安局", "高新区", (("eth0", "10.250.1.12/24"),)),
    "rs-01": ("rs-web-01", "市人社局", "经开区", (("eth0", "10.250.1.21/24"),)),
    "rs-02": ("rs-db-02", "市人社局", "高新区", (("eth0", "10.250.3.22/24"),)),
    "rs-03": (HOSTILE_HOST, "市人社局", "经开区", (("eth0", "10.250.1.23/24"),)),
}


class World(NamedTuple):
    path: Path
    now: int  # the report's "now": the fixture's, a few seconds before each CLI call's
    since: int  # local midnight two days ago
    until: int
    incidents: dict[str, int]  # name -> incident id


def local_midnight(days_ago: int) -> int:
    today = datetime.now().astimezone().date() - timedelta(days=days_ago)
    return round(datetime.combine(today, datetime.min.time()).astimezone().timestamp() * 1000)


def iso(ms: int) -> str:
    """A time the CLI reads back to the very millisecond."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Fleet:
    """The writer and each agent's next sequence number: batches as the servicer would commit them."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.writer = Writer(db)
        self.seq: dict[str, int] = {}

    def batch(self, agent_id: str, received_ms: int, **facts: Any) -> None:
        self.seq[agent_id] = self.seq.get(agent_id, 0) + 1
        t = received_ms
        batch = ValidBatch(agent_id, self.seq[agent_id], t, t, t, t, facts.pop("samples", ()), [], **facts)
        self.writer.commit([batch])

    def traffic(self, agent_id: str, time_ms: int, zone: str, bytes_in: int, bytes_out: int) -> None:
        row = ZoneTrafficRow(time_ms, zone, "", bytes_in, bytes_out, 10, 10, 10_000, "nftables", 1.0)
        self.batch(agent_id, time_ms, zone_rows=[row])


def sample(time_ms: int) -> tuple[Any, ...]:
    return (time_ms, "eth0", 1000, 2000, 10, 20, 0, 0, 0, 0, 10_000, 800.0, 1600.0, 1_000_000_000, 1.6e-6, 0)


def scan(agent: int | None, key: str, severity: str, time_ms: int, title: str) -> Raise:
    return Raise(
        "admin_port_scan",
        key,
        agent,
        severity,
        title,
        {
            "events": [
                {
                    "category": "access",
                    "time_ms": time_ms,
                    "peer_addr": key,
                    "ports": [22, 3389],
                    "agent_id": "repeated",
                    "cmdline": HOSTILE,
                },
            ],
            "processes": [
                {"pid": 4242, "process": "sshd", "user": "root", "cmdline": f"/usr/sbin/sshd {HOSTILE}"}
            ],
        },
        time_ms,
        rule_id="5f0c6a57-6a4c-4f3e-9d55-0b1c2d3e4f50",
        rule_title="Admin port scan",
        dedup_fields={"peer_addr": key},
    )


def fill(path: Path) -> World:
    now = time.time_ns() // 1_000_000
    since = local_midnight(2)
    registered = since - HOUR
    db = open_database(path)
    fleet = Fleet(db)
    fleet.writer.store_catalog(CATALOG, "v1", registered)
    for agent_id, (hostname, department, county, addresses) in HOSTS.items():
        fleet.writer.register(
            AgentHello(agent_id, hostname, "t", HostLabels(department, county), "", 0), registered
        )
        inventory = InventoryRow(registered, True, addresses, (), (), (), "[]", hostname, "linux", "6")
        fleet.batch(
            agent_id,
            registered + MIN,
            inventory_rows=[inventory],
            samples=ValidBatch.columns_of([sample(registered + MIN)]),
        )
    migration.evaluate(db, since + HOUR, POLICY)  # the first decisions: not started, dual-homed, migrated

    # Link load over the three days: the vertical link every day, the horizontal one beyond its capacity.
    for day in range(3):
        start = since + day * DAY + 9 * HOUR if day < 2 else now - 30 * MIN
        for minute in range(3):
            t = start + minute * MIN
            fleet.traffic("ga-02", t, VERTICAL, 6_000_000 * (day + 1), 3_000_000)
            fleet.traffic("rs-01", t + 1000, VERTICAL, 1_500_000, 750_000 * (minute + 1))
        fleet.traffic("rs-01", start + 5 * MIN, HORIZONTAL, 600_000, 150_000)
        # Not an extranet link: not in the report.
        fleet.traffic("ga-01", start + 6 * MIN, "互联网", 1000, 1000)
    # ga-03 had migrated, then talks to the police network again: regressed (for a quiet period).
    back = since + DAY + 10 * HOUR
    fleet.traffic("ga-03", back, POLICE, 5000, 5000)
    migration.evaluate(db, back + MIN, POLICY)
    # rs-02 may stay on its network a few days more; another exemption expires beyond 14 days.
    key = fleet.writer.agent_key
    exempt_at = now - 5 * MIN
    migration.exempt(
        db,
        key("rs-02") or 0,
        SOCIAL,
        reason="社保核心系统迁移中",
        approved_by="王局长",
        reference="人社〔2026〕12号",
        until_ms=now + 5 * DAY,
        now_ms=exempt_at,
    )
    migration.exempt(
        db,
        key("ga-01") or 0,
        POLICE,
        reason="long",
        approved_by="李四",
        reference="",
        until_ms=now + 30 * DAY,
        now_ms=exempt_at,
    )
    migration.evaluate(db, exempt_at + 1000, POLICY)  # ga-03: quiet again for a whole period, migrated
    fleet.traffic("ga-03", now - 4 * MIN, POLICE, 7000, 7000)  # ... and back: regressed once more
    migration.evaluate(db, now - 3 * MIN, POLICY)

    # Health: recent for every agent but rs-03 (offline) and rs-02 (late); captures with and without loss.
    for agent_id, (packets, drops) in {
        "ga-01": (10_000, 50),
        "ga-02": (5000, 0),
        "ga-03": (2000, 500),
        "rs-01": (0, 0),
    }.items():
        health = HealthRow(now - 20_000, 1.5, 30 << 20, 0, 0, packets, drops, '{"capture": "on"}')
        fleet.batch(agent_id, now - 10_000, health_rows=[health])
    fleet.batch(
        "rs-02", now - 5 * MIN, health_rows=[HealthRow(now - 5 * MIN, 1.0, 1 << 20, 0, 0, 0, 0, "{}")]
    )
    # Input refused at the edge, by two reasons.
    for i, (field, message) in enumerate(
        [("batch.facts[0].interface_sample.rx_bps", "must be in [0, 1e+13], got -5.0")] * 2
        + [("batch.facts[1].zone_traffic.zone", "longer than 200 characters")]
    ):
        rejected = Rejected(
            "ghost-agent", i + 1, since + HOUR + i * MIN, "INVALID_ARGUMENT", field, message, ""
        )
        fleet.writer.commit([rejected])

    # Incidents: raised by the rules, reviewed by operators.
    ids = {}
    (ids["critical"],) = raise_incidents(
        db, [scan(key("ga-01"), "10.9.9.9", "critical", since + 3 * HOUR, "管理端口扫描 from 10.9.9.9")]
    )
    raise_incidents(
        db, [scan(key("ga-01"), "10.9.9.9", "critical", since + 4 * HOUR, "管理端口扫描 from 10.9.9.9")]
    )
    (ids["high"],) = raise_incidents(
        db, [scan(key("ga-02"), "10.9.9.10", "high", since + DAY + HOUR, "SSH brute")]
    )
    act(db, ids["high"], "acknowledge", "张三", "正在排查", since + DAY + 2 * HOUR)
    act(db, ids["high"], "resolve", "张三", "已封禁该地址 <b>", since + DAY + 3 * HOUR)
    (ids["medium"],) = raise_incidents(
        db, [scan(key("rs-01"), "10.9.9.11", "medium", now - 20 * MIN, "新监听端口")]
    )
    act(db, ids["medium"], "false_positive", "李四", "备份服务器巡检", now - 10 * MIN)
    # Seen before the period and again in it: counted, not new. Wholly before it: not in the report.
    (ids["old"],) = raise_incidents(db, [scan(key("rs-02"), "10.9.9.12", "low", since - 3 * HOUR, "old")])
    raise_incidents(db, [scan(key("rs-02"), "10.9.9.12", "low", since + 2 * HOUR, "old")])
    (ids["before"],) = raise_incidents(
        db, [scan(key("rs-03"), "10.9.9.13", "high", since - 2 * HOUR, "before")]
    )
    (ids["fleet"],) = raise_incidents(
        db,
        [
            Raise(
                "zonewatch.sequence_gap",
                "ghost",
                None,
                "medium",
                "gap",
                {"from_seq": 2, "to_seq": 3},
                since + 5 * HOUR,
            )
        ],
    )
    db.close()
    return World(path, now, since, now, ids)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return fill(tmp_path_factory.mktemp("report") / "collector.db")


@pytest.fixture(scope="module")
def reader(world: World) -> Iterator[sqlite3.Connection]:
    db = open_database(world.path, readonly=True)
    yield db
    db.close()


@pytest.fixture(scope="module")
def reports(world: World, reader: sqlite3.Connection) -> dict[str, str]:
    data = gather(reader, since_ms=world.since, until_ms=world.until, now_ms=world.now, db_path=world.path)
    return {lang: render_html(data, lang) for lang in ("zh", "en")}


def cli_parallel(*commands: tuple[str, ...]) -> list[Any]:
    """Several `zonewatch-collector ... --format json` at once (each its own process)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda argv: cli_json("zonewatch-collector", *argv), commands))


# --- every number is the CLI's ----------------------------------------------------------------------


def test_every_figure_equals_the_clis(world: World, reports: dict[str, str]) -> None:
    doc = embedded(reports["zh"])
    assert embedded(reports["en"]) == {**doc, "lang": "en"}
    db = str(world.path)
    days = doc["links"]["days"]
    since, until = iso(world.since), iso(world.until)
    listed, by_department, by_county, history, agents, health, period, *per_day = cli_parallel(
        ("incidents", "list", "--db", db, "--status", "all", "--since", since, "--limit", "100000"),
        ("migration", "--db", db),
        ("migration", "--db", db, "--by", "county"),
        ("migration", "--db", db, "--history", "--since", since, "--until", until),
        ("agents", "--db", db),
        ("health", "--db", db, "--since", since),
        ("traffic", "--db", db, "--by", "zone", "--since", since, "--until", until),
        *(
            (
                "traffic",
                "--db",
                db,
                "--by",
                "zone",
                "--since",
                iso(d["since_ms"]),
                "--until",
                iso(d["until_ms"]),
            )
            for d in days
        ),
    )
    assert isinstance(listed, list) and isinstance(by_department, dict) and isinstance(health, dict)

    # (a) the incidents seen in the period, by severity, by status, new per day.
    seen = [i for i in listed if i["first_seen_ms"] < world.until]
    assert doc["summary"]["incidents"] == len(seen) == 5
    for field, values in (
        ("severity", doc["summary"]["by_severity"]),
        ("status", doc["summary"]["by_status"]),
    ):
        for value, count in values.items():
            assert count == sum(i[field] == value for i in seen), (field, value)
    new = [i for i in seen if i["first_seen_ms"] >= world.since]
    assert doc["summary"]["new"] == len(new) == 4
    assert [d["day"] for d in doc["incidents_per_day"]] == [d["day"] for d in days] and len(days) == 3
    for day in doc["incidents_per_day"]:
        here = [i for i in new if day["since_ms"] <= i["first_seen_ms"] < day["until_ms"]]
        for severity in ("informational", "low", "medium", "high", "critical"):
            assert day[severity] == sum(i["severity"] == severity for i in here)
    # (b) each incident as `incidents list` has it, most severe first.
    rows = doc["incidents"]["rows"]
    assert (doc["incidents"]["total"], doc["incidents"]["shown"], doc["incidents"]["omitted"]) == (5, 5, 0)
    assert sorted(rows, key=lambda r: r["id"]) == sorted(seen, key=lambda r: r["id"])
    assert [r["severity"] for r in rows] == ["critical", "high", "medium", "medium", "low"]
    assert world.incidents["before"] not in {r["id"] for r in rows}

    # (c) the extranet links, per day and over the period, as `traffic --by zone` prints them.
    zones = {z["zone"]: z for z in doc["links"]["zones"]}
    assert set(zones) == {VERTICAL, HORIZONTAL}
    for name, link in zones.items():
        assert link["period"] == next(r for r in period if r["group"] == name)
        for index, rows_of_day in enumerate(per_day):
            expected = next((r for r in rows_of_day if r["group"] == name), None)
            assert link["days"][index] == expected, (name, index)
    assert zones[VERTICAL]["capacity_bps"] == 1_000_000_000 and zones[VERTICAL]["direction"] == "vertical"
    assert zones[HORIZONTAL]["period"]["utilization_peak"] > 1  # beyond its capacity

    # (d) migration by department and county, regressed hosts, exemptions expiring, the trend.
    assert doc["migration"]["by_department"] == by_department["groups"]
    assert doc["migration"]["by_county"] == by_county["groups"]
    assert doc["migration"]["regressed"] == by_department["regressed"]
    assert [r["hostname"] for r in doc["migration"]["regressed"]] == ["ga-app-03"]
    assert doc["migration"]["expiring_exemptions"] == by_department["expiring_exemptions"]
    assert [e["hostname"] for e in doc["migration"]["expiring_exemptions"]] == ["rs-db-02"]
    assert doc["migration"]["trend"] == history
    overall = doc["migration"]["overall"]
    for state in ("not_started", "dual_homed", "migrated", "regressed", "exempt", "unknown"):
        assert overall[state] == sum(g[state] for g in by_department["groups"])
    assert overall["pairs"] == sum(g["pairs"] for g in by_department["groups"])

    # (e) coverage: agents silent, capture loss, rejected input.
    cov = doc["coverage"]
    assert cov["agents"] == health["agents"] == {"total": 6, "online": 4, "stale": 1, "offline": 1}
    assert cov["silent"] == sorted(
        (a for a in agents if a["status"] != "online"), key=lambda a: a["last_seen_ms"]
    )
    assert [a["status"] for a in cov["silent"]] == ["offline", "stale"]
    reported = [a for a in health["agent_health"] if a["capture_packets"] is not None]
    assert cov["capture"]["agents_reporting"] == len(reported)
    assert cov["capture"]["packets"] == sum(a["capture_packets"] for a in reported)
    assert cov["capture"]["drops"] == sum(a["capture_drops"] for a in reported) == 550
    assert cov["capture"]["rows"] == sorted(
        (a for a in reported if a["capture_drops"]), key=lambda a: -a["drop_fraction"]
    )
    assert [a["hostname"] for a in cov["capture"]["rows"]] == ["ga-app-03", "ga-web-01"]
    assert cov["rejected"] == health["rejected"]
    assert [r["times"] for r in cov["rejected"]] == [2, 1]


def test_a_department_and_county_narrow_every_section_that_has_hosts(
    world: World, reader: sqlite3.Connection
) -> None:
    data = gather(
        reader,
        since_ms=world.since,
        until_ms=world.until,
        department="市公安局",
        county="高新区",
        now_ms=world.now,
        db_path=world.path,
    )
    doc = embedded(render_html(data, "zh"))
    db = str(world.path)
    listed = cli_json(
        "zonewatch-collector",
        "incidents",
        "list",
        "--db",
        db,
        "--status",
        "all",
        "--since",
        iso(world.since),
        "--department",
        "市公安局",
    )
    mine = [i for i in listed if i["county"] == "高新区" and i["first_seen_ms"] < world.until]
    assert sorted(r["id"] for r in doc["incidents"]["rows"]) == sorted(i["id"] for i in mine)
    assert [r["id"] for r in doc["incidents"]["rows"]] == [world.incidents["critical"]]
    (group,) = doc["migration"]["by_department"]
    assert group["group"] == "市公安局" and group["pairs"] == 2  # ga-web-01 and ga-app-03, both in 高新区
    assert [g["group"] for g in doc["migration"]["by_county"]] == ["高新区"]
    assert doc["migration"]["trend"] is None  # the whole city's: not for one department
    assert doc["coverage"]["agents"]["total"] == 2
    assert doc["coverage"]["silent"] == []
    assert {a["hostname"] for a in doc["coverage"]["capture"]["rows"]} == {"ga-web-01", "ga-app-03"}
    assert doc["filters"] == {"department": "市公安局", "county": "高新区"}
    # The link load is the fleet's: the same as unfiltered.
    assert {z["zone"] for z in doc["links"]["zones"]} == {VERTICAL, HORIZONTAL}


# --- the HTML: self-contained, escaped, in both languages -----------------------------------------


def test_the_file_stands_alone_and_escapes_what_agents_sent(reports: dict[str, str]) -> None:
    for lang, html in reports.items():
        assert html.startswith("<!DOCTYPE html>")
        assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I), lang
        assert "http://" not in html and "https://" not in html and "url(" not in html
        assert html.count("<script") == 1, "only the JSON data block"
        assert "@page { size: A4; margin: 15mm; }" in html
        assert "thead { display: table-header-group; }" in html and "break-inside: avoid" in html
        assert '"Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei"' in html
        # Agents' strings are text, never markup: not in the page, not in the charts, not in the JSON.
        assert HOSTILE not in html and "<img" not in html and "<b>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in html
        assert '\\u003cimg src=x onerror=\\"alert(2)\\"\\u003e' in html  # the JSON block's host name
        assert "<svg" in html and "<title" in html
        for department in ("市公安局", "市人社局", "高新区", "经开区", VERTICAL):
            assert department in html, (lang, department)


def test_each_language_has_its_headings_and_names(reports: dict[str, str]) -> None:
    zh, en = reports["zh"], reports["en"]
    assert '<html lang="zh-CN">' in zh and '<html lang="en">' in en
    for key in ("title", "summary", "incidents", "links", "migration", "coverage"):
        assert LABELS["zh"][key] in zh and LABELS["en"][key] in en, key
        assert LABELS["en"][key] not in zh, key
    assert "严重" in zh and "已解决" in zh and "回退" in zh and "纵向" in zh
    assert "critical" in en and "resolved" in en and "regressed" in en and "vertical" in en
    assert "已封禁该地址 &lt;b&gt;" in zh  # the operator's comment, in the actions taken
    assert set(LABELS["zh"]) == set(LABELS["en"])


def test_cli_writes_the_report_and_says_what_it_holds(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser(prog="zonewatch-collector")
    handlers = cli_report.add_parser(
        parser.add_subparsers(dest="command"), cli._db_arg, cli._format_arg, cli._range_args
    )
    for name in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    out = tmp_path / "周报.html"
    argv = [
        "report",
        "--db",
        str(world.path),
        "--from",
        iso(world.since),
        "--to",
        iso(world.until),
        "--out",
        str(out),
    ]
    assert handlers["report"](parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out)
    assert "5 incidents (1 critical, 1 high)" in printed[1] and "2 extranet links" in printed[1]
    assert "2 of 6 agents silent" in printed[1]
    html = out.read_text(encoding="utf-8")
    assert LABELS["zh"]["title"] in html
    doc = embedded(html)
    assert (doc["lang"], doc["since_ms"], doc["until_ms"]) == ("zh", world.since, world.until)
    monkeypatch.setenv("LANG", "C.UTF-8")
    assert handlers["report"](parser.parse_args([*argv, "--department", "市公安局"])) == 0
    assert embedded(out.read_text(encoding="utf-8"))["lang"] == "en"
    assert "for 市公安局" in capsys.readouterr().out
    # Errors are one line, and leave no file behind.
    bad = ["report", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "x.html")]
    assert handlers["report"](parser.parse_args(bad)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no database at" in err[0]
    assert not (tmp_path / "x.html").exists()
    empty = [*argv[:3], "--from", "2026-11-02", "--to", "2026-11-01", "--out", str(tmp_path / "y.html")]
    assert handlers["report"](parser.parse_args(empty)) == 1
    assert "empty time range" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["周报.html"]


def test_the_locale_chooses_the_language() -> None:
    assert cli_report.default_lang({"LANG": "zh_CN.UTF-8"}) == "zh"
    assert cli_report.default_lang({"LANG": "zh_CN.UTF-8", "LC_ALL": "en_US.UTF-8"}) == "en"
    assert cli_report.default_lang({"LANG": "en_US.UTF-8", "LC_MESSAGES": "zh_TW"}) == "zh"
    assert cli_report.default_lang({}) == "en"
    assert lang_of_locale("C") == "en" and lang_of_locale("zh") == "zh"


# --- one incident ----------------------------------------------------------------------------------


def test_incident_report_is_what_incidents_show_prints(
    world: World, reader: sqlite3.Connection, tmp_path: Path
) -> None:
    incident = world.incidents["high"]
    db = str(world.path)
    shown = json.loads(
        run_cli(
            "zonewatch-collector", "incidents", "show", str(incident), "--db", db, "--format", "json"
        ).stdout
    )
    for lang in ("zh", "en"):
        out = tmp_path / f"incident-{lang}.html"
        result = run_cli(
            "zonewatch-collector",
            "incidents",
            "report",
            str(incident),
            "--db",
            db,
            "--lang",
            lang,
            "--out",
            str(out),
        )
        assert result.stdout.splitlines()[0] == str(out)
        assert f"incident {incident} ({lang}): high, resolved" in result.stdout
        html = out.read_text(encoding="utf-8")
        doc = embedded(html)
        assert doc["incident"] == shown and doc["lang"] == lang
        assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # the JSON block's evidence
        assert "张三" in html and "正在排查" in html and "已封禁该地址 &lt;b&gt;" in html
        assert "http://" not in html and "https://" not in html and html.count("<script") == 1
        assert LABELS[lang]["incident_title"] in html and LABELS[lang]["lifecycle"] in html
    missing = run_cli(
        "zonewatch-collector",
        "incidents",
        "report",
        "99999",
        "--db",
        db,
        "--out",
        str(tmp_path / "none.html"),
        check=False,
    )
    assert missing.returncode == 1 and "no incident 99999" in missing.stderr
    assert not (tmp_path / "none.html").exists()
    assert "10.9.9.10" in render_incident_html(
        incident_detail(reader, incident), "en", generated_ms=world.now
    )


# --- in a real browser -----------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (.ci/run installs it)"
)
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_chromium_renders_it_to_a_screenshot_and_a_pdf(
    lang: str, reports: dict[str, str], tmp_path: Path
) -> None:
    page = tmp_path / f"report-{lang}.html"
    page.write_text(reports[lang], encoding="utf-8")
    _, pdf = render_in_chromium(page, tmp_path)
    assert pdf.stat().st_size > 10_000  # pages, not an empty document


# --- the parts -------------------------------------------------------------------------------------


def test_at_most_max_incidents_are_detailed_and_the_rest_counted(
    world: World, reader: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_data, "MAX_INCIDENTS", 2)
    data = gather(reader, since_ms=world.since, until_ms=world.until, now_ms=world.now, db_path=world.path)
    doc = embedded(render_html(data, "en"))
    assert (doc["incidents"]["total"], doc["incidents"]["shown"], doc["incidents"]["omitted"]) == (5, 2, 3)
    assert [r["severity"] for r in doc["incidents"]["rows"]] == ["critical", "high"]
    assert "3 more incidents are not listed (the 2 most severe are)" in render_html(data, "en")


def test_days_cover_the_period_without_gap_or_overlap() -> None:
    since = local_midnight(3) + 5 * HOUR
    until = local_midnight(0) + 30 * MIN
    days = report_data.split_days(since, until)
    assert len(days) == 4 and days[0].since_ms == since and days[-1].until_ms == until
    assert all(a.until_ms == b.since_ms for a, b in pairwise(days))
    assert days[1].since_ms == local_midnight(2) and days[-1].day == datetime.now().date().isoformat()
    with pytest.raises(QueryError, match="at most"):
        report_data.split_days(0, report_data.MAX_DAYS * DAY + 2 * DAY)


def test_charts_escape_their_text_and_say_what_they_show() -> None:
    series = [svg.Series("<b>bold</b>", "#000", [1, 2]), svg.Series("二", "red", [0, 3])]
    charts = [
        svg.stacked_columns(
            chart_id="c1", title="<t>", categories=["<a>", "b"], series=series, x_label="x", y_label="y"
        ),
        svg.stacked_bars(
            chart_id="c2",
            title="<t>",
            categories=["<a>", "市人力资源和社会保障局信息中心"],
            series=series,
            x_label="x",
            notes=["<n>", "1.0 %"],
        ),
        svg.line_chart(
            chart_id="c3",
            title="<t>",
            categories=["<a>", "b"],
            series=series,
            x_label="x",
            y_label="y",
            limit=svg.Limit("<cap>", 10),
        ),
    ]
    for chart in charts:
        assert chart.startswith('<svg class="chart"') and chart.endswith("</svg>")
        assert "<b>" not in chart and "<a>" not in chart and "<t>" not in chart
        assert "&lt;b&gt;bold&lt;/b&gt;" in chart and "<title" in chart and "<desc" in chart
        assert "http" not in chart
    assert "&lt;cap&gt; 10" in charts[2]
    assert "市人力资源和社会保障局信息中心</title>" in charts[1]  # whole in the tooltip, cut on the axis
    assert svg.nice_ticks(7, integer=True) == [0, 2, 4, 6, 8]
    assert svg.nice_ticks(0) == [0, 1]

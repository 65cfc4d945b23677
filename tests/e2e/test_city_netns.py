"""The city in a box, shortened to 45 s: what the demo (deploy/city.py) does to a city must be what the
collector's CLI then tells an operator. The scan is an incident about the attacker, the operator's
acknowledgement and resolution stand, each host of 市公安局 is in the migration state its story gives it
(the blocker named), and both extranet links carry load against their capacity."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_json, embedded, render_in_chromium, run_cli
from testnet import ROOT, require_root_netns

sys.path.insert(0, str(ROOT / "deploy"))
from city import DEDICATED, HORIZONTAL, VERTICAL, run_city, write_report

pytestmark = pytest.mark.netns

SECONDS = 45


def show(db: str, *args: str) -> Any:
    """`zonewatch-collector ARGS --db DB --format json`, parsed."""
    return cli_json("zonewatch-collector", *args, "--db", db)


def test_a_short_city_tells_its_stories_through_the_cli(tmp_path: Path) -> None:
    require_root_netns()
    started = time.monotonic()
    result = run_city(tmp_path / "city", seconds=SECONDS, progress=lambda t, m: print(f"[{t:5.1f} s] {m}"))
    took = time.monotonic() - started
    db = str(result.db)
    assert not result.unclean_stops, result.unclean_stops

    # Every attack raised its incident, about the attacker; the operator's actions stand.
    incidents = {i["id"]: i for i in show(db, "incidents", "list", "--status", "all")}
    assert {a.rule for a in result.attacks} == {
        "port_scan_vertical",
        "port_scan_horizontal",
        "admin_brute_force",
    }
    for attack in result.attacks:
        assert incidents[attack.incident]["rule"] == attack.rule
        detail = show(db, "incidents", "show", str(attack.incident))
        assert {e["peer_addr"] for e in detail["evidence"]["events"]} == {attack.source}, attack
    scan = next(a for a in result.attacks if a.rule == "port_scan_vertical")
    assert incidents[scan.incident]["hostname"] == "jy-web-01"
    assert {a.action for a in result.actions} == {"ack", "resolve"}
    for action in result.actions:
        assert incidents[action.incident]["status"] == action.status
        (done,) = show(db, "incidents", "show", str(action.incident))["actions"]
        assert (done["actor"], done["comment"]) == (action.by, action.comment)
    regressions = [
        i["hostname"] for i in incidents.values() if i["rule"] == "dedicated_traffic_after_migration"
    ]
    assert regressions == list(result.regressed) == ["ga-ws-03"]

    # Migration: one host of 市公安局 in each state of its story, the blockers named.
    assert result.migration == {
        "ga-ws-01": "dual_homed", "ga-ws-02": "migrated", "ga-ws-03": "regressed", "ga-db-01": "exempt",
    }  # fmt: skip
    (police,) = show(db, "migration")["groups"]
    assert police["group"] == "市公安局"
    assert {s: police[s] for s in ("dual_homed", "migrated", "regressed", "exempt")} == dict.fromkeys(
        ("dual_homed", "migrated", "regressed", "exempt"), 1
    )
    for host, state in result.migration.items():
        (row,) = show(db, "migration", "host", host)
        assert (row["network"], row["state"]) == (DEDICATED, state), host
    for host, script in result.blockers.items():
        (row,) = show(db, "migration", "host", host)
        assert any(script in b["cmdline"] for b in row["evidence"]["blockers"]), (host, row["evidence"])

    # Load on both extranet links, measured against their capacity.
    links = {r["group"]: r for r in show(db, "traffic", "--by", "zone")}
    assert (links[VERTICAL]["direction"], links[VERTICAL]["capacity_bps"]) == ("vertical", 100_000_000)
    assert (links[HORIZONTAL]["direction"], links[HORIZONTAL]["capacity_bps"]) == (
        "horizontal",
        1_000_000_000,
    )
    for link in (links[VERTICAL], links[HORIZONTAL]):
        assert link["bytes_in"] > 10_000_000 and link["bytes_out"] > 10_000_000, link
        assert link["utilization_p95"] > 0, link

    # The report of the run, in both languages: its figures are the CLI's, and a real browser renders it.
    since = "1h"
    listed = show(db, "incidents", "list", "--status", "all", "--since", since, "--limit", "100000")
    migration = show(db, "migration")
    by_county = show(db, "migration", "--by", "county")
    for lang in ("zh", "en"):
        out = tmp_path / f"city-report-{lang}.html"
        write_report(result.db, out, lang, since)
        doc = embedded(out.read_text(encoding="utf-8"))
        assert doc["lang"] == lang
        assert doc["summary"]["incidents"] == len(listed)
        for severity, count in doc["summary"]["by_severity"].items():
            assert count == sum(i["severity"] == severity for i in listed), severity
        for status, count in doc["summary"]["by_status"].items():
            assert count == sum(i["status"] == status for i in listed), status
        assert sorted(r["id"] for r in doc["incidents"]["rows"]) == sorted(i["id"] for i in listed)
        assert doc["migration"]["by_department"] == migration["groups"]
        assert doc["migration"]["by_county"] == by_county["groups"]
        assert doc["migration"]["regressed"] == migration["regressed"]
        assert {z["zone"] for z in doc["links"]["zones"]} == {VERTICAL, HORIZONTAL}
        text = out.read_text(encoding="utf-8")
        assert "市公安局" in text and "高新区" in text
        render_in_chromium(out, tmp_path)
    assert run_cli("zonewatch-collector", "incidents", "verify", "--db", db).returncode == 0
    print(f"city of {SECONDS} s ran in {took:.1f} s")

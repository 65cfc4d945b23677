"""Detection in a real collector: facts sent over gRPC are stored, judged by the rules in --rules, and
raised as incidents in the SQLite file. Rules reload on file change and SIGHUP without losing their
windows; a broken file keeps its previous version; an exception silences its scope only; a silent
agent is raised by the collector's own clock."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Stream, now_ms, run_cli

from agent.wire import batch_request
from protos.zonewatch.v1 import facts_pb2

SCAN_RULE = """\
title: Ports of one host scanned
id: 5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0001
name: test_scan
status: test
level: high
description: one peer, many ports of one host
correlation:
  type: value_count
  rules: [test_scan_attempts]
  group-by: [agent_id, peer_addr]
  timespan: 90s
  condition:
    field: ports
    gte: {threshold}
samples:
  match:
    - [{{category: access, direction: inbound, peer_addr: 10.0.0.9, attempts: 20, ports: [{ports}]}}]
  no_match:
    - [{{category: access, direction: inbound, peer_addr: 10.0.0.9, attempts: 1, ports: [22]}}]
---
title: Connection attempts from a peer
id: 5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0002
name: test_scan_attempts
status: test
level: informational
logsource:
  product: zonewatch
  category: access
detection:
  selection:
    direction: inbound
    attempts|gte: 1
  condition: selection
"""

LISTENER_RULE = """\
title: New listening service
id: 5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0003
name: test_new_listener
status: test
level: low
logsource:
  product: zonewatch
  category: listener
detection:
  opened:
    change: opened
  loopback:
    local_addr|cidr: [127.0.0.0/8, "::1/128"]
  condition: opened and not loopback
dedup-by: [agent_id, protocol, local_port]
samples:
  match:
    - {category: listener, change: opened, protocol: tcp, local_addr: 0.0.0.0, local_port: 8443}
  no_match:
    - {category: listener, change: opened, protocol: tcp, local_addr: 127.0.0.1, local_port: 8443}
"""

SILENT_RULE = """\
title: Agent silent
id: 5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0004
name: test_agent_silent
status: test
level: high
logsource:
  product: zonewatch
  category: heartbeat
detection:
  selection:
    intervals_missed|gte: 3
  condition: selection
samples:
  match:
    - {category: heartbeat, intervals_missed: 3.5, silent_s: 35, interval_s: 10}
  no_match:
    - {category: heartbeat, intervals_missed: 2, silent_s: 20, interval_s: 10}
"""


def scan_rule(threshold: int) -> str:
    return SCAN_RULE.format(threshold=threshold, ports=", ".join(str(p) for p in range(1, threshold + 1)))


def access(peer: str, ports: list[int], time_ms: int, **changes: Any) -> facts_pb2.Fact:
    summary = facts_pb2.AccessSummary(
        peer_addr=peer, peer_zone="unknown", local_zone="unknown", inbound=True, attempts=len(ports),
        distinct_ports=len(ports), distinct_hosts=1, resets=len(ports), window_ms=1000, ports=ports,
    )  # fmt: skip
    for name, value in changes.items():
        setattr(summary, name, value)
    return facts_pb2.Fact(time_ms=time_ms, access_summary=summary)


def listener(port: int, address: str, time_ms: int) -> facts_pb2.Fact:
    change = facts_pb2.ListenerChange(
        change=facts_pb2.ListenerChange.OPENED, ip_protocol=6, local_addr=address, local_port=port,
        process=facts_pb2.ProcessRef(pid=4242, name="nginx", user="www-data", cmdline="nginx -g daemon off;"),
    )  # fmt: skip
    return facts_pb2.Fact(time_ms=time_ms, listener_change=change)


class Sender:
    def __init__(self, stream: Stream) -> None:
        self.stream, self.seq = stream, 0

    def send(self, *facts: facts_pb2.Fact) -> None:
        self.seq += 1
        t = now_ms()
        response = self.stream.send(batch_request(self.seq, t, t, [], extra=list(facts)).SerializeToString())
        assert response.ack.acked_seq == self.seq, response


def incidents(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM incidents ORDER BY id")]
    finally:
        con.close()


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "test_scan.yml").write_text(scan_rule(15), encoding="utf-8")
    (directory / "test_new_listener.yml").write_text(LISTENER_RULE, encoding="utf-8")
    return directory


@pytest.fixture
def judged(tmp_path: Path, rules_dir: Path) -> Iterator[tuple[Collector, Sender]]:
    collector = Collector(tmp_path / "c.db", 0, "--rules", str(rules_dir), "--detection-interval", "0.2")
    stream = Stream(collector.target, "agent-dept-1")
    try:
        yield collector, Sender(stream)
    finally:
        stream.close()
        collector.stop()


def test_a_scan_is_one_incident_per_target_with_its_evidence(judged: tuple[Collector, Sender]) -> None:
    collector, sender = judged
    t = now_ms()
    sender.send(access("10.0.0.9", list(range(1, 11)), t))
    assert not [i for i in incidents(collector.db) if i["rule"] == "test_scan"]
    sender.send(access("10.0.0.9", list(range(11, 21)), t + 1000))  # 20 ports now: over 15
    sender.send(access("10.0.0.9", list(range(21, 31)), t + 2000))  # the same scan goes on
    sender.send(access("10.0.0.77", list(range(1, 40)), t + 2000))  # another peer: its own incident
    found = wait_for(lambda: len(_of(collector.db, "test_scan")) == 2 and _of(collector.db, "test_scan"))
    by_peer = {json.loads(i["dedup_fields"])["peer_addr"]: i for i in found}
    assert set(by_peer) == {"10.0.0.9", "10.0.0.77"}
    first = by_peer["10.0.0.9"]
    assert first["count"] == 2 and first["severity"] == "high" and first["status"] == "open"
    assert first["rule_id"] == "5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0001"
    assert "10.0.0.9" in first["title"] and "host-agent-dept-1" in first["title"]
    events = json.loads(first["evidence"])["events"]
    assert {e["peer_addr"] for e in events} == {"10.0.0.9"}
    assert events[-1]["department"] == "市教育局" and events[-1]["direction"] == "inbound"


def test_a_new_listener_is_raised_but_not_one_on_loopback(judged: tuple[Collector, Sender]) -> None:
    collector, sender = judged
    t = now_ms()
    sender.send(listener(8443, "0.0.0.0", t), listener(6379, "127.0.0.1", t))
    (incident,) = wait_for(lambda: _of(collector.db, "test_new_listener"))
    evidence = json.loads(incident["evidence"])
    assert evidence["processes"][0]["process"] == "nginx"
    assert json.loads(incident["dedup_fields"])["local_port"] == 8443


def test_a_changed_rule_reloads_with_its_windows_and_a_broken_file_keeps_the_old_version(
    judged: tuple[Collector, Sender], rules_dir: Path
) -> None:
    collector, sender = judged
    t = now_ms()
    sender.send(access("10.0.0.9", list(range(1, 13)), t))  # 12 ports: under 15 and under 20
    (rules_dir / "test_scan.yml").write_text(scan_rule(20), encoding="utf-8")
    collector.wait_for_line(re.compile(r"rules reloaded"))
    sender.send(access("10.0.0.9", list(range(13, 19)), t + 1000))  # 18: over the old 15, not the new 20
    time.sleep(0.5)
    assert not _of(collector.db, "test_scan")
    sender.send(access("10.0.0.9", list(range(19, 23)), t + 2000))  # 22: the window was kept
    wait_for(lambda: _of(collector.db, "test_scan"), what="the scan after a reload")

    (rules_dir / "test_scan.yml").write_text("title: [broken\n", encoding="utf-8")
    error = collector.wait_for_line(re.compile(r"rule not loaded.*test_scan\.yml:(\d+)"))
    assert int(error.group(1)) >= 1
    sender.send(access("10.0.0.55", list(range(1, 30)), t + 3000))
    wait_for(lambda: len(_of(collector.db, "test_scan")) == 2, what="the old version still judging")


def test_sighup_reloads_the_rules(judged: tuple[Collector, Sender], rules_dir: Path) -> None:
    collector, _ = judged
    (rules_dir / "test_agent_silent.yml").write_text(SILENT_RULE, encoding="utf-8")
    collector.proc.send_signal(signal.SIGHUP)
    collector.wait_for_line(re.compile(r"rules reloaded: 3 in force"))


def test_an_exception_silences_its_scope_only(judged: tuple[Collector, Sender]) -> None:
    collector, sender = judged
    run_cli(
        "zonewatch-collector", "exceptions", "add", "--db", str(collector.db), "--rule", "test_scan",
        "--peer", "10.0.0.0/29", "--reason", "漏洞扫描器 (weekly vulnerability scan)",
        "--owner", "安全科 王工", "--expires", "30d",
    )  # fmt: skip
    t = now_ms()
    sender.send(access("10.0.0.5", list(range(1, 40)), t), access("10.0.0.9", list(range(1, 40)), t))
    (incident,) = wait_for(lambda: _of(collector.db, "test_scan"))
    time.sleep(0.5)
    assert [json.loads(i["dedup_fields"])["peer_addr"] for i in _of(collector.db, "test_scan")] == [
        "10.0.0.9"
    ]
    assert incident


def test_a_silent_agent_is_raised_by_the_collectors_clock(tmp_path: Path, rules_dir: Path) -> None:
    (rules_dir / "test_agent_silent.yml").write_text(SILENT_RULE, encoding="utf-8")
    collector = Collector(tmp_path / "c.db", 0, "--rules", str(rules_dir), "--detection-interval", "0.2")
    try:
        stream = Stream(collector.target, "agent-quiet")
        sender = Sender(stream)
        for _ in range(5):  # a cadence of 300 ms
            sender.send(access("10.0.0.1", [80], now_ms()))
            time.sleep(0.3)
        assert not _of(collector.db, "test_agent_silent")
        stopped = time.monotonic()
        (incident,) = wait_for(lambda: _of(collector.db, "test_agent_silent"), what="a silent-agent incident")
        assert time.monotonic() - stopped < 5
        assert "host-agent-quiet" in incident["title"]
        stream.close()
    finally:
        collector.stop()


def _of(db: Path, rule: str) -> list[dict[str, Any]]:
    return [i for i in incidents(db) if i["rule"] == rule]

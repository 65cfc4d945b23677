"""SIEM export: incidents raised by a real collector reach a real syslog receiver (TCP, TLS) and a JSON
lines file, at least once, through a receiver that stops mid-export, a rotated file and a collector
restart. The receiver (syslog_receiver.py) parses every frame strictly: RFC 6587 octet counting, then
RFC 5424's ABNF, written from the RFC and independent of collector/siem/format.py."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Stream, now_ms, run_cli
from syslog_receiver import Receiver, make_pki, parse_syslog

from agent.wire import batch_request
from collector.siem import DeliveryError, SiemError
from collector.siem.config import SyslogTarget, parse_sd_id, parse_syslog_url
from collector.siem.format import (
    MAX_MESSAGE_BYTES,
    frame,
    json_line,
    parse_facility,
    syslog_incident,
    syslog_test,
)
from collector.siem.jsonl import JsonLinesFile
from collector.siem.transport import SyslogClient
from collector.store import export, incidents
from collector.store.database import open_database
from collector.store.export import ExportedChange
from protos.zonewatch.v1 import facts_pb2


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


# --- incidents from a real collector ---------------------------------------------------------------

LISTENER_RULE = """\
title: New listening service
id: 5b0c6f0e-4f59-4d36-9d7f-1c6d9c6a0103
name: siem_new_listener
status: test
level: high
logsource:
  product: zonewatch
  category: listener
detection:
  opened:
    change: opened
  condition: opened
dedup-by: [agent_id, protocol, local_port]
samples:
  match:
    - {category: listener, change: opened, protocol: tcp, local_addr: 0.0.0.0, local_port: 8443}
  no_match:
    - {category: listener, change: closed, protocol: tcp, local_addr: 0.0.0.0, local_port: 8443}
"""


def listener(port: int) -> facts_pb2.Fact:
    change = facts_pb2.ListenerChange(
        change=facts_pb2.ListenerChange.OPENED, ip_protocol=6, local_addr="0.0.0.0", local_port=port,
        process=facts_pb2.ProcessRef(pid=4242, name="服务]\"\\", user="www-data", cmdline="nginx -g"),
    )  # fmt: skip
    return facts_pb2.Fact(time_ms=now_ms(), listener_change=change)


class Agent:
    def __init__(self, collector: Collector) -> None:
        self.stream, self.seq = Stream(collector.target, "siem-agent-1"), 0

    def open_ports(self, *ports: int) -> None:
        self.seq += 1
        t = now_ms()
        batch = batch_request(self.seq, t, t, [], extra=[listener(p) for p in ports])
        assert self.stream.send(batch.SerializeToString()).ack.acked_seq == self.seq


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# Read in this process where a test polls (a CLI subprocess costs half a second); the CLI's own output
# is checked once each: `incidents show --format json` prints detail_document, `siem status` cursor_statuses.
def _read(db: Path, query: Callable[[sqlite3.Connection], Any]) -> Any:
    con = open_database(db, readonly=True)
    try:
        return query(con)
    finally:
        con.close()


def db_incidents(db: Path) -> dict[int, dict[str, Any]]:
    return {r.id: r._asdict() for r in _read(db, lambda con: incidents.list_incidents(con, status="all"))}


def show(db: Path, incident: int) -> dict[str, Any]:
    return _read(db, lambda con: incidents.detail_document(incidents.incident_detail(con, incident)))  # type: ignore[no-any-return]


def siem_status(db: Path) -> dict[str, dict[str, Any]]:
    return {s.destination.split()[0]: s._asdict() for s in _read(db, export.cursor_statuses)}


def siem_status_cli(db: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    result = run_cli(
        "zonewatch-collector", "siem", "status", "--db", str(db), "--format", "json", check=False
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, {row["destination"].split()[0]: row for row in json.loads(result.stdout)}


def delivered_states(receiver_messages: list[dict[str, str]]) -> set[tuple[int, str, int]]:
    return {(int(m["id"]), m["status"], int(m["count"])) for m in receiver_messages}


def current_states(db: Path) -> set[tuple[int, str, int]]:
    return {(i, row["status"], row["matches"]) for i, row in db_incidents(db).items()}


def jsonl_documents(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


EXPORT_KEYS = ("schema", "change", "change_seq", "time", "collector")


def test_every_incident_and_change_arrives_at_least_once_through_a_stopped_receiver_and_a_restart(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "siem_new_listener.yml").write_text(LISTENER_RULE, encoding="utf-8")
    jsonl = tmp_path / "incidents.jsonl"
    # Stalls after 2 frames with a small receive buffer: the rest of the batch stays unacknowledged.
    first = Receiver(stall_after=2)
    receivers.append(first)
    args = ("--rules", str(rules), "--detection-interval", "0.2", "--siem-syslog", f"tcp://127.0.0.1:{first.port}",
            "--siem-jsonl", str(jsonl), "--siem-retry-max", "0.5")  # fmt: skip
    db = tmp_path / "c.db"
    collector = Collector(db, 0, *args)
    try:
        agent = Agent(collector)
        agent.open_ports(*range(8001, 8013))  # twelve incidents, one batch of ~10 KB
        assert first.stalled.wait(15), "the receiver never got the first frames"
        started = time.monotonic()
        agent.open_ports(8015)  # ingest goes on beside a stuck receiver
        assert time.monotonic() - started < 2.0
        wait_for(lambda: len(db_incidents(db)) == 13, what="the incident raised beside a stuck receiver")
        # The JSON lines file is not held up by the stuck receiver either.
        wait_for(lambda: siem_status(db)["jsonl"]["backlog"] == 0, what="the JSON lines file")
        status = siem_status(db)
        assert status["syslog"]["change_seq"] == 0, "the cursor moved before the receiver acknowledged"
        assert status["syslog"]["backlog"] == 13
        first.stop()  # mid-export: two messages read, the rest unacknowledged, the connection reset

        ids = sorted(db_incidents(db))
        cli = ("zonewatch-collector", "incidents")
        run_cli(*cli, "ack", str(ids[0]), "--by", "张三", "--comment", "正在排查", "--db", str(db))
        run_cli(*cli, "resolve", str(ids[1]), "--by", "李四", "--db", str(db))
        jsonl.rename(tmp_path / "incidents.jsonl.1")  # logrotate, while syslog is down
        agent.open_ports(8013, 8014, 8002)  # two new incidents; 8002 is resolved: a new one again
        agent.open_ports(8003)  # matched again: count 2
        wait_for(lambda: len(db_incidents(db)) == 16, what="the new incidents")
        wait_for(
            lambda: siem_status(db)["syslog"]["state"] == "failing", what="the syslog destination failing"
        )
        code, status = siem_status_cli(db)
        assert (
            code == 1
            and status["syslog"]["state"] == "failing"
            and status["syslog"]["backlog"] > 0
            and status["syslog"]["last_error"]
        )
        assert status["jsonl"]["state"] == "ok"

        second = Receiver(first.port)  # the same port again
        receivers.append(second)
        expected = current_states(db)
        wait_for(
            lambda: expected <= delivered_states(second.incidents()), what="every incident's latest state"
        )
        assert not first.errors and not second.errors
        sent = first.incidents() + second.incidents()
        states = delivered_states(sent)
        assert (ids[0], "acknowledged", 1) in states and (ids[1], "resolved", 1) in states
        assert {int(m["id"]) for m in sent} == set(db_incidents(db))
        raised = next(m for m in second.messages if m["sd"]["zonewatch@32473"]["id"] == str(ids[2]))
        assert raised["severity"] == 3 and raised["facility"] == 16 and raised["app"] == "zonewatch"
        sd = raised["sd"]["zonewatch@32473"]
        assert (
            sd["department"] == "市教育局" and sd["host"] == "host-siem-agent-1" and sd["severity"] == "high"
        )
        assert sd["key.local_port"] == "8003" and raised["msg"].startswith("New listening service")
        acked = [m for m in second.messages if m["msgid"] == "acknowledge"]
        assert acked and "张三: 正在排查" in acked[-1]["msg"]

        wait_for(lambda: siem_status(db)["jsonl"]["backlog"] == 0, what="the JSON lines file")
        documents = jsonl_documents(tmp_path / "incidents.jsonl.1", jsonl)
        latest = {d["id"]: d for d in sorted(documents, key=lambda d: d["change_seq"])}
        assert set(latest) == set(db_incidents(db))
        for incident, document in latest.items():
            assert {k: v for k, v in document.items() if k not in EXPORT_KEYS} == show(db, incident)
        shown = run_cli(
            "zonewatch-collector", "incidents", "show", str(ids[0]), "--db", str(db), "--format", "json"
        )
        assert json.loads(shown.stdout) == show(db, ids[0])
        output = run_cli("zonewatch-collector", "siem", "export", "--jsonl", "-", "--db", str(db)).stdout
        exported = [json.loads(line) for line in output.splitlines()]
        assert {d["id"]: d for d in exported} == latest

        wait_for(lambda: siem_status(db)["syslog"]["backlog"] == 0, what="backlog 0")
        code, before = siem_status_cli(db)
        assert code == 0 and before["syslog"]["state"] == "ok" and before["jsonl"]["backlog"] == 0
    finally:
        collector.stop()
    lines, messages = len(jsonl_documents(jsonl)), len(second.messages)

    collector = Collector(db, 0, *args)  # the cursors survive: nothing is sent again
    try:
        time.sleep(2.0)  # two of the exporter's polls
        assert len(second.messages) == messages and len(jsonl_documents(jsonl)) == lines
        run_cli(*cli, "comment", str(ids[3]), "--by", "王五", "--comment", "已通知", "--db", str(db))
        new = wait_for(lambda: second.messages[messages:], what="the comment")
        assert {(m["msgid"], m["sd"]["zonewatch@32473"]["id"]) for m in new} == {("comment", str(ids[3]))}
        after = siem_status(db)
        assert after["syslog"]["change_seq"] > before["syslog"]["change_seq"]
    finally:
        collector.stop()


# --- TLS (RFC 5425) --------------------------------------------------------------------------------


def test_tls_receiver_gets_incidents_and_siem_test_checks_its_certificate(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    ca_file, server_context = make_pki(tmp_path, "siem")
    other_ca, _ = make_pki(tmp_path, "other")
    receiver = Receiver(tls=server_context)
    receivers.append(receiver)
    url = f"tls://127.0.0.1:{receiver.port}"

    result = run_cli("zonewatch-collector", "siem", "test", "--syslog", url, "--ca", str(ca_file))
    assert "test message delivered" in result.stdout and "acknowledged" in result.stdout
    (test,) = wait_for(lambda: receiver.messages, what="the test message")
    assert (
        test["msgid"] == "test" and test["severity"] == 5 and test["sd"]["zonewatch@32473"] == {"test": "1"}
    )
    refused = run_cli(
        "zonewatch-collector", "siem", "test", "--syslog", url, "--ca", str(other_ca), check=False
    )
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "certificate verify failed" in refused.stderr and "Traceback" not in refused.stderr

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "siem_new_listener.yml").write_text(LISTENER_RULE, encoding="utf-8")
    siem = ("--siem-syslog", url, "--siem-ca", str(ca_file), "--siem-facility", "authpriv")
    collector = Collector(tmp_path / "c.db", 0, "--rules", str(rules), "--detection-interval", "0.2", *siem)
    try:
        Agent(collector).open_ports(9001, 9002)
        wait_for(lambda: len(receiver.incidents()) >= 2, what="incidents over TLS")
        assert {m["facility"] for m in receiver.messages[1:]} == {10}
        assert not receiver.errors
    finally:
        collector.stop()


# --- the pieces, without a collector ----------------------------------------------------------------


def change(**overrides: Any) -> ExportedChange:
    document: dict[str, Any] = {
        "id": 42, "rule": "port_scan_vertical", "rule_id": "5b0c", "rule_title": "Vertical port scan",
        "title": "端口扫描 10.0.0.9 → web-01", "severity": "critical", "status": "acknowledged",
        "dedup_key": "k", "dedup_fields": {"peer_addr": "10.0.0.9", "agent_id": "a]b\"c\\d"},
        "agent_id": "a1" * 16, "hostname": "web-01", "department": "市公安局", "county": "高新区",
        "site": "", "role": "server", "first_seen_ms": 1_795_824_000_000, "last_seen_ms": 1_795_824_001_234,
        "matches": 3, "updated_ms": 1_795_824_002_005, "evidence": {"events": []},
        "actions": [{"id": 1, "incident": 42, "action": "acknowledge", "actor": "张三", "comment": "正在排查",
                     "from_status": "open", "to_status": "acknowledged", "time_ms": 1_795_824_002_005,
                     "prev_hash": "0" * 64, "hash": "f" * 64}],
    }  # fmt: skip
    document.update(overrides)
    return ExportedChange(7, "acknowledge", document)


@pytest.mark.parametrize(
    ("severity", "expected"), [("critical", 2), ("high", 3), ("medium", 4), ("low", 5), ("informational", 6)]
)
def test_syslog_message_follows_rfc_5424(severity: str, expected: int) -> None:
    data = syslog_incident(change(severity=severity), hostname="采集器", facility=16, sd_id="zonewatch@32473")
    message = parse_syslog(data)
    assert (message["facility"], message["severity"], message["version"]) == (16, expected, 1)
    assert message["timestamp"] == "2026-11-28T00:00:02.005Z" and message["msgid"] == "acknowledge"
    assert message["hostname"] == "xn--m7rp59kwed"  # IDNA: HOSTNAME is ASCII
    sd = message["sd"]["zonewatch@32473"]
    assert sd["key.agent_id"] == 'a]b"c\\d' and sd["department"] == "市公安局" and "site" not in sd
    assert sd["firstSeen"] == "2026-11-28T00:00:00.000Z" and sd["actor"] == "张三" and sd["changeSeq"] == "7"
    assert message["msg"] == (
        f"端口扫描 10.0.0.9 → web-01 | incident 42 {severity} acknowledged, 3 matches, "
        "web-01 (市公安局 高新区) | acknowledge by 张三: 正在排查"
    )


def test_a_long_message_cuts_the_msg_and_never_the_structured_data() -> None:
    keys = {"a name=": "x", **{f"f{i}": "]" * 300 for i in range(10)}}
    long = change(title="扫" * 5000, department="部" * 400, dedup_fields=keys)
    data = syslog_incident(long, hostname="c", facility=16, sd_id="zonewatch@32473")
    assert len(data) <= MAX_MESSAGE_BYTES
    message = parse_syslog(data)  # every escape whole, every value valid UTF-8
    assert message["msg"].startswith("扫扫") and message["msg"].endswith("…")
    sd = message["sd"]["zonewatch@32473"]
    assert sd["department"].endswith("…") and len(sd["department"].encode()) <= 256
    assert len([k for k in sd if k.startswith("key.")]) == 6 and sd["status"] == "acknowledged"
    assert sd["key.a_name_"] == "x"  # SD-NAME: no space, no "="
    assert frame(data) == str(len(data)).encode() + b" " + data


def test_bad_destinations_are_one_readable_error() -> None:
    for url in ("udp://10.0.0.1:514", "tcp://", "tls://h:99999", "tcp://h:514/path"):
        with pytest.raises(SiemError, match="syslog URL"):
            parse_syslog_url(url)
    assert parse_syslog_url("tls://[fd00::5]").url == "tls://[fd00::5]:6514"
    with pytest.raises(SiemError, match="SD-ID"):
        parse_sd_id("zonewatch")
    with pytest.raises(SiemError, match="facility"):
        parse_facility("local9")
    assert parse_facility("AUTHPRIV") == 10 and parse_facility("23") == 23
    result = run_cli(
        "zonewatch-collector", "serve", "--siem-syslog", "udp://x:514", "--insecure", check=False
    )
    (line,) = result.stderr.strip().splitlines()  # serve's error is one log line (text or JSON)
    assert result.returncode == 2 and "malformed syslog URL 'udp://x:514': use tcp://HOST:PORT" in line


def test_a_receiver_that_stops_reading_is_not_delivered_to(receivers: list[Receiver]) -> None:
    receiver = Receiver(stall_after=1)
    receivers.append(receiver)
    client = SyslogClient(SyslogTarget("tcp", "127.0.0.1", receiver.port), timeout_s=1.0)
    message = syslog_test(hostname="c", facility=16, sd_id="zonewatch@32473", time_ms=now_ms())
    with pytest.raises(DeliveryError, match="not acknowledged within 1 s"):
        client.send([frame(message)] * 40)
    assert len(receiver.messages) >= 1 and not client.connected
    client.close()


def test_the_jsonl_file_is_fsynced_reopened_after_rotation_and_a_torn_line_stays_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"torn": tr')  # a crash in the middle of a line
    sink = JsonLinesFile(path)
    sink.write([json_line(change(), hostname="c")])
    path.rename(tmp_path / "out.jsonl.1")
    sink.write([json_line(change(id=43), hostname="c")])
    sink.close()
    assert (tmp_path / "out.jsonl.1").read_bytes().splitlines()[0] == b'{"torn": tr'
    assert json.loads((tmp_path / "out.jsonl.1").read_bytes().splitlines()[1])["id"] == 42
    (line,) = path.read_text(encoding="utf-8").splitlines()
    document = json.loads(line)
    assert (
        document["id"] == 43 and document["schema"] == "zonewatch.incident/1" and document["change_seq"] == 7
    )
    assert document["time"] == "2026-11-28T00:00:02.005Z" and path.stat().st_mode & 0o777 == 0o600

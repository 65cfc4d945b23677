"""Tiers, the upward path: a lower collector forwards its incidents (and migration states and rollups)
to its upstream over the agents' Report stream; the upstream refuses tier facts from anything but a
collector, checks them, stores them by tier, and answers `tiers ...` grouped by tier.

Real parts throughout: collectors in subprocesses on 127.0.0.1, mTLS between the tiers, the CLI.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Collector, Stream, cli_json, now_ms, run_cli

from agent.credentials import load_credentials
from agent.wire import batch_request, hello_request
from collector import pki
from collector.config import default_pki_dir
from collector.errors import CollectorError
from collector.store.database import open_database
from collector.store.incidents import Raise, raise_incidents
from collector.store.tiers import IncidentChange, MigrationChange, Rollup, change_head, store_tier_rows
from collector.store.tiers_view import list_tiers, tier_incidents, tier_traffic
from collector.tiers_policy import policy_dir, store_upstream_policy, upstream_catalog_path
from collector.upstream.forwarder import Forwarder, ForwarderConfig
from collector.upstream.state import default_state_dir
from collector.upstream.wire import incident_fact, migration_fact, rollup_fact
from protos.zonewatch.v1 import agent_pb2, facts_pb2

PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def tier_incident(**changes: Any) -> facts_pb2.Fact:
    t = now_ms()
    fields: dict[str, Any] = {
        "origin": "",
        "incident_id": 7,
        "rule_id": "zonewatch.sequence_gap",
        "title": "批次缺失",
        "severity": "medium",
        "status": "open",
        "agent_id": "a1",
        "hostname": "ws-01",
        "department": "市公安局",
        "county": "城关区",
        "first_seen_ms": t - 1000,
        "last_seen_ms": t,
        "count": 1,
        "updated_ms": t,
        "detail_json": json.dumps({"title": "批次缺失"}, ensure_ascii=False),
    }
    fields.update(changes)
    return facts_pb2.Fact(time_ms=t, tier_incident=facts_pb2.TierIncident(**fields))


def open_stream(target: str, agent_id: str, hostname: str, role: str) -> Stream:
    hello = hello_request(agent_id, hostname, "test", {"role": role}, "", now_ms()).SerializeToString()
    return Stream(target, agent_id, hello)


def send(stream: Stream, seq: int, *facts: facts_pb2.Fact) -> Any:
    t = now_ms()
    return stream.send(batch_request(seq, t, t, [], extra=list(facts)).SerializeToString())


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


# --- the upstream side: who may send, what is checked, how it is kept ---------------------------


def test_tier_facts_from_an_agent_are_refused_and_from_a_collector_stored(collector: Collector) -> None:
    agent = open_stream(collector.target, "agent-1", "web-01", "server")
    try:
        refused = send(agent, 1, tier_incident())
        assert refused.WhichOneof("body") == "rejection"
        assert refused.rejection.code == PERMISSION_DENIED
        assert "collector" in refused.rejection.message
    finally:
        agent.close()
    # A client without a certificate (--insecure) claiming the role in its hello is no collector.
    claimed = open_stream(collector.target, "county-1", "城关区", "collector")
    try:
        refused = send(claimed, 1, tier_incident())
        assert refused.WhichOneof("body") == "rejection"
        assert refused.rejection.code == PERMISSION_DENIED
        assert "not enrolled" in refused.rejection.message
    finally:
        claimed.close()
    assert not rows(collector.db, "SELECT * FROM tier_incidents")


BAD_FACTS = [
    ({"severity": "urgent"}, "severity"),
    ({"status": "closed"}, "status"),
    ({"detail_json": "[1, 2]"}, "detail_json"),
    ({"detail_json": json.dumps({"x": "证" * 40_000}, ensure_ascii=False)}, "detail_json"),
    ({"origin": "市局//城关区"}, "origin"),
    ({"title": "bad\x07bell"}, "title"),
    ({"first_seen_ms": 10}, "first_seen_ms"),
    ({"incident_id": 0}, "incident_id"),
]


def test_bad_tier_facts_are_rejected_naming_the_field(collector: Collector) -> None:
    county = open_stream(collector.target, "county-1", "城关区", "collector")
    try:
        # A rejected batch does not end the stream: one stream carries every bad fact in turn.
        for seq, (changes, field) in enumerate(BAD_FACTS, start=1):
            answer = send(county, seq, tier_incident(**changes))
            assert answer.WhichOneof("body") == "rejection", field
            assert answer.rejection.code == INVALID_ARGUMENT
            assert answer.rejection.field == f"batch.facts[0].tier_incident.{field}"
    finally:
        county.close()
    assert not rows(collector.db, "SELECT * FROM tier_incidents")


def test_upserts_keep_the_newest_and_the_view_groups_by_tier(db: sqlite3.Connection) -> None:
    t = now_ms()
    base = (
        "incident",
        "",
        7,
        "r1",
        "端口扫描",
        "high",
        "open",
        "a1",
        "ws-01",
        "市公安局",
        "城关区",
        t - 10,
        t,
        1,
        t,
        "{}",
    )
    db.execute(
        "INSERT INTO agents (agent_id, hostname, role, first_seen_ms, last_seen_ms)"
        " VALUES ('c', '市局', 'collector', 0, 0)"
    )
    store_tier_rows(db, 1, "市局", [base], t)
    newer = (*base[:6], "acknowledged", *base[7:13], 4, t + 5, "{}")
    store_tier_rows(db, 1, "市局", [newer], t + 1)
    store_tier_rows(db, 1, "市局", [base], t + 2)  # an older copy (another path) does not win
    (incident,) = tier_incidents(db, status="all")
    assert (incident.tier, incident.status, incident.matches) == ("市局", "acknowledged", 4)
    migration = (
        "migration",
        "城关区",
        "a2",
        "ws-02",
        "市公安局",
        "城关区",
        "公安专网",
        "dual_homed",
        t,
        "java",
        t,
    )
    rollup = (
        "rollup",
        "城关区",
        "省政务外网",
        "vertical",
        t - t % 3_600_000,
        10,
        20,
        8_000_000,
        10_000_000,
        3,
    )
    store_tier_rows(db, 1, "市局", [migration, rollup], t)
    summary = {row.tier: row for row in list_tiers(db, t + 1000)}
    assert set(summary) == {"(local)", "市局", "市局/城关区"}
    assert summary["市局"].high == 1  # acknowledged is still active
    assert tier_incidents(db, tier="市局", severity="high")[0].incident_id == 7
    assert summary["市局/城关区"].hosts == 1 and summary["市局/城关区"].peak_utilization == 0.8
    assert summary["市局/城关区"].peak_zone == "省政务外网"


# --- the whole path: a county forwards to its city over mTLS, the city goes away and comes back -----


def create_token(db: Path) -> str:
    out = run_cli("zonewatch-collector", "tokens", "create", "--db", str(db), "--role", "collector").stdout
    (line,) = [line for line in out.splitlines() if line.startswith("token ")]
    return line.split(": ", 1)[1].strip()


def raise_gap(target: str, agent_id: str, first_seq: int) -> None:
    """A real incident at the county: an agent whose batches skip some numbers (a sequence gap)."""
    stream = Stream(target, agent_id)
    try:
        assert stream.batch(first_seq).WhichOneof("body") == "ack"
        assert stream.batch(first_seq + 3).WhichOneof("body") == "ack"
    finally:
        stream.close()


def test_county_incidents_reach_the_city_and_survive_its_outage(tmp_path: Path) -> None:
    city_db, county_db = tmp_path / "city" / "city.db", tmp_path / "county" / "county.db"
    city_db.parent.mkdir()
    county_db.parent.mkdir()
    run_cli("zonewatch-collector", "init", "--db", str(city_db))
    city = Collector(city_db, 0, tls=True)
    county: Collector | None = None
    try:
        run_cli(
            "zonewatch-collector", "tiers", "enroll", "--db", str(county_db), "--upstream", city.target,
            "--token", create_token(city_db), "--ca", str(default_pki_dir(city_db) / "ca.crt"),
            "--name", "城关区", "--enroll-port", str(city.enroll_port),
        )  # fmt: skip
        # A token made for an agent gives a role the city would refuse tier facts from: said at once.
        server_token = run_cli(
            "zonewatch-collector", "tokens", "create", "--db", str(city_db), "--role", "server"
        )
        (line,) = [line for line in server_token.stdout.splitlines() if line.startswith("token ")]
        wrong = run_cli(
            "zonewatch-collector", "tiers", "enroll", "--db", str(county_db),
            "--state", str(tmp_path / "other"), "--upstream", city.target, "--token", line.split(": ", 1)[1],
            "--ca", str(default_pki_dir(city_db) / "ca.crt"), "--name", "东县",
            "--enroll-port", str(city.enroll_port), check=False,
        )  # fmt: skip
        assert wrong.returncode == 2 and "--role collector" in wrong.stderr
        county = Collector(county_db, 0, "--upstream", city.target, "--upstream-interval", "0.3")
        raise_gap(county.target, "agent-a", 1)

        def arrived(count: int) -> bool:
            found = rows(city_db, "SELECT tier, title FROM tier_incidents") if city_db.exists() else []
            return len(found) >= count

        wait_until(lambda: arrived(1), 30, "the county's incident at the city")
        (listed,) = cli_json("zonewatch-collector", "tiers", "incidents", "--db", str(city_db))
        assert listed["tier"] == "城关区" and listed["severity"] == "medium"
        tiers = {r["tier"]: r for r in cli_json("zonewatch-collector", "tiers", "list", "--db", str(city_db))}
        assert tiers["城关区"]["medium"] == 1
        status = json.loads(
            run_cli(
                "zonewatch-collector", "tiers", "status", "--db", str(county_db), "--format", "json"
            ).stdout
        )
        assert status["name"] == "城关区" and status["running"] and status["upstream"] == city.target

        # The city goes away; the county keeps judging and spools what it would send.
        port = city.port
        city.stop()
        raise_gap(county.target, "agent-b", 1)
        raise_gap(county.target, "agent-a", 10)  # the first incident again: its count grows

        def spooled() -> bool:
            out = run_cli(
                "zonewatch-collector", "tiers", "status", "--db", str(county_db), "--format", "json"
            )
            state = json.loads(out.stdout)
            return bool(state["backlog_batches"] >= 1 and not state["connected"])

        wait_until(spooled, 30, "the county to spool while the city is down")
        city = Collector(city_db, port, tls=True)
        wait_until(lambda: arrived(2), 40, "the backlog at the city after its restart")
        found = cli_json("zonewatch-collector", "tiers", "incidents", "--db", str(city_db), "--status", "all")
        assert {r["tier"] for r in found} == {"城关区"}

        def same() -> bool:
            local = rows(county_db, "SELECT id, count, status, severity FROM incidents ORDER BY id")
            upstream = rows(
                city_db, "SELECT incident_id, count, status, severity FROM tier_incidents ORDER BY 1"
            )
            return bool(local) and upstream == local

        # Every incident once, as the county sees it now (counts grown while the city was away).
        wait_until(same, 30, "the city's copy to match the county's incidents")
        assert len(rows(county_db, "SELECT id FROM incidents")) >= 2
        # Nothing lost, nothing refused: the county's batches 1..N are each stored at the city, no gaps.
        (county_key,) = rows(city_db, "SELECT id FROM agents WHERE role = 'collector'")[0]
        stored = rows(
            city_db,
            f"SELECT count(*), max(seq) FROM batches WHERE agent = {county_key} AND status = 'stored'",
        )
        assert stored[0][0] == stored[0][1] >= 3
        assert rows(city_db, f"SELECT * FROM sequence_gaps WHERE agent = {county_key}") == []
    finally:
        if county is not None:
            county.stop()
        city.stop()


def test_operator_mistakes_are_one_line(tmp_path: Path) -> None:
    db = tmp_path / "county.db"
    bad = run_cli("zonewatch-collector", "serve", "--db", str(db), "--upstream", "no-port", check=False)
    assert bad.returncode == 2 and "--upstream" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("zonewatch-collector", "tiers", "status", "--db", str(db), check=False)
    assert missing.returncode == 2 and "tiers enroll" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n", encoding="utf-8")
    wrong = run_cli(
        "zonewatch-collector", "tiers", "enroll", "--db", str(db), "--upstream", "127.0.0.1:9",
        "--token", "t", "--ca", str(ca), "--name", "a/b", check=False,
    )  # fmt: skip
    assert wrong.returncode == 2 and "PEM certificate" in wrong.stderr


# --- what a lower tier sends: its own name, facts the upstream takes, never more than its spool holds ---


def enroll_county(city: Collector, county_db: Path, name: str, state: Path, check: bool = True) -> Any:
    return run_cli(
        "zonewatch-collector", "tiers", "enroll", "--db", str(county_db), "--state", str(state),
        "--upstream", city.target, "--token", create_token(city.db),
        "--ca", str(default_pki_dir(city.db) / "ca.crt"), "--name", name,
        "--enroll-port", str(city.enroll_port), check=check,
    )  # fmt: skip


def mtls_stream(city: Collector, state: Path, hostname: str) -> Stream:
    credentials = load_credentials(state)
    tls = credentials.tls
    channel = grpc.secure_channel(
        city.target,
        grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem),
        [("grpc.ssl_target_name_override", pki.SERVER_NAME)],
    )
    hello = hello_request(credentials.agent_id, hostname, "test", {"role": "collector"}, "", now_ms())
    return Stream(city.target, credentials.agent_id, hello.SerializeToString(), channel=channel)


def test_an_enrolled_collector_sends_under_its_own_name_and_nothing_it_sends_is_refused(
    tmp_path: Path,
) -> None:
    city_db, county_db = tmp_path / "city" / "city.db", tmp_path / "county" / "county.db"
    city_db.parent.mkdir()
    county_db.parent.mkdir()
    run_cli("zonewatch-collector", "init", "--db", str(city_db))
    city = Collector(city_db, 0, tls=True)
    try:
        state = default_state_dir(county_db)
        enroll_county(city, county_db, "城关区", state)
        # Another collector may not take the name: the two would overwrite each other's rows.
        second = enroll_county(city, county_db, "城关区", tmp_path / "other", check=False)
        assert second.returncode == 2 and "already enrolled" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        # The hello says another name: the tier's name was fixed at enrollment.
        county = mtls_stream(city, state, "改名")
        try:
            t = now_ms()
            # What the builders make of text the upstream's checks would refuse: a tab and an NBSP
            # (not printable), an over-long hostname, a relayed origin with a padded name.
            change = IncidentChange(
                1, "新村镇 /东街", 5, "r\t1", "端口\t扫描\xa0告警", "high", "open", "a" * 200, "h" * 300,
                "市公安局\n", "城关区", t - 10, t, 2, t, json.dumps({"k": "v"}),
            )  # fmt: skip
            migration = MigrationChange(
                2, "", "a2", "ws\x00", "d", "c", "公安专网", "dual_homed", t, "x" * 600, t
            )
            rollup = Rollup("", "省政务外网\t", "vertical", t - t % 3_600_000, 2**63 - 1, 1, 8, 10, 3)
            facts = [incident_fact(change, t), migration_fact(migration, t), rollup_fact(rollup, t)]
            assert send(county, 1, tier_incident(), *facts).WhichOneof("body") == "ack"
            assert (
                send(
                    county, 2, rollup_fact(rollup._replace(hour_ms=rollup.hour_ms - 3_600_000), t)
                ).WhichOneof("body")
                == "ack"
            )
        finally:
            county.close()
        incidents = rows(
            city_db, "SELECT tier, rule_id, title, hostname, department FROM tier_incidents ORDER BY 1"
        )
        assert incidents == [
            ("城关区", "zonewatch.sequence_gap", "批次缺失", "ws-01", "市公安局"),
            ("城关区/新村镇/东街", "r 1", "端口 扫描 告警", "h" * 253, "市公安局 "),
        ]
        assert rows(city_db, "SELECT tier, hostname, length(blocker) FROM tier_migrations") == [
            ("城关区", "ws ", 512)
        ]
        # Two hours of one zone near 2**63 bytes each: the sum is shown, not an integer overflow.
        con = open_database(city_db, readonly=True)
        try:
            (summed,) = tier_traffic(con, since_ms=t - 2 * 3_600_000, until_ms=t + 3_600_000)
        finally:
            con.close()
        assert summed.zone == "省政务外网 " and summed.hours == 2 and summed.rx_bytes >= 2**64 - 2
        shown = run_cli("zonewatch-collector", "tiers", "traffic", "--db", str(city_db))
        assert "Traceback" not in shown.stderr
        assert rows(city_db, "SELECT count(*) FROM batches WHERE status = 'stored'") == [(2,)]
    finally:
        city.stop()
    spool_backpressure(county_db, state)


def spool_backpressure(county_db: Path, state: Path) -> None:
    """With the upstream away, a full spool stops the reading; nothing is ever evicted or lost."""
    t = now_ms()
    con = open_database(county_db)
    try:
        raise_incidents(
            con,
            [
                Raise("zonewatch.test", f"k{i}", None, "low", f"事件 {i}", {"pad": "证" * 300}, t)
                for i in range(60)
            ],
        )
        head = change_head(con)
    finally:
        con.close()
    config = ForwarderConfig(state, upstream="127.0.0.1:9", read_max_rows=50, spool_max_bytes=16_000)
    forwarder = Forwarder(config, county_db)
    db = open_database(county_db, readonly=True)
    sent: set[int] = set()
    try:

        def drain() -> None:
            for batch in forwarder.spool.pending(limit=1000):
                request = agent_pb2.ReportRequest.FromString(batch.payload)
                sent.update(
                    f.tier_incident.incident_id for f in request.batch.facts if f.tier_incident.incident_id
                )
                forwarder.spool.acknowledge(batch.seq)

        for _ in range(20):  # far more than fit: the spool fills, then the reading waits
            forwarder.cycle(db)
        stalled = forwarder.cursors.incidents
        assert 0 < stalled < head
        assert forwarder.spool.stats().bytes <= config.spool_max_bytes
        for _ in range(40):  # the upstream comes back: each ack makes room for the next reads
            drain()
            forwarder.cycle(db)
        drain()
        assert forwarder.spool.take_drop_report() is None
        assert sent == set(range(1, 61))
        asyncio.run(loops_survive(forwarder))
    finally:
        db.close()
        forwarder.spool.close()


async def loops_survive(forwarder: Forwarder) -> None:
    """An unforeseen exception in a cycle or a policy fetch is logged; the loops carry on."""
    calls: list[str] = []
    stop = asyncio.Event()

    def cycle(db: Any) -> tuple[int, bool]:
        calls.append("cycle")
        if len(calls) == 1:
            raise ValueError("cursors.json: not JSON")
        stop.set()
        return 0, True

    async def fetch_policy() -> bool:
        calls.append("policy")
        if calls.count("policy") == 1:
            raise OSError(28, "No space left on device")
        return False

    forwarder.cycle = cycle  # type: ignore[method-assign]
    forwarder.fetch_policy = fetch_policy  # type: ignore[method-assign]
    forwarder.config = replace(forwarder.config, interval_s=0.05)
    await asyncio.wait_for(forwarder._collect_loop(None, stop), 10)  # type: ignore[arg-type]
    assert calls == ["cycle", "cycle"]
    policy = asyncio.create_task(forwarder._policy_loop())
    try:
        for _ in range(100):
            if calls.count("policy") >= 2:
                break
            forwarder.transport.policy_changed.set()  # what an announced new version does
            await asyncio.sleep(0.05)
        assert calls.count("policy") == 2 and not policy.done()
    finally:
        policy.cancel()


def test_a_policy_that_cannot_be_stored_is_one_collector_error(tmp_path: Path) -> None:
    catalog = upstream_catalog_path(policy_dir(tmp_path))
    (catalog / "in-the-way").mkdir(parents=True)  # a directory where the catalog goes: rename fails
    with pytest.raises(CollectorError, match="cannot store the upstream policy"):
        store_upstream_policy(
            tmp_path, [], "zones:\n  - name: 运维区\n    kind: local\n    cidrs: [10.40.0.0/16]\n"
        )

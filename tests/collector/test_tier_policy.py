"""Tiers, the downward path: the upstream's rule pack and zone catalog come down to a lower collector.

A real upstream collector (TLS, in a subprocess) serves a client enrolled with role "collector" its rule
pack and catalog, and an agent nothing more than before; the lower collector (in this process, as the
forwarder drives it) stores them, merges them with its own files, refuses every local attempt to replace
an upstream rule or zone, and keeps what came down across a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Collector, Stream, now_ms, run_cli, sample

from agent import enroll_keys
from agent.wire import hello_request
from collector import pki
from collector.config import CollectorConfig
from collector.detection import Detector
from collector.model import DetectionConfig, HostLabels
from collector.policy import AgentPolicy, PolicySource
from collector.server import Collector as RunningCollector
from collector.server import create_server
from collector.store import enrollment
from collector.store.database import open_database
from collector.tiers_pack import RulePack, catalog_yaml
from collector.tiers_policy import (
    TierConflict,
    load_tiered_rules,
    merge_catalogs,
    policy_dir,
    store_upstream_policy,
    upstream_catalog_path,
    upstream_rules_dir,
)
from collector.zones import parse_catalog
from protos.zonewatch.v1 import agent_pb2

ENROLL = "/zonewatch.v1.AgentService/Enroll"
POLICY = "/zonewatch.v1.AgentService/GetPolicy"
NAME = ("grpc.ssl_target_name_override", pki.SERVER_NAME)

UPSTREAM_ZONES = """\
zones:
  - name: 省电子政务外网（纵向）
    kind: extranet
    direction: vertical
    cidrs: [10.0.0.0/12]
    capacity: 1G
  - name: 运维区
    kind: local
    admin: true
    cidrs: [10.40.0.0/16]
  - name: 涉密网
    kind: classified
    cidrs: [10.99.0.0/16]
access:
  "*": [extranet, 运维区]
"""

LOCAL_ZONES = """\
zones:
  # Redefines an upstream zone: refused, the upstream's stays.
  - name: 运维区
    kind: internet
    cidrs: [10.41.0.0/16]
  # A county's own network, more specific than the upstream's extranet: an addition.
  - name: 城关区政务网
    kind: extranet
    direction: horizontal
    cidrs: [10.1.2.0/24]
access:
  server: [城关区政务网, 运维区]
"""


def interface_rule(name: str, interface: str, rule_id: str | None = None) -> str:
    """A rule raised by any interface sample of ``interface``: easy to trigger over a real stream."""
    return f"""\
title: Test interface {interface}
id: {rule_id or uuid.uuid4()}
name: {name}
level: high
logsource: {{product: zonewatch, category: interface}}
detection:
  selection:
    interface: {interface}
  condition: selection
samples:
  match:
    - {{category: interface, interface: {interface}}}
  no_match:
    - {{category: interface, interface: lo}}
"""


UPSTREAM_ONLY_ID = "3f0e9c4e-1111-4a8b-9e2a-5d1f0c7a0001"
COPIED_ID = "3f0e9c4e-2222-4a8b-9e2a-5d1f0c7a0002"


# --- a real upstream, and clients enrolled with a role ----------------------------------------------


class Client:
    """A key and certificate enrolled at the upstream, as an agent or a lower tier makes them."""

    def __init__(self, directory: Path, hostname: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        key = enroll_keys.create_key(directory / "client.key")
        self.key_pem = (directory / "client.key").read_bytes()
        self.agent_id = enroll_keys.agent_id_of(key.public_key())
        self.csr = enroll_keys.make_csr(key, hostname)
        self.hostname = hostname
        self.cert_pem = b""


def token(db: Path, role: str) -> str:
    text = pki.new_token()
    con = open_database(db)
    try:
        labels = HostLabels(department="市政务服务数据管理局", county="城关区", site="", role=role)
        enrollment.create_token(
            con, pki.token_hash(text), labels, now_ms=now_ms(), expires_ms=now_ms() + 3_600_000, uses=1
        )
    finally:
        con.close()
    return text


def ca_pem(upstream: Collector) -> bytes:
    return (upstream.db.parent / "pki" / "ca.crt").read_bytes()


def enroll(upstream: Collector, client: Client, role: str) -> None:
    target = f"127.0.0.1:{upstream.enroll_port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem(upstream)), [NAME]) as channel:
        call = channel.unary_unary(
            ENROLL,
            request_serializer=agent_pb2.EnrollRequest.SerializeToString,
            response_deserializer=agent_pb2.EnrollResponse.FromString,
        )
        request = agent_pb2.EnrollRequest(
            token=token(upstream.db, role), csr_pem=client.csr, hostname=client.hostname
        )
        client.cert_pem = call(request, timeout=10).certificate_pem


def mtls(upstream: Collector, client: Client) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca_pem(upstream), client.key_pem, client.cert_pem)
    return grpc.secure_channel(upstream.target, credentials, [NAME])


def get_policy(upstream: Collector, client: Client, current: str = "") -> agent_pb2.GetPolicyResponse:
    with mtls(upstream, client) as channel:
        call = channel.unary_unary(
            POLICY,
            request_serializer=agent_pb2.GetPolicyRequest.SerializeToString,
            response_deserializer=agent_pb2.GetPolicyResponse.FromString,
        )
        request = agent_pb2.GetPolicyRequest(agent_id=client.agent_id, current_version=current)
        reply: agent_pb2.GetPolicyResponse = call(request, timeout=10)
        return reply


def welcome_version(upstream: Collector, client: Client) -> str:
    hello = hello_request(client.agent_id, client.hostname, "test", {}, "", now_ms()).SerializeToString()
    stream = Stream(upstream.target, client.agent_id, hello, channel=mtls(upstream, client))
    try:
        assert stream.welcome.WhichOneof("body") == "welcome", stream.welcome
        return stream.welcome.welcome.policy_version
    finally:
        stream.close()


def wait_for_new_version(upstream: Collector, client: Client, old: str) -> agent_pb2.GetPolicyResponse:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        reply = get_policy(upstream, client, old)
        if not reply.unchanged:
            return reply
        time.sleep(0.3)
    raise AssertionError("the upstream's policy version did not change with its rules")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Collector]:
    root = tmp_path / "province"
    rules = root / "rules"
    rules.mkdir(parents=True)
    (rules / "upstream_only.yml").write_text(interface_rule("upstream_only", "eth9", UPSTREAM_ONLY_ID))
    (rules / "copied.yml").write_text(interface_rule("copied", "eth7", COPIED_ID))
    (root / "zones.yaml").write_text(UPSTREAM_ZONES, encoding="utf-8")
    db = root / "province.db"
    run_cli("zonewatch-collector", "init", "--db", str(db))
    collector = Collector(db, 0, "--rules", str(rules), "--zones", str(root / "zones.yaml"), tls=True)
    yield collector
    collector.stop()


def pack(reply: agent_pb2.GetPolicyResponse) -> list[tuple[str, str]]:
    return [(f.name, f.text) for f in reply.policy.rule_pack]


# --- the upstream side ------------------------------------------------------------------------------


def test_a_lower_tier_gets_the_rule_pack_and_catalog_and_an_agent_gets_what_it_always_got(
    tmp_path: Path, upstream: Collector
) -> None:
    city = Client(tmp_path / "city", "示例市")
    host = Client(tmp_path / "host", "web-01")
    enroll(upstream, city, "collector")
    enroll(upstream, host, "server")

    agent_reply = get_policy(upstream, host)
    assert not agent_reply.policy.rule_pack and agent_reply.policy.catalog_yaml == ""
    assert len(agent_reply.policy.zones) == 3
    tier_reply = get_policy(upstream, city)
    assert [name for name, _ in pack(tier_reply)] == ["copied.yml", "upstream_only.yml"]
    assert dict(pack(tier_reply))["upstream_only.yml"] == interface_rule(
        "upstream_only", "eth9", UPSTREAM_ONLY_ID
    )
    served = parse_catalog(tier_reply.policy.catalog_yaml)
    assert served.version == tier_reply.policy.zones_version == agent_reply.policy.zones_version
    assert served.by_name("运维区") is not None and served.access == {"*": ("extranet", "运维区")}
    # Each is told its own version, on GetPolicy and in the Welcome of its Report stream.
    assert tier_reply.version != agent_reply.version
    assert welcome_version(upstream, city) == tier_reply.version
    assert welcome_version(upstream, host) == agent_reply.version
    assert get_policy(upstream, city, tier_reply.version).unchanged

    # A rule removed upstream: a lower tier's version changes, an agent's does not.
    (upstream.db.parent / "rules" / "copied.yml").unlink()
    changed = wait_for_new_version(upstream, city, tier_reply.version)
    assert [name for name, _ in pack(changed)] == ["upstream_only.yml"]
    assert get_policy(upstream, host, agent_reply.version).unchanged


# --- the lower side: storing what came down -----------------------------------------------------------


def test_store_writes_only_plain_rule_files_that_load_and_removes_what_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    good = interface_rule("upstream_only", "eth9", UPSTREAM_ONLY_ID)
    files = [
        ("upstream_only.yml", good),
        ("../escape.yml", good),
        ("sub/dir.yml", good),
        (".hidden.yml", good),
        ("notes.txt", good),
    ]
    assert store_upstream_policy(state, files, UPSTREAM_ZONES)
    rules = upstream_rules_dir(policy_dir(state))
    assert sorted(p.name for p in rules.iterdir()) == ["upstream_only.yml"]
    assert not (tmp_path / "escape.yml").exists() and not (state / "policy" / "escape.yml").exists()
    assert "'../escape.yml' is not a plain file name" in caplog.text
    assert upstream_catalog_path(policy_dir(state)).read_text(encoding="utf-8") == UPSTREAM_ZONES
    assert not store_upstream_policy(state, files, UPSTREAM_ZONES)  # nothing changed

    # A broken file and a broken catalog keep their previous versions, on disk.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        changed = store_upstream_policy(state, [("upstream_only.yml", "title: [broken\n")], "zones: 3\n")
    assert not changed
    assert (rules / "upstream_only.yml").read_text() == good
    assert upstream_catalog_path(policy_dir(state)).read_text(encoding="utf-8") == UPSTREAM_ZONES
    assert "upstream_only.yml:1: invalid YAML" in caplog.text and "zone catalog refused" in caplog.text
    assert not list(rules.glob(".*.tmp"))

    # What the upstream no longer sends is removed; an empty catalog means it has none.
    assert store_upstream_policy(state, [], "")
    assert not list(rules.iterdir()) and not upstream_catalog_path(policy_dir(state)).exists()


def test_merged_catalog_keeps_every_upstream_zone_and_adds_only_what_replaces_none(tmp_path: Path) -> None:
    upstream = parse_catalog(UPSTREAM_ZONES)
    local = parse_catalog(
        LOCAL_ZONES.replace(
            "access:",
            """\
  - name: 抢占区
    kind: local
    cidrs: [10.0.0.0/12]
  - name: 涉密网内的办公网
    kind: local
    cidrs: [10.99.8.0/24]
  - name: 涉密网内的涉密机房
    kind: classified
    cidrs: [10.99.9.0/24]
access:""",
        ),
        "zones.yaml",
        known_zones=[z.name for z in upstream.zones],
    )
    merged, refused = merge_catalogs(upstream, local, "zones.yaml")
    # What a lower tier is sent loads back to the same catalog, Chinese names and all.
    again = parse_catalog(catalog_yaml(merged))
    assert again.version == merged.version and [z.name for z in again.zones] == [z.name for z in merged.zones]
    names = [z.name for z in merged.zones]
    assert names == ["省电子政务外网（纵向）", "运维区", "涉密网", "城关区政务网", "涉密网内的涉密机房"]
    assert merged.by_name("运维区").kind == "local"  # type: ignore[union-attr]
    assert merged.zone_of("10.1.2.3").name == "城关区政务网"  # type: ignore[union-attr]
    assert merged.zone_of("10.1.3.3").name == "省电子政务外网（纵向）"  # type: ignore[union-attr]
    assert merged.zone_of("10.99.8.1").kind == "classified"  # type: ignore[union-attr]
    assert len(refused) == 3
    assert refused[0].startswith("zones.yaml:3: zone '运维区' refused") and "redefine" in refused[0]
    assert "10.0.0.0/12 belongs to upstream zone '省电子政务外网（纵向）'" in refused[1]
    assert "inside upstream classified zone '涉密网'" in refused[2]
    # The local role's access stays within what the upstream allows every role.
    assert merged.access == {"*": ("extranet", "运维区"), "server": ("城关区政务网", "运维区")}
    wider = parse_catalog(
        "zones:\n  - {name: 县互联网, kind: internet, cidrs: [0.0.0.0/0]}\naccess:\n  server: [县互联网]\n"
    )
    merged, refused = merge_catalogs(upstream, wider, "zones.yaml")
    assert "server" not in merged.access and "beyond what the upstream allows" in refused[0]
    merged, refused = merge_catalogs(upstream, parse_catalog(UPSTREAM_ZONES.replace("涉密网", "x")), "z")
    assert "access for role '*' refused" in refused[-1]


def test_a_local_rule_never_replaces_an_upstream_rule(tmp_path: Path) -> None:
    upstream, local = tmp_path / "up", tmp_path / "local"
    upstream.mkdir()
    local.mkdir()
    (upstream / "upstream_only.yml").write_text(interface_rule("upstream_only", "eth9", UPSTREAM_ONLY_ID))
    (local / "same_id.yml").write_text(interface_rule("weaker", "eth8", UPSTREAM_ONLY_ID))
    (local / "same_name.yml").write_text(interface_rule("upstream_only", "eth8"))
    (local / "upstream_only.yml").write_text(interface_rule("other", "eth8"))
    (local / "county.yml").write_text(interface_rule("county", "eth6"))
    rules, errors = load_tiered_rules(local, upstream)
    assert [(r.name, r.path.parent.name) for r in rules] == [("upstream_only", "up"), ("county", "local")]
    assert all(isinstance(e, TierConflict) for e in errors) and len(errors) == 3
    by_file = {Path(e.path).name: e.message for e in errors}
    assert by_file["same_id.yml"].startswith(
        f"id {UPSTREAM_ONLY_ID} belongs to upstream rule 'upstream_only'"
    )
    assert by_file["same_name.yml"].startswith("name 'upstream_only' belongs to an upstream rule")
    assert by_file["upstream_only.yml"].startswith("an upstream rule file has this name")

    # What this tier sends its own lower tiers: the upstream's and its own additions, one namespace.
    served = RulePack(local, upstream, max_age_s=0)
    first = served.version("agents-v1")
    assert [name for name, _ in served.files] == ["county.yml", "upstream_only.yml"]
    assert served.version("agents-v2") != first  # the agents' policy is part of it
    county = dict(served.files)["county.yml"]
    # A local file that breaks keeps its previous text in the pack, as it stays in force.
    (local / "county.yml").write_text("title: [broken\n")
    assert served.version("agents-v1") == first and dict(served.files)["county.yml"] == county
    # An upstream rule added with a local rule's name takes its place, in the pack too.
    (upstream / "county_now_upstream.yml").write_text(interface_rule("county", "eth5"))
    served.refresh()
    assert [name for name, _ in served.files] == ["county_now_upstream.yml", "upstream_only.yml"]


def test_a_local_rule_in_force_gives_way_to_an_upstream_file_of_its_name(
    tmp_path: Path, db: sqlite3.Connection
) -> None:
    upstream, local = tmp_path / "up", tmp_path / "local"
    local.mkdir()
    (local / "county.yml").write_text(interface_rule("county", "eth6"))
    detector = Detector(db, DetectionConfig(str(local), upstream_rules_dir=str(upstream)))
    assert detector.reload() == (1, [])  # nothing came down yet: the local rule alone
    upstream.mkdir()
    (upstream / "county.yml").write_text(interface_rule("province_rule", "eth9"))
    count, errors = detector.reload()
    # Not kept as "the previous version of a file that no longer loads": the upstream's replaces it.
    assert [r.name for r in detector.rules] == ["province_rule"] and count == 1
    assert "local/county.yml:1: an upstream rule file has this name" in errors[0]


def test_the_same_pack_on_both_tiers_is_no_conflict(tmp_path: Path, db: sqlite3.Connection) -> None:
    upstream, local = tmp_path / "up", tmp_path / "local"
    upstream.mkdir()
    local.mkdir()
    shipped = interface_rule("county", "eth6")
    for directory in (upstream, local):  # the default pack, shipped to every tier
        (directory / "county.yml").write_text(shipped)
    (local / "mine.yml").write_text(interface_rule("mine", "eth7"))
    detector = Detector(db, DetectionConfig(str(local), upstream_rules_dir=str(upstream)))
    assert detector.reload() == (2, [])
    assert sorted(r.name for r in detector.rules) == ["county", "mine"]


def test_rules_list_shows_the_origin_on_a_lower_tier(tmp_path: Path) -> None:
    state, local = tmp_path / "state", tmp_path / "rules"
    local.mkdir()
    (local / "county.yml").write_text(interface_rule("county", "eth6"))
    (local / "same_id.yml").write_text(interface_rule("weaker", "eth8", UPSTREAM_ONLY_ID))
    store_upstream_policy(
        state, [("upstream_only.yml", interface_rule("upstream_only", "eth9", UPSTREAM_ONLY_ID))], ""
    )
    result = run_cli(
        "zonewatch-collector", "rules", "list", "--rules", str(local), "--upstream-state", str(state),
        "--format", "csv", check=False,
    )  # fmt: skip
    assert result.returncode == 1  # the refused local rule
    lines = result.stdout.splitlines()
    assert lines[0].startswith("origin,id,name")
    assert [line.split(",")[0] + ":" + line.split(",")[2] for line in lines[1:]] == [
        "upstream:upstream_only",
        "local:county",
    ]
    assert "same_id.yml:2: id " in result.stderr and "not replace upstream ones" in result.stderr


# --- the whole way down: upstream -> stored -> a running lower tier -------------------------------------


def incidents(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in con.execute("SELECT rule FROM incidents ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def wait_for_incidents(db: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(incidents, db)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} incidents at the lower tier: {incidents(db)}")


def report(target: str, agent_id: str, seq: int, interface: str) -> None:
    stream = Stream(target, agent_id)
    try:
        # Only a saturated interface is an event (detection.py): the rules see this one.
        reply = stream.batch(seq, sample(interface=interface, utilization=0.95))
        assert reply.WhichOneof("body") == "ack", reply
    finally:
        stream.close()


def test_upstream_rules_and_zones_rule_the_lower_tier_and_survive_its_restart(
    tmp_path: Path, upstream: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    city = Client(tmp_path / "city-key", "示例市")
    enroll(upstream, city, "collector")
    reply = get_policy(upstream, city)
    state = tmp_path / "city" / "upstream"
    assert store_upstream_policy(state, pack(reply), reply.policy.catalog_yaml)

    local_rules = tmp_path / "city" / "rules"
    local_rules.mkdir()
    (local_rules / "weaker_copy.yml").write_text(interface_rule("weaker_copy", "eth8", UPSTREAM_ONLY_ID))
    (local_rules / "city_only.yml").write_text(interface_rule("city_only", "eth6"))
    local_zones = tmp_path / "city" / "zones.yaml"
    local_zones.write_text(LOCAL_ZONES, encoding="utf-8")
    config = CollectorConfig(
        db_path=tmp_path / "city" / "city.db",
        listen="127.0.0.1:0",
        insecure=True,  # the lower tier's own agents: plaintext is enough for this test
        policy=AgentPolicy(sample_interval_s=1),
        zones_path=local_zones,
        rules_dir=local_rules,
        detection_interval_s=0.2,
        upstream_dir=policy_dir(state),
    )

    async def lower_tier(check: str) -> None:
        collector: RunningCollector = await create_server(config)
        try:
            target = f"127.0.0.1:{collector.port}"
            catalog = collector.policy.catalog
            assert catalog is not None
            assert [z.name for z in catalog.zones] == [
                "省电子政务外网（纵向）",
                "运维区",
                "涉密网",
                "城关区政务网",
            ]
            assert catalog.by_name("运维区").kind == "local"  # type: ignore[union-attr]
            count, errors = await collector.ingest.reload_rules()
            if check == "first":
                assert count == 3  # upstream_only, copied, city_only; the weaker copy refused
                assert len(errors) == 1 and "weaker_copy.yml:2: id " in errors[0]
                # The upstream-only rule fires here; the local copy that would weaken it does not.
                await asyncio.to_thread(report, target, "county-host-1", 1, "eth8")
                await asyncio.to_thread(report, target, "county-host-1", 2, "eth9")
                await asyncio.to_thread(report, target, "county-host-1", 3, "eth6")
                found = await wait_for_incidents(config.db_path, 2)
                await asyncio.sleep(0.5)
                assert await asyncio.to_thread(incidents, config.db_path) == found
                assert sorted(found) == ["city_only", "upstream_only"]

                # The upstream removes a rule: it goes here too once the policy comes down again.
                (upstream.db.parent / "rules" / "copied.yml").unlink()
                changed = await asyncio.to_thread(wait_for_new_version, upstream, city, reply.version)
                assert store_upstream_policy(state, pack(changed), changed.policy.catalog_yaml)
                await collector.reload_zones(only_if_changed=False)
                await collector.reload_rules()
                count, _ = await collector.ingest.reload_rules()
                assert count == 2
            else:
                # After a restart, before the upstream is heard from again: what came down is in force.
                assert count == 2 and "weaker_copy.yml" in errors[0]
                await asyncio.to_thread(report, target, "county-host-2", 1, "eth9")
                found = await wait_for_incidents(config.db_path, 3)
                assert found[-1] == "upstream_only"
        finally:
            await collector.stop()

    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(lower_tier("first"), 90))
    assert "zone '运维区' refused, the upstream's stays" in caplog.text
    asyncio.run(asyncio.wait_for(lower_tier("restarted"), 60))


def test_a_lower_tier_without_an_upstream_policy_yet_runs_on_its_own_files(tmp_path: Path) -> None:
    local = tmp_path / "zones.yaml"
    local.write_text(LOCAL_ZONES.replace("access:\n  server: [城关区政务网, 运维区]\n", ""), encoding="utf-8")
    upstream = upstream_catalog_path(policy_dir(tmp_path / "state"))
    source = PolicySource(AgentPolicy(), local, upstream)
    assert source.catalog is not None and [z.name for z in source.catalog.zones] == ["运维区", "城关区政务网"]
    assert store_upstream_policy(tmp_path / "state", [], UPSTREAM_ZONES)
    assert source.reload_if_changed()
    assert [z.name for z in source.catalog.zones] == [
        "省电子政务外网（纵向）",
        "运维区",
        "涉密网",
        "城关区政务网",
    ]
    assert source.catalog.by_name("运维区").kind == "local"  # type: ignore[union-attr]

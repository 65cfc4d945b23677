"""Bad input at the edge: a clear status naming the field, nothing stored, and the stream lives on."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import Collector, Stream, cli_json, now_ms, run_cli, sample

from agent.wire import batch_request, hello_request
from protos.zonewatch.v1 import agent_pb2, facts_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("bad-input") / "collector.db")
    yield c
    c.stop()


_counter = iter(range(1, 10_000))


@pytest.fixture
def stream(server: Collector) -> Iterator[Stream]:
    s = Stream(server.target, f"agent-{next(_counter):04d}")
    yield s
    s.close()


def stored(server: Collector, agent_id: str) -> tuple[int, int]:
    con = sqlite3.connect(server.db)
    try:
        (batches,) = con.execute(
            "SELECT count(*) FROM batches JOIN agents ON agents.id = batches.agent "
            "WHERE agent_id = ? AND status = 'stored'",
            (agent_id,),
        ).fetchone()
        (samples,) = con.execute(
            "SELECT count(*) FROM interface_samples JOIN agents ON agents.id = interface_samples.agent "
            "WHERE agent_id = ?",
            (agent_id,),
        ).fetchone()
        return batches, samples
    finally:
        con.close()


BAD_SAMPLES = {
    "nan-rate": (sample(rx_bps=math.nan), "rx_bps"),
    "infinite-rate": (sample(tx_bps=math.inf), "tx_bps"),
    "negative-rate": (sample(tx_bps=-1.0), "tx_bps"),
    "counter-beyond-int64": (sample(rx_bytes=2**63), "rx_bytes"),
    "zero-interval": (sample(interval_ms=0), "interval_ms"),
    "interval-over-a-day": (sample(interval_ms=86_400_001), "interval_ms"),
    "empty-interface": (sample(interface=""), "interface"),
    "long-interface": (sample(interface="x" * 65), "interface"),
    "control-chars": (sample(interface="eth0\x1b[31m"), "interface"),
    "nan-utilization": (sample(utilization=math.nan), "utilization"),
    "absurd-utilization": (sample(utilization=5000.0), "utilization"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_invalid_sample_is_rejected_naming_the_field_and_stream_continues(
    server: Collector, stream: Stream, case: str
) -> None:
    bad, field = BAD_SAMPLES[case]
    reply = stream.batch(1, sample(), bad)
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.code == INVALID
    assert reply.rejection.seq == 1
    assert reply.rejection.field == f"batch.facts[1].interface_sample.{field}"
    assert field in reply.rejection.message or reply.rejection.message

    ok = stream.batch(2)
    assert ok.WhichOneof("body") == "ack" and ok.ack.acked_seq == 2
    assert stored(server, stream.agent_id) == (1, 1), "only the valid batch may be stored"
    con = sqlite3.connect(server.db)
    recorded = con.execute(
        "SELECT seq, code, field FROM rejections WHERE agent_id = ?", (stream.agent_id,)
    ).fetchall()
    con.close()
    assert recorded == [(1, "INVALID_ARGUMENT", reply.rejection.field)]


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("time-before-2000", "batch.facts[0].time_ms"),
        ("time-a-week-ahead", "batch.facts[0].time_ms"),
        ("sent-before-2000", "batch.sent_ms"),
        ("no-kind", "batch.facts[0]"),
        ("seq-zero", "batch.seq"),
        ("too-many-facts", "batch.facts"),
        ("span-over-an-hour", "batch.facts"),
    ],
)
def test_invalid_batch_fields(stream: Stream, case: str, field: str) -> None:
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    if case == "time-before-2000":
        msg.batch.facts[0].time_ms = 1000
    elif case == "time-a-week-ahead":
        msg.batch.facts[0].time_ms = t + 7 * 86_400_000
    elif case == "sent-before-2000":
        msg.batch.sent_ms = 5
    elif case == "no-kind":
        msg.batch.facts[0].ClearField("interface_sample")
    elif case == "seq-zero":
        msg.batch.seq = 0
    elif case == "span-over-an-hour":
        msg = batch_request(1, t, t, [sample(), sample(interface="eth1")])
        msg.batch.facts[0].time_ms = t - 3_600_001
    elif case == "too-many-facts":
        msg = batch_request(1, t, t, [sample()] * 20_001)
    reply = stream.send(msg.SerializeToString())
    assert reply.WhichOneof("body") == "rejection", reply
    assert reply.rejection.code == INVALID
    assert reply.rejection.field == field
    assert stream.batch(2).ack.acked_seq == 2


def test_invalid_utf8_is_rejected_in_band(stream: Stream) -> None:
    good = batch_request(1, now_ms(), now_ms(), [sample(interface="eth0")]).SerializeToString()
    # Replace the interface name's bytes with an invalid UTF-8 sequence of the same length.
    broken = good.replace(b"eth0", b"\xff\xfe\xfd\xfc", 1)
    reply = stream.send(broken)
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.code == INVALID
    assert "ReportRequest" in reply.rejection.message
    assert stream.batch(1).ack.acked_seq == 1


def test_out_of_order_sequence_on_a_stream(stream: Stream) -> None:
    assert stream.batch(5).ack.acked_seq == 5
    reply = stream.batch(3)
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.code == PRECONDITION
    assert "not greater than 5" in reply.rejection.message
    assert stream.batch(6).ack.acked_seq == 6


def test_replayed_batch_is_stored_once(server: Collector) -> None:
    first = Stream(server.target, "replayer-01")
    assert first.batch(1).ack.acked_seq == 1
    assert first.batch(2).ack.acked_seq == 2
    first.close()
    again = Stream(server.target, "replayer-01")
    assert again.welcome.welcome.acked_seq == 2
    reply = again.batch(1)
    assert reply.ack.duplicate and reply.ack.acked_seq == 2
    reply = again.batch(2)
    assert reply.ack.duplicate
    assert again.batch(3).ack.acked_seq == 3
    again.close()
    assert stored(server, "replayer-01") == (3, 3)


def test_clock_skew_is_flagged_and_receive_time_kept(server: Collector) -> None:
    s = Stream(server.target, "skewed-01")
    ahead = now_ms() + 10 * 60_000
    assert s.batch(1, sent_ms=ahead).ack.acked_seq == 1
    s.close()
    con = sqlite3.connect(server.db)
    (skew,) = con.execute("SELECT clock_skew_ms FROM agents WHERE agent_id = 'skewed-01'").fetchone()
    (sent, received) = con.execute(
        "SELECT sent_ms, received_ms FROM batches JOIN agents ON agents.id = batches.agent "
        "WHERE agent_id = 'skewed-01'"
    ).fetchone()
    con.close()
    assert 9 * 60_000 < skew < 11 * 60_000
    assert sent - received == skew


def test_first_message_must_be_hello(server: Collector) -> None:
    t = now_ms()
    with pytest.raises(grpc.RpcError) as info:
        Stream(server.target, "x", hello=batch_request(1, t, t, [sample()]).SerializeToString())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("agent_id", "hostname", "message"),
    [
        ("far-future-clock", "h", "time_ms"),
        ("", "h", "agent_id"),
        ("has space", "h", "agent_id"),
        ("ok-id", "", "hostname"),
        ("ok-id", "h" * 300, "hostname"),
    ],
)
def test_invalid_hello_is_refused(server: Collector, agent_id: str, hostname: str, message: str) -> None:
    t = 2**62 if agent_id == "far-future-clock" else now_ms()
    hello = hello_request(agent_id, hostname, "t", {}, "", t).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        Stream(server.target, agent_id, hello=hello)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


def test_oversized_message_is_refused_with_resource_exhausted(server: Collector) -> None:
    s = Stream(server.target, "big-01")
    t = now_ms()
    huge = batch_request(1, t, t, [sample()])
    huge.batch.facts.append(
        facts_pb2.Fact(time_ms=t, zone_traffic=facts_pb2.ZoneTraffic(zone="z" * 4_200_000))
    )
    data = huge.SerializeToString()
    assert len(data) > 4 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as info:
        s.send(data)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    s.close()
    # The collector is unharmed.
    assert Stream(server.target, "big-02").batch(1).ack.acked_seq == 1


def test_fact_of_a_newer_kind_is_kept_verbatim(server: Collector) -> None:
    """A newer agent's fact kind (unknown to this collector) is stored as-is, not refused."""
    s = Stream(server.target, "newer-01")
    t = now_ms()
    fact = facts_pb2.Fact(time_ms=t).SerializeToString() + bytes([0xA0, 0x06, 0x01])  # field 100 = 1
    msg = batch_request(1, t, t, [sample()])
    msg.batch.facts.add().MergeFromString(fact)
    assert s.send(msg.SerializeToString()).ack.acked_seq == 1
    s.close()
    con = sqlite3.connect(server.db)
    rows = con.execute("SELECT kind, length(payload) FROM other_facts").fetchall()
    con.close()
    assert ("unknown", len(fact)) in rows


@pytest.mark.parametrize(
    ("agent_id", "version", "field"),
    [
        ("no spaces allowed", "", "agent_id"),
        ("a" * 129, "", "agent_id"),
        ("ok-01", "v" * 129, "current_version"),
    ],
)
def test_get_policy_validates_its_request(server: Collector, agent_id: str, version: str, field: str) -> None:
    channel = grpc.insecure_channel(server.target)
    method = channel.unary_unary(
        "/zonewatch.v1.AgentService/GetPolicy",
        request_serializer=agent_pb2.GetPolicyRequest.SerializeToString,
        response_deserializer=agent_pb2.GetPolicyResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        method(agent_pb2.GetPolicyRequest(agent_id=agent_id, current_version=version), timeout=10)
    channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"zone": ""}, "zone"),
        ({"method": "guesswork"}, "method"),
        ({"window_ms": 0}, "window_ms"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"bytes_in": 2**63}, "bytes_in"),
    ],
)
def test_invalid_zone_traffic(server: Collector, change: dict[str, Any], field: str) -> None:
    stream = Stream(server.target, f"zt-{field}")
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    values = {"zone": "公安专网", "bytes_in": 10, "bytes_out": 20, "window_ms": 10_000, "method": "nftables"}
    values.update(change)
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, zone_traffic=facts_pb2.ZoneTraffic(**values)))
    reply = stream.send(msg.SerializeToString())
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.field == f"batch.facts[1].zone_traffic.{field}"
    stream.close()


def test_zone_traffic_is_stored(server: Collector) -> None:
    stream = Stream(server.target, "zt-good")
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    zt = facts_pb2.ZoneTraffic(
        zone="公安专网", bytes_in=10, bytes_out=20, window_ms=10_000, method="nftables"
    )
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, zone_traffic=zt))
    assert stream.send(msg.SerializeToString()).ack.acked_seq == 1
    stream.close()
    con = sqlite3.connect(server.db)
    rows = con.execute("SELECT zone, bytes_in, bytes_out, method, sampling_rate FROM zone_traffic").fetchall()
    con.close()
    assert ("公安专网", 10, 20, "nftables", 1.0) in rows


def _flow(**changes: Any) -> facts_pb2.Flow:
    t = now_ms()
    values: dict[str, Any] = {
        "ip_protocol": 6,
        "local_addr": "10.10.3.4",
        "local_port": 51000,
        "remote_addr": "172.20.1.9",
        "remote_port": 443,
        "interface": "eth0",
        "bytes_out": 1200,
        "bytes_in": 5600,
        "packets_out": 10,
        "packets_in": 12,
        "start_ms": t - 5000,
        "end_ms": t,
        "tcp_flags": 0x1B,
        "remote_zone": "公安专网",
        "initiated_locally": True,
        "process": facts_pb2.ProcessRef(pid=4242, name="java", user="app", cmdline="java -jar 审批.jar"),
    }
    values.update(changes)
    return facts_pb2.Flow(**values)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"remote_addr": "172.20.1.999"}, "remote_addr"),
        ({"local_addr": ""}, "local_addr"),
        ({"remote_port": 70000}, "remote_port"),
        ({"start_ms": now_ms() + 60_000, "end_ms": now_ms()}, "start_ms"),
        ({"ip_protocol": 300}, "ip_protocol"),
        ({"tcp_flags": 256}, "tcp_flags"),
        ({"bytes_in": 2**63}, "bytes_in"),
        ({"end_ms": 5}, "end_ms"),
        ({"remote_zone": "z\x1b[31m"}, "remote_zone"),
        ({"process": facts_pb2.ProcessRef(pid=-1)}, "process.pid"),
        ({"process": facts_pb2.ProcessRef(cmdline="x" * 1025)}, "process.cmdline"),
        ({"process": facts_pb2.ProcessRef(cmdline="rm\n-rf")}, "process.cmdline"),
    ],
)
def test_invalid_flow(server: Collector, change: dict[str, Any], field: str) -> None:
    stream = Stream(server.target, f"flow-{field}")
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, flow=_flow(**change)))
    reply = stream.send(msg.SerializeToString())
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.code == INVALID
    assert reply.rejection.field == f"batch.facts[1].flow.{field}"
    assert stream.batch(2).ack.acked_seq == 2
    stream.close()
    con = sqlite3.connect(server.db)
    (count,) = con.execute(
        "SELECT count(*) FROM flows JOIN agents ON agents.id = flows.agent WHERE agent_id = ?",
        (stream.agent_id,),
    ).fetchone()
    con.close()
    assert count == 0


def test_flow_is_stored(server: Collector) -> None:
    stream = Stream(server.target, "flow-good")
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, flow=_flow(remote_addr="FD20:0::0008")))
    # Unattributed: no process at all.
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, flow=_flow(ip_protocol=17, process=None)))
    assert stream.send(msg.SerializeToString()).ack.acked_seq == 1
    stream.close()
    con = sqlite3.connect(server.db)
    rows = con.execute(
        "SELECT ip_protocol, remote_addr, remote_port, remote_zone, bytes_out, bytes_in, tcp_flags,"
        " initiated_locally, pid, process, user, cmdline FROM flows JOIN agents ON agents.id = flows.agent"
        " WHERE agent_id = 'flow-good' ORDER BY ip_protocol"
    ).fetchall()
    (facts,) = con.execute(
        "SELECT facts FROM batches JOIN agents ON agents.id = batches.agent WHERE agent_id = 'flow-good'"
    ).fetchone()
    con.close()
    assert rows == [
        (6, "fd20::8", 443, "公安专网", 1200, 5600, 0x1B, 1, 4242, "java", "app", "java -jar 审批.jar"),
        (17, "172.20.1.9", 443, "公安专网", 1200, 5600, 0x1B, 1, 0, "", "", ""),
    ]
    assert facts == 3


def health_batch(seq: int, **health: Any) -> bytes:
    t = now_ms()
    msg = batch_request(seq, t, t, [sample()])
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, agent_health=facts_pb2.AgentHealth(**health)))
    return msg.SerializeToString()


def test_the_agents_view_says_which_sensor_is_off_and_why(server: Collector) -> None:
    stream = Stream(server.target, "sensors-01")
    status = {
        "interfaces": "on",
        "zone_accounting": "off: nft: not installed",
        "flows": "on: eth0: 5 packets",
    }
    reply = stream.send(health_batch(1, cpu_percent=0.3, rss_bytes=42_000_000, sensor_status=status))
    assert reply.ack.acked_seq == 1
    stream.close()
    agents = {a["agent_id"]: a for a in cli_json("zonewatch-collector", "agents", "--db", str(server.db))}
    row = agents["sensors-01"]
    assert row["sensors"] == "zone_accounting: off: nft: not installed"
    assert row["rss_bytes"] == 42_000_000 and row["cpu_percent"] == pytest.approx(0.3)
    table = run_cli("zonewatch-collector", "agents", "--db", str(server.db)).stdout
    assert "not installed" in table


@pytest.mark.parametrize(
    ("health", "field"),
    [({"cpu_percent": math.nan}, "cpu_percent"), ({"sensor_status": {"zone\x07": "on"}}, "sensor_status")],
)
def test_invalid_agent_health(server: Collector, health: dict[str, Any], field: str) -> None:
    stream = Stream(server.target, f"health-{field}")
    reply = stream.send(health_batch(1, **health))
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.field.startswith(f"batch.facts[1].agent_health.{field}")
    stream.close()

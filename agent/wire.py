"""Protobuf at the agent's edge: typed facts in, wire bytes (or their JSON view) out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.aggregate.access import INBOUND, AccessRecord
from agent.aggregate.flows import TCP, UDP, FlowRecord, ProcessRef
from agent.config import LABELS
from agent.credentials import IssuedCertificate
from agent.health import Health
from agent.policy import PolicyUpdate, zones_from_ranges
from agent.sensors.accounting import ZoneDelta
from agent.sensors.interfaces import InterfaceSample
from agent.sensors.inventory import InventoryReport
from agent.sensors.listeners import ListenerEvent
from agent.spool import DropReport
from protos.zonewatch.v1 import agent_pb2, facts_pb2

REPORT_METHOD = "/zonewatch.v1.AgentService/Report"
POLICY_METHOD = "/zonewatch.v1.AgentService/GetPolicy"
ENROLL_METHOD = "/zonewatch.v1.AgentService/Enroll"
RENEW_METHOD = "/zonewatch.v1.AgentService/Renew"


def hello_request(
    agent_id: str, hostname: str, version: str, labels: dict[str, str], policy_version: str, time_ms: int
) -> agent_pb2.ReportRequest:
    return agent_pb2.ReportRequest(
        hello=agent_pb2.Hello(
            agent_id=agent_id,
            hostname=hostname,
            agent_version=version,
            labels=agent_pb2.HostLabels(**labels),
            policy_version=policy_version,
            time_ms=time_ms,
        )
    )


def batch_request(
    seq: int,
    sent_ms: int,
    time_ms: int,
    samples: Sequence[InterfaceSample],
    dropped: DropReport | None = None,
    extra: Sequence[facts_pb2.Fact] = (),
) -> agent_pb2.ReportRequest:
    facts = [
        facts_pb2.Fact(time_ms=time_ms, interface_sample=facts_pb2.InterfaceSample(**s._asdict()))
        for s in samples
    ]
    if dropped is not None:
        facts.append(
            facts_pb2.Fact(
                time_ms=time_ms,
                data_loss=facts_pb2.DataLoss(
                    reason="spool_full",
                    facts=dropped.facts,
                    first_seq=dropped.first_seq,
                    last_seq=dropped.last_seq,
                    from_ms=dropped.from_ms,
                    to_ms=dropped.to_ms,
                ),
            )
        )
    facts.extend(extra)
    return agent_pb2.ReportRequest(batch=agent_pb2.Batch(seq=seq, sent_ms=sent_ms, facts=facts))


def policy_update(response: agent_pb2.GetPolicyResponse) -> PolicyUpdate:
    """The policy as the agent's own record; ValueError when it is inconsistent."""
    p = response.policy
    ranges = []
    for r in p.zone_ranges:
        if len(r.first) not in (4, 16) or len(r.last) != len(r.first):
            raise ValueError("a zone range is neither IPv4 nor IPv6")
        family = 4 if len(r.first) == 4 else 6
        ranges.append((family, int.from_bytes(r.first, "big"), int.from_bytes(r.last, "big"), r.zone))
    return PolicyUpdate(
        version=response.version,
        sample_interval_s=p.sample_interval_s,
        interfaces=tuple(p.interfaces),
        batch_max_facts=p.batch_max_facts,
        policy_refresh_s=p.policy_refresh_s,
        zones_version=p.zones_version,
        zones=zones_from_ranges([z.name for z in p.zones], ranges),
    )


def zone_traffic_fact(delta: ZoneDelta, time_ms: int, method: str = "nftables") -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        zone_traffic=facts_pb2.ZoneTraffic(
            zone=delta.zone,
            bytes_in=delta.bytes_in,
            bytes_out=delta.bytes_out,
            packets_in=delta.packets_in,
            packets_out=delta.packets_out,
            window_ms=max(1, delta.interval_ms),
            method=method,
            sampling_rate=delta.sampling_rate,
        ),
    )


def _process(p: ProcessRef | None) -> facts_pb2.ProcessRef | None:
    return None if p is None else facts_pb2.ProcessRef(pid=p.pid, name=p.name, user=p.user, cmdline=p.cmdline)


def flow_fact(flow: FlowRecord, time_ms: int) -> facts_pb2.Fact:
    process = _process(flow.process)
    return facts_pb2.Fact(
        time_ms=time_ms,
        flow=facts_pb2.Flow(
            ip_protocol=flow.ip_protocol,
            local_addr=flow.local_addr,
            local_port=flow.local_port,
            remote_addr=flow.remote_addr,
            remote_port=flow.remote_port,
            interface=flow.interface,
            bytes_out=flow.bytes_out,
            bytes_in=flow.bytes_in,
            packets_out=flow.packets_out,
            packets_in=flow.packets_in,
            start_ms=flow.start_ms,
            end_ms=flow.end_ms,
            tcp_flags=flow.tcp_flags,
            remote_zone=flow.remote_zone,
            initiated_locally=flow.initiated_locally,
            process=process,
        ),
    )


def access_fact(record: AccessRecord, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        access_summary=facts_pb2.AccessSummary(
            peer_addr=record.peer_addr,
            peer_zone=record.peer_zone,
            local_zone=record.local_zone,
            inbound=record.direction == INBOUND,
            attempts=record.attempts,
            distinct_ports=record.distinct_ports,
            distinct_hosts=record.distinct_hosts,
            half_open=record.half_open,
            resets=record.resets,
            icmp_unreachable=record.icmp_unreachable,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            window_ms=record.window_ms,
            ports=record.ports,
            service=record.service,
            service_port=record.service_port,
        ),
    )


_LISTENER_CHANGES = {
    "opened": facts_pb2.ListenerChange.OPENED,
    "closed": facts_pb2.ListenerChange.CLOSED,
    "present": facts_pb2.ListenerChange.PRESENT,
}
_IP_PROTOCOLS = {"tcp": TCP, "udp": UDP}


def listener_fact(event: ListenerEvent, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        listener_change=facts_pb2.ListenerChange(
            change=_LISTENER_CHANGES[event.change],
            ip_protocol=_IP_PROTOCOLS[event.protocol],
            local_addr=event.local_addr,
            local_port=event.local_port,
            process=_process(event.process),
        ),
    )


def inventory_fact(report: InventoryReport, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        inventory=facts_pb2.Inventory(
            full=report.full,
            addresses_added=[facts_pb2.Address(**a._asdict()) for a in report.addresses_added],
            addresses_removed=[facts_pb2.Address(**a._asdict()) for a in report.addresses_removed],
            routes_added=[facts_pb2.Route(**r._asdict()) for r in report.routes_added],
            routes_removed=[facts_pb2.Route(**r._asdict()) for r in report.routes_removed],
            dns_resolvers=report.dns_resolvers,
            hostname=report.hostname,
            os_name=report.os_name,
            os_version=report.os_version,
        ),
    )


def health_fact(health: Health, time_ms: int) -> facts_pb2.Fact:
    return facts_pb2.Fact(
        time_ms=time_ms,
        agent_health=facts_pb2.AgentHealth(
            cpu_percent=health.cpu_percent,
            rss_bytes=health.rss_bytes,
            spool_bytes=health.spool_bytes,
            spool_batches=health.spool_batches,
            capture_packets=health.capture_packets,
            capture_drops=health.capture_drops,
            policy_version=health.policy_version,
            sensor_status=dict(health.sensors),
        ),
    )


def enroll_request(token: str, csr_pem: bytes, hostname: str, machine_id: str, version: str) -> bytes:
    return agent_pb2.EnrollRequest(
        token=token, csr_pem=csr_pem, hostname=hostname, machine_id=machine_id, agent_version=version
    ).SerializeToString()


def renew_request(csr_pem: bytes) -> bytes:
    return agent_pb2.RenewRequest(csr_pem=csr_pem).SerializeToString()


def parse_issued(data: bytes) -> IssuedCertificate:
    """An EnrollResponse (the answer to Enroll and to Renew) as the agent's own record."""
    response = agent_pb2.EnrollResponse.FromString(data)
    return IssuedCertificate(
        certificate_pem=response.certificate_pem,
        ca_pem=response.ca_pem,
        agent_id=response.agent_id,
        not_after_ms=response.not_after_ms,
        labels={name: getattr(response.labels, name) for name in LABELS},
    )


def renumber_payload(payload: bytes, seq: int) -> bytes:
    """A spooled batch request carrying sequence number ``seq`` instead of its own."""
    request = agent_pb2.ReportRequest.FromString(payload)
    request.batch.seq = seq
    return request.SerializeToString()


def to_json(message: Any) -> str:
    """The message as the proto3 JSON mapping, every field shown, names as in the .proto."""
    from google.protobuf import json_format  # `once --json` only: not kept in a running agent

    as_dict = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(as_dict, ensure_ascii=False, indent=2)


def parse_response(data: bytes) -> agent_pb2.ReportResponse:
    return agent_pb2.ReportResponse.FromString(data)

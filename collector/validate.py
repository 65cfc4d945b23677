"""Validation at the edge: protobuf in, typed records out, or a ValidationError naming the field.

This and the servicer are the only collector modules that see protobuf. The
interface-sample path is the hot one (hundreds of thousands a second), so it
pulls every field of a sample into a tuple with one C-level attrgetter call and
checks ranges over whole tuples instead of field by field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from ipaddress import ip_address, ip_interface, ip_network
from operator import attrgetter, methodcaller
from typing import Any

from google.protobuf.unknown_fields import UnknownFieldSet

from collector.checks import INT64_MAX, MIN_TIME_MS, text
from collector.errors import ValidationError
from collector.model import (
    MAX_BATCH_SPAN_MS,
    SAMPLE_COLUMNS,
    AccessRow,
    AgentHello,
    FlowRow,
    HealthRow,
    HostLabels,
    InventoryRow,
    ListenerRow,
    ValidBatch,
    ZoneTrafficRow,
)
from collector.upstream.wire import TIER_KINDS, tier_row
from protos.zonewatch.v1 import agent_pb2, facts_pb2

MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_INTERVAL_MS = 24 * 3600 * 1000
MAX_FACTS_PER_BATCH = 20_000
MAX_ID_LEN = 128
MAX_LABEL_LEN = 128
MAX_HOSTNAME_LEN = 253
MAX_INTERFACE_LEN = 64
MAX_CMDLINE_LEN = 1024
# Utilization above 1 happens when a driver under-reports link speed; 1000x is nonsense.
MAX_UTILIZATION = 1000.0
# 10 Tbit/s: above any link a host has; also keeps sum() of a batch's rates finite.
MAX_BPS = 1e13

_SAMPLE_FIELDS = SAMPLE_COLUMNS[1:]  # every column but time_ms, which the fact carries
_sample_of = attrgetter("interface_sample")
_interface_of = attrgetter("interface")
_FIELD_GETTERS = tuple(attrgetter(name) for name in _SAMPLE_FIELDS[1:])
_time_of = attrgetter("time_ms")
_kind_of = methodcaller("WhichOneof", "kind")
_COUNTERS = slice(1, 10)  # rx_bytes .. interval_ms


def _agent_id(value: str, field: str) -> str:
    text(value, field, MAX_ID_LEN, required=True)
    if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value):
        raise ValidationError(field, "may contain only ASCII letters, digits, '-', '_' and '.'")
    return value


def hello(msg: agent_pb2.Hello, received_ms: int) -> AgentHello:
    agent_id = _agent_id(msg.agent_id, "hello.agent_id")
    if msg.time_ms:  # 0: the agent does not say
        _check_time(msg.time_ms, "hello.time_ms", received_ms + MAX_FUTURE_MS)
    labels = msg.labels
    return AgentHello(
        agent_id=agent_id,
        hostname=text(msg.hostname, "hello.hostname", MAX_HOSTNAME_LEN, required=True),
        agent_version=text(msg.agent_version, "hello.agent_version", MAX_LABEL_LEN),
        labels=HostLabels(
            department=text(labels.department, "hello.labels.department", MAX_LABEL_LEN),
            county=text(labels.county, "hello.labels.county", MAX_LABEL_LEN),
            site=text(labels.site, "hello.labels.site", MAX_LABEL_LEN),
            role=text(labels.role, "hello.labels.role", MAX_LABEL_LEN),
        ),
        policy_version=text(msg.policy_version, "hello.policy_version", MAX_LABEL_LEN),
        time_ms=msg.time_ms,
    )


def policy_request(msg: agent_pb2.GetPolicyRequest) -> tuple[str, str]:
    """(agent_id, current_version); an empty agent id is allowed (a tool asking, not an agent)."""
    agent_id = _agent_id(msg.agent_id, "agent_id") if msg.agent_id else ""
    return agent_id, text(msg.current_version, "current_version", MAX_LABEL_LEN)


def batch(msg: agent_pb2.Batch, agent_id: str, received_ms: int) -> ValidBatch:
    """Check one batch completely; nothing of an invalid batch is stored.

    The common case, a batch of interface samples, is checked column by column
    with min/max/sum in C; only when a check fails does a per-fact pass find the
    offending field to name it.
    """
    if msg.seq == 0:
        raise ValidationError("batch.seq", "must be >= 1")
    if msg.seq > INT64_MAX:
        raise ValidationError("batch.seq", f"{msg.seq} is out of range (at most {INT64_MAX})")
    facts = msg.facts
    if len(facts) > MAX_FACTS_PER_BATCH:
        raise ValidationError("batch.facts", f"has {len(facts)} facts, at most {MAX_FACTS_PER_BATCH} allowed")
    latest = received_ms + MAX_FUTURE_MS
    _check_time(msg.sent_ms, "batch.sent_ms", latest)
    if not facts:
        return ValidBatch(agent_id, msg.seq, msg.sent_ms, received_ms, msg.sent_ms, msg.sent_ms, (), [])
    times = list(map(_time_of, facts))
    first_ms, last_ms = min(times), max(times)
    if first_ms < MIN_TIME_MS or last_ms > latest:
        for index, value in enumerate(times):
            _check_time(value, f"batch.facts[{index}].time_ms", latest)
    if last_ms - first_ms > MAX_BATCH_SPAN_MS:
        raise ValidationError(
            "batch.facts",
            f"fact times span {(last_ms - first_ms) / 60000:.0f} min; one batch may span at most "
            f"{MAX_BATCH_SPAN_MS // 60000} min (send one batch per reporting window)",
        )
    subs = list(map(_sample_of, facts))
    names = list(map(_interface_of, subs))
    others: list[tuple[int, str, bytes]] = []
    zone_rows: list[ZoneTrafficRow] = []
    health_rows: list[HealthRow] = []
    flow_rows: list[FlowRow] = []
    inventory_rows: list[InventoryRow] = []
    access_rows: list[AccessRow] = []
    listener_rows: list[ListenerRow] = []
    tier_rows: list[tuple[Any, ...]] = []
    # Every fact is an interface sample when every name is set: a fact of another
    # kind reads as an empty sample. So the common case needs no WhichOneof per fact.
    if min(map(len, names)) >= 1:
        positions: Sequence[int] = range(len(facts))
        sample_times = times
    else:
        kinds = list(map(_kind_of, facts))
        positions = [i for i, kind in enumerate(kinds) if kind == "interface_sample"]
        subs = [subs[i] for i in positions]
        names = [names[i] for i in positions]
        sample_times = [times[i] for i in positions]
        for index, (fact, kind) in enumerate(zip(facts, kinds, strict=True)):
            if kind == "interface_sample":
                continue
            if kind == "zone_traffic":
                zone_rows.append(
                    _zone_traffic(fact.zone_traffic, times[index], f"batch.facts[{index}].zone_traffic")
                )
                continue
            if kind == "agent_health":
                prefix = f"batch.facts[{index}].agent_health"
                health_rows.append(_health(fact.agent_health, times[index], prefix))
                others.append((times[index], kind, fact.SerializeToString()))  # the full fact, kept verbatim
                continue
            if kind == "flow":
                flow_rows.append(_flow(fact.flow, times[index], f"batch.facts[{index}].flow", latest))
                continue
            if kind == "inventory":
                prefix = f"batch.facts[{index}].inventory"
                inventory_rows.append(_inventory(fact.inventory, times[index], prefix))
                others.append((times[index], kind, fact.SerializeToString()))  # the record, verbatim
                continue
            if kind == "access_summary":
                prefix = f"batch.facts[{index}].access_summary"
                access_rows.append(_access(fact.access_summary, times[index], prefix))
                others.append((times[index], kind, fact.SerializeToString()))
                continue
            if kind == "listener_change":
                prefix = f"batch.facts[{index}].listener_change"
                listener_rows.append(_listener(fact.listener_change, times[index], prefix))
                others.append((times[index], kind, fact.SerializeToString()))
                continue
            if kind in TIER_KINDS:
                # From a lower-tier collector; the writer refuses them from anyone else.
                tier_rows.append(tier_row(fact, kind, f"batch.facts[{index}].{kind}", latest))
                others.append((times[index], kind, fact.SerializeToString()))
                continue
            if kind is None and not len(UnknownFieldSet(fact)):
                raise ValidationError(f"batch.facts[{index}]", "has no fact kind set")
            # Kinds without a table yet, and kinds newer than this collector
            # (an unknown oneof member arrives as unknown fields): kept verbatim.
            others.append((times[index], kind or "unknown", fact.SerializeToString()))
        if not subs:
            return ValidBatch(
                agent_id,
                msg.seq,
                msg.sent_ms,
                received_ms,
                first_ms,
                last_ms,
                (),
                others,
                zone_rows,
                flow_rows,
                health_rows,
                inventory_rows,
                access_rows,
                listener_rows,
                tier_rows,
            )
    # One C-level pass per field; lists, not tuples: cheaper to build, and marshal takes both.
    columns: list[Any] = [names, *(list(map(getter, subs)) for getter in _FIELD_GETTERS)]
    counters = columns[_COUNTERS]
    rx_bps, tx_bps, utilization = columns[10], columns[11], columns[13]
    # sum() is NaN or inf when any value is: min/max alone would let a NaN through.
    if not (
        max(map(max, counters)) <= INT64_MAX
        and min(columns[9]) >= 1
        and max(columns[9]) <= MAX_INTERVAL_MS
        and min(rx_bps) >= 0.0
        and min(tx_bps) >= 0.0
        and max(rx_bps) <= MAX_BPS
        and max(tx_bps) <= MAX_BPS
        and math.isfinite(sum(rx_bps) + sum(tx_bps))
        and max(columns[12]) <= INT64_MAX  # speed_bps: uint64 on the wire, INTEGER in SQLite
        and min(utilization) >= -1.0
        and max(utilization) <= MAX_UTILIZATION
        and math.isfinite(sum(utilization))
        and min(map(len, names)) >= 1
        and max(map(len, names)) <= MAX_INTERFACE_LEN
        and all(map(str.isprintable, names))
    ):
        for position, row in zip(positions, zip(*columns, strict=True), strict=True):
            _check_sample(row, f"batch.facts[{position}].interface_sample")
        raise ValidationError("batch.facts", "failed validation")  # the per-sample pass must have named it
    columns.insert(0, sample_times)
    return ValidBatch(
        agent_id, msg.seq, msg.sent_ms, received_ms, first_ms, last_ms, columns, others, zone_rows, flow_rows,
        health_rows, inventory_rows, access_rows, listener_rows, tier_rows,
    )  # fmt: skip


ACCOUNTING_METHODS = ("nftables", "capture")


MAX_SENSORS = 32
# uint64 on the wire, INTEGER (signed 64-bit) in SQLite.
_HEALTH_COUNTS = ("rss_bytes", "spool_bytes", "spool_batches", "capture_packets", "capture_drops")
MAX_SENSOR_STATUS = 512


def _health(msg: facts_pb2.AgentHealth, time_ms: int, prefix: str) -> HealthRow:
    if not 0.0 <= msg.cpu_percent <= 100_000.0:  # NaN fails too
        raise ValidationError(f"{prefix}.cpu_percent", f"must be in [0, 100000], got {msg.cpu_percent}")
    for name in _HEALTH_COUNTS:
        if getattr(msg, name) > INT64_MAX:
            raise ValidationError(
                f"{prefix}.{name}", f"{getattr(msg, name)} is out of range (at most {INT64_MAX})"
            )
    if len(msg.sensor_status) > MAX_SENSORS:
        raise ValidationError(
            f"{prefix}.sensor_status", f"has {len(msg.sensor_status)} entries, at most {MAX_SENSORS}"
        )
    sensors = {
        text(name, f"{prefix}.sensor_status", MAX_LABEL_LEN, required=True): text(
            status, f"{prefix}.sensor_status[{name}]", MAX_SENSOR_STATUS
        )
        for name, status in msg.sensor_status.items()
    }
    return HealthRow(
        time_ms, msg.cpu_percent, msg.rss_bytes, msg.spool_bytes, msg.spool_batches, msg.capture_packets,
        msg.capture_drops, json.dumps(sensors, ensure_ascii=False, sort_keys=True),
    )  # fmt: skip


def _zone_traffic(msg: facts_pb2.ZoneTraffic, time_ms: int, prefix: str) -> ZoneTrafficRow:
    zone = text(msg.zone, f"{prefix}.zone", MAX_LABEL_LEN, required=True)
    interface = text(msg.interface, f"{prefix}.interface", MAX_INTERFACE_LEN)
    for name in ("bytes_in", "bytes_out", "packets_in", "packets_out"):
        if getattr(msg, name) > INT64_MAX:
            raise ValidationError(
                f"{prefix}.{name}", f"{getattr(msg, name)} is out of range (at most {INT64_MAX})"
            )
    if not 0 < msg.window_ms <= MAX_INTERVAL_MS:
        raise ValidationError(
            f"{prefix}.window_ms", f"must be in (0, {MAX_INTERVAL_MS}], got {msg.window_ms}"
        )
    if msg.method not in ACCOUNTING_METHODS:
        raise ValidationError(
            f"{prefix}.method", f"must be one of {', '.join(ACCOUNTING_METHODS)}, got {msg.method!r}"
        )
    # proto3 default 0 means "not stated": exact kernel counters see every packet.
    rate = msg.sampling_rate or 1.0
    if not 0.0 < rate <= 1.0:
        raise ValidationError(f"{prefix}.sampling_rate", f"must be in (0, 1], got {msg.sampling_rate}")
    return ZoneTrafficRow(
        time_ms, zone, interface, msg.bytes_in, msg.bytes_out, msg.packets_in, msg.packets_out,
        msg.window_ms, msg.method, rate,
    )  # fmt: skip


def _flow(msg: facts_pb2.Flow, time_ms: int, prefix: str, latest: int) -> FlowRow:
    """Slow path (flows are not the hot kind): every field checked, errors name it."""
    if msg.ip_protocol > 255:
        raise ValidationError(f"{prefix}.ip_protocol", f"must be in [0, 255], got {msg.ip_protocol}")
    addresses = []
    for name in ("local_addr", "remote_addr"):
        value = getattr(msg, name)
        # ipaddress keeps any text after an IPv6 "%" (the zone index): bound and vet it as text.
        text(value, f"{prefix}.{name}", MAX_LABEL_LEN)
        try:
            addresses.append(str(ip_address(value)))
        except ValueError:
            raise ValidationError(f"{prefix}.{name}", f"is not an IP address: {value[:64]!r}") from None
    for name in ("local_port", "remote_port"):
        if getattr(msg, name) > 65535:
            raise ValidationError(f"{prefix}.{name}", f"must be in [0, 65535], got {getattr(msg, name)}")
    for name in ("bytes_out", "bytes_in", "packets_out", "packets_in"):
        if getattr(msg, name) > INT64_MAX:
            raise ValidationError(
                f"{prefix}.{name}", f"{getattr(msg, name)} is out of range (at most {INT64_MAX})"
            )
    _check_time(msg.start_ms, f"{prefix}.start_ms", latest)
    _check_time(msg.end_ms, f"{prefix}.end_ms", latest)
    if msg.start_ms > msg.end_ms:
        raise ValidationError(f"{prefix}.start_ms", f"{msg.start_ms} is after end_ms {msg.end_ms}")
    if msg.tcp_flags > 255:
        raise ValidationError(f"{prefix}.tcp_flags", f"must be in [0, 255], got {msg.tcp_flags}")
    remote_zone = text(msg.remote_zone, f"{prefix}.remote_zone", MAX_LABEL_LEN)
    interface = text(msg.interface, f"{prefix}.interface", MAX_INTERFACE_LEN)
    process = msg.process
    if process.pid < 0:
        raise ValidationError(f"{prefix}.process.pid", f"must be >= 0, got {process.pid}")
    name = text(process.name, f"{prefix}.process.name", MAX_LABEL_LEN)
    user = text(process.user, f"{prefix}.process.user", MAX_LABEL_LEN)
    cmdline = text(process.cmdline, f"{prefix}.process.cmdline", MAX_CMDLINE_LEN)
    return FlowRow(
        time_ms, msg.ip_protocol, addresses[0], msg.local_port, addresses[1], msg.remote_port, interface,
        msg.bytes_out, msg.bytes_in, msg.packets_out, msg.packets_in, msg.start_ms, msg.end_ms,
        msg.tcp_flags, remote_zone, msg.initiated_locally, process.pid, name, user, cmdline,
    )  # fmt: skip


MAX_ACCESS_PORTS = 1024
_ACCESS_COUNTS = ("attempts", "half_open", "resets", "icmp_unreachable", "bytes_in", "bytes_out", "window_ms")
_LISTENER_CHANGES = {
    facts_pb2.ListenerChange.OPENED: "opened",
    facts_pb2.ListenerChange.CLOSED: "closed",
    facts_pb2.ListenerChange.PRESENT: "present",
}


def _access(msg: facts_pb2.AccessSummary, time_ms: int, prefix: str) -> AccessRow:
    """Slow path (a handful per window): every field checked, errors name it."""
    peer = text(msg.peer_addr, f"{prefix}.peer_addr", MAX_LABEL_LEN, required=True)
    if peer != "*":  # the agent's record for peers beyond its bound
        peer = _address_text(peer, f"{prefix}.peer_addr")
    for name in _ACCESS_COUNTS:
        if getattr(msg, name) > INT64_MAX:
            raise ValidationError(
                f"{prefix}.{name}", f"{getattr(msg, name)} is out of range (at most {INT64_MAX})"
            )
    if len(msg.ports) > MAX_ACCESS_PORTS:
        raise ValidationError(f"{prefix}.ports", f"has {len(msg.ports)} ports, at most {MAX_ACCESS_PORTS}")
    for name, value in (("service_port", msg.service_port), *(("ports", p) for p in msg.ports)):
        if value > 65535:
            raise ValidationError(f"{prefix}.{name}", f"must be in [0, 65535], got {value}")
    service = text(msg.service, f"{prefix}.service", MAX_LABEL_LEN)
    if bool(service) != bool(msg.service_port):
        raise ValidationError(f"{prefix}.service", "service and service_port must be set together")
    return AccessRow(
        time_ms, msg.inbound, peer, text(msg.peer_zone, f"{prefix}.peer_zone", MAX_LABEL_LEN),
        text(msg.local_zone, f"{prefix}.local_zone", MAX_LABEL_LEN), msg.attempts, msg.distinct_ports,
        msg.distinct_hosts, msg.half_open, msg.resets, msg.icmp_unreachable, msg.bytes_in, msg.bytes_out,
        msg.window_ms, tuple(sorted(set(msg.ports))), service, msg.service_port,
    )  # fmt: skip


def _listener(msg: facts_pb2.ListenerChange, time_ms: int, prefix: str) -> ListenerRow:
    change = _LISTENER_CHANGES.get(msg.change)
    if change is None:
        raise ValidationError(f"{prefix}.change", f"must be OPENED, CLOSED or PRESENT, got {msg.change}")
    if msg.ip_protocol > 255:
        raise ValidationError(f"{prefix}.ip_protocol", f"must be in [0, 255], got {msg.ip_protocol}")
    if msg.local_port > 65535:
        raise ValidationError(f"{prefix}.local_port", f"must be in [0, 65535], got {msg.local_port}")
    local = _address_text(text(msg.local_addr, f"{prefix}.local_addr", MAX_LABEL_LEN), f"{prefix}.local_addr")
    process = msg.process
    if process.pid < 0:
        raise ValidationError(f"{prefix}.process.pid", f"must be >= 0, got {process.pid}")
    return ListenerRow(
        time_ms, change, msg.ip_protocol, local, msg.local_port, process.pid,
        text(process.name, f"{prefix}.process.name", MAX_LABEL_LEN),
        text(process.user, f"{prefix}.process.user", MAX_LABEL_LEN),
        text(process.cmdline, f"{prefix}.process.cmdline", MAX_CMDLINE_LEN),
    )  # fmt: skip


MAX_INVENTORY_ITEMS = 4096  # per list of an inventory fact
MAX_RESOLVERS = 64
MAX_POLICY_LEN = 1024
_INVENTORY_LISTS = ("addresses_added", "addresses_removed", "routes_added", "routes_removed")


def _inventory(msg: facts_pb2.Inventory, time_ms: int, prefix: str) -> InventoryRow:
    """Slow path (a few a day per host): every entry checked and normalized, errors name it."""
    for name in _INVENTORY_LISTS:
        if len(getattr(msg, name)) > MAX_INVENTORY_ITEMS:
            raise ValidationError(
                f"{prefix}.{name}", f"has {len(getattr(msg, name))} entries, at most {MAX_INVENTORY_ITEMS}"
            )
    if msg.full:
        for name in ("addresses_removed", "routes_removed"):
            if getattr(msg, name):
                raise ValidationError(
                    f"{prefix}.{name}", "must be empty in a full inventory (it lists everything as added)"
                )
    added, removed = (
        tuple(_address(a, f"{prefix}.{name}[{i}]") for i, a in enumerate(getattr(msg, name)))
        for name in _INVENTORY_LISTS[:2]
    )
    routes_added, routes_removed = (
        tuple(_route(r, f"{prefix}.{name}[{i}]") for i, r in enumerate(getattr(msg, name)))
        for name in _INVENTORY_LISTS[2:]
    )
    if len(msg.dns_resolvers) > MAX_RESOLVERS:
        raise ValidationError(
            f"{prefix}.dns_resolvers", f"has {len(msg.dns_resolvers)} entries, at most {MAX_RESOLVERS}"
        )
    resolvers = [_address_text(v, f"{prefix}.dns_resolvers[{i}]") for i, v in enumerate(msg.dns_resolvers)]
    return InventoryRow(
        time_ms, msg.full, added, removed, routes_added, routes_removed, json.dumps(resolvers),
        text(msg.hostname, f"{prefix}.hostname", MAX_HOSTNAME_LEN),
        text(msg.os_name, f"{prefix}.os_name", MAX_LABEL_LEN),
        text(msg.os_version, f"{prefix}.os_version", MAX_LABEL_LEN),
    )  # fmt: skip


def _address(msg: facts_pb2.Address, prefix: str) -> tuple[str, str]:
    interface = text(msg.interface, f"{prefix}.interface", MAX_INTERFACE_LEN, required=True)
    cidr = text(msg.cidr, f"{prefix}.cidr", MAX_LABEL_LEN, required=True)
    try:
        if "/" not in cidr:
            raise ValueError
        return interface, str(ip_interface(cidr))
    except ValueError:
        raise ValidationError(f"{prefix}.cidr", f"is not an address/prefix length: {cidr[:64]!r}") from None


def _route(msg: facts_pb2.Route, prefix: str) -> tuple[str, str, str, int, int, str]:
    destination = text(msg.destination, f"{prefix}.destination", MAX_LABEL_LEN, required=True)
    try:
        if "/" not in destination:
            raise ValueError
        destination = str(ip_network(destination, strict=False))
    except ValueError:
        raise ValidationError(
            f"{prefix}.destination", f"is not a network/prefix length: {destination[:64]!r}"
        ) from None
    gateway = _address_text(msg.gateway, f"{prefix}.gateway") if msg.gateway else ""
    interface = text(msg.interface, f"{prefix}.interface", MAX_INTERFACE_LEN)
    if not msg.table:  # uint32: at most 2**32 - 1, the kernel's own bound
        raise ValidationError(f"{prefix}.table", "must be >= 1 (254 is the main table)")
    policy = text(msg.policy, f"{prefix}.policy", MAX_POLICY_LEN)
    return destination, gateway, interface, msg.table, msg.metric, policy


def _address_text(value: str, field: str) -> str:
    # ipaddress keeps any text after an IPv6 "%" (the zone index): bound and vet it as text first.
    text(value, field, MAX_LABEL_LEN, required=True)
    try:
        return str(ip_address(value))
    except ValueError:
        raise ValidationError(field, f"is not an IP address: {value[:64]!r}") from None


def _check_time(value: int, field: str, latest: int) -> None:
    if value < MIN_TIME_MS:
        raise ValidationError(field, f"{value} is before 2000-01-01 (agent clock broken?)")
    if value > latest:
        raise ValidationError(field, f"{value} is more than 24 h ahead of the collector's clock")


def _check_sample(values: tuple[Any, ...], prefix: str) -> None:
    """Slow path: raise naming the first bad field of one sample; return if it is fine."""
    name = values[0]
    if not name:
        raise ValidationError(f"{prefix}.interface", "must not be empty")
    text(name, f"{prefix}.interface", MAX_INTERFACE_LEN)
    for field, value in zip(_SAMPLE_FIELDS[1:10], values[_COUNTERS], strict=True):
        if value > INT64_MAX:
            raise ValidationError(f"{prefix}.{field}", f"{value} is out of range (at most {INT64_MAX})")
    if not values[9]:
        raise ValidationError(f"{prefix}.interval_ms", "must be > 0")
    if values[9] > MAX_INTERVAL_MS:
        raise ValidationError(f"{prefix}.interval_ms", f"{values[9]} is longer than a day")
    for field, value in (("rx_bps", values[10]), ("tx_bps", values[11])):
        if not math.isfinite(value):
            raise ValidationError(f"{prefix}.{field}", f"must be a finite number, got {value}")
        if not 0 <= value <= MAX_BPS:
            raise ValidationError(f"{prefix}.{field}", f"must be in [0, {MAX_BPS:g}], got {value}")
    if values[12] > INT64_MAX:
        raise ValidationError(f"{prefix}.speed_bps", f"{values[12]} is out of range (at most {INT64_MAX})")
    if not -1.0 <= values[13] <= MAX_UTILIZATION:
        raise ValidationError(
            f"{prefix}.utilization", f"must be in [0, {MAX_UTILIZATION:g}] or -1 (unknown), got {values[13]}"
        )

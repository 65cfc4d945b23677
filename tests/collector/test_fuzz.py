"""Fuzzing the edge: whatever an agent (or anyone on the network) sends, the collector answers with a
status naming the field, stores nothing it cannot hold, and keeps serving.

In-process properties run validate.py and trust.py directly against generated messages; the rest
feeds the same generators to real collectors. Every generator is derandomized, so a run in CI sends
the same shapes every time.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import sqlite3
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import grpc
import pytest
from conftest import Collector, Stream, now_ms, run_cli, sample
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from agent import enroll_keys
from agent.wire import REPORT_METHOD, batch_request
from collector import pki, validate
from collector.errors import ValidationError
from collector.ingest import Ingest
from collector.model import ValidBatch
from collector.servicer import Unparseable, parse_enroll_request, parse_report_request
from collector.store.enrollment import TokenRefused
from collector.trust import Refusal, Trust
from protos.zonewatch.v1 import agent_pb2, facts_pb2

T = TypeVar("T")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
# The in-process collector's clock (2026-05-28): the generators draw times around it.
NOW = 1_780_000_000_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
ENROLL = "/zonewatch.v1.AgentService/Enroll"

# Bounded and deterministic: the same examples on every run, no example database on disk.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- values ------------------------------------------------------------------------------------

_PRINTABLE = st.characters(exclude_categories=("C", "Z")) | st.just(" ")


def labels(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(_PRINTABLE, min_size=min_size, max_size=max_size)


IFNAMES = st.text(st.sampled_from(string.ascii_lowercase + string.digits + ".-_"), min_size=1, max_size=15)
AGENT_IDS = st.text(st.sampled_from(string.ascii_letters + string.digits + "-_."), min_size=1, max_size=40)
# Anything a str can hold, control characters, long ones (more bytes than characters), and the
# usual suspects by name.
WILD_TEXT = st.one_of(
    st.text(max_size=50),
    st.text(st.characters(codec="ascii"), max_size=50),
    st.integers(0, 5_000).map(lambda n: "é" * n),
    st.sampled_from(
        ["", " ", "\x00", "\x7f", "\x1b[31m", "a\nb", "\u2028", "\u200b", "\ufeff", "e\u0301", "\U0001f600",
         "公安专网", "eth0\t"]
    ),
)  # fmt: skip
# Beyond int64 gets its own branch: SQLite's INTEGER ends there, a uint64 does not.
UINT64 = st.one_of(
    st.integers(INT64_MAX + 1, UINT64_MAX),
    st.sampled_from([0, 1, INT64_MAX, INT64_MAX + 1, UINT64_MAX]),
    st.integers(0, UINT64_MAX),
)
INT64 = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, -1, 0, INT64_MAX])
UINT32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 255, 256, 65_535, 65_536, 2**32 - 1])
INT32 = st.integers(-(2**31), 2**31 - 1)
DOUBLE = st.floats() | st.sampled_from(
    [math.nan, -math.nan, math.inf, -math.inf, -0.0, -1.0, math.nextafter(-1.0, -2.0), 5e-324, 1e308,
     validate.MAX_BPS, math.nextafter(validate.MAX_BPS, math.inf), validate.MAX_UTILIZATION + 0.5]
)  # fmt: skip
COUNTS = st.integers(0, 10**12)
VALID_ADDR = st.ip_addresses().map(str)
WILD_ADDR = st.one_of(
    WILD_TEXT,
    st.sampled_from(
        ["172.20.1.999", "1.2.3", "01.2.3.4", " 10.0.0.1", "10.0.0.1\n", "::ffff:1.2.3.4", "fe80::1%eth0",
         "fe80::1%\x1b[31m", "fe80::1%" + "x" * 5_000, "1.2.3.4%eth0", "::", "0.0.0.0"]
    ),
    # IPv6 with a zone index: ipaddress takes any text after the "%".
    st.builds("{}%{}".format, st.ip_addresses(v=6), WILD_TEXT),
    st.builds("{}%{}".format, st.ip_addresses(v=6), st.text(st.characters(codec="ascii"), min_size=1)),
)  # fmt: skip


def times(now: int) -> st.SearchStrategy[int]:
    """Observation times that are fine: the last ten minutes."""
    return st.integers(now - 600_000, now)


def wild_times(now: int) -> st.SearchStrategy[int]:
    """Times anywhere, and right at the edges of what validation allows."""
    edges = [0, -1, validate.MIN_TIME_MS - 1, validate.MIN_TIME_MS, now + validate.MAX_FUTURE_MS,
             now + validate.MAX_FUTURE_MS + 1, now - 2 * 3_600_000]  # fmt: skip
    return INT64 | st.integers(now - 20 * 365 * 86_400_000, now + 30 * 86_400_000) | st.sampled_from(edges)


class _Fields:
    """Draws a message's fields: each valid, except (when ``wild``) one or two picked to be wild.

    Few bad fields at a time reach every check; wild values in every field would only ever
    reach the first.
    """

    def __init__(self, draw: st.DrawFn, wild: bool, message: type[Message]) -> None:
        self._draw = draw
        names = [f.name for f in message.DESCRIPTOR.fields]
        self.bad = draw(st.sets(st.sampled_from(names), min_size=1, max_size=2)) if wild else set()

    def __call__(self, name: str, valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
        return self._draw(wild if name in self.bad else valid)


# --- facts ---------------------------------------------------------------------------------------


@st.composite
def interface_samples(draw: st.DrawFn, wild: bool) -> facts_pb2.InterfaceSample:
    v = _Fields(draw, wild, facts_pb2.InterfaceSample)
    counters = {
        name: v(name, COUNTS, UINT64)
        for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors",
                     "rx_drops", "tx_drops")
    }  # fmt: skip
    return facts_pb2.InterfaceSample(
        interface=v("interface", IFNAMES, WILD_TEXT),
        **counters,
        interval_ms=v("interval_ms", st.integers(1, validate.MAX_INTERVAL_MS), UINT64),
        rx_bps=v("rx_bps", st.floats(0, 1e10), DOUBLE),
        tx_bps=v("tx_bps", st.floats(0, 1e10), DOUBLE),
        speed_bps=v("speed_bps", st.sampled_from([0, 10**8, 10**9, 10**10, 4 * 10**11]), UINT64),
        utilization=v("utilization", st.just(-1.0) | st.floats(0, 2), DOUBLE),
        counter_reset=draw(st.booleans()),
    )


@st.composite
def zone_traffic(draw: st.DrawFn, wild: bool) -> facts_pb2.ZoneTraffic:
    v = _Fields(draw, wild, facts_pb2.ZoneTraffic)
    return facts_pb2.ZoneTraffic(
        zone=v("zone", labels(1), WILD_TEXT),
        interface=v("interface", st.just("") | IFNAMES, WILD_TEXT),
        bytes_in=v("bytes_in", COUNTS, UINT64),
        bytes_out=v("bytes_out", COUNTS, UINT64),
        packets_in=v("packets_in", COUNTS, UINT64),
        packets_out=v("packets_out", COUNTS, UINT64),
        window_ms=v("window_ms", st.integers(1, validate.MAX_INTERVAL_MS), UINT64),
        method=v("method", st.sampled_from(validate.ACCOUNTING_METHODS), WILD_TEXT),
        sampling_rate=v("sampling_rate", st.just(0.0) | st.floats(0, 1, exclude_min=True), DOUBLE),
    )


@st.composite
def processes(draw: st.DrawFn, wild: bool) -> facts_pb2.ProcessRef:
    v = _Fields(draw, wild, facts_pb2.ProcessRef)
    return facts_pb2.ProcessRef(
        pid=v("pid", st.integers(0, 2**22), INT32),
        name=v("name", labels(), WILD_TEXT),
        user=v("user", labels(), WILD_TEXT),
        cmdline=v("cmdline", labels(max_size=200), WILD_TEXT),
    )


@st.composite
def flows(draw: st.DrawFn, now: int, wild: bool) -> facts_pb2.Flow:
    v = _Fields(draw, wild, facts_pb2.Flow)
    end = v("end_ms", times(now), wild_times(now))
    earliest = max(end - 600_000, validate.MIN_TIME_MS)
    start = st.integers(earliest, end) if earliest <= end else st.just(end)
    return facts_pb2.Flow(
        ip_protocol=v("ip_protocol", st.integers(0, 255), UINT32),
        local_addr=v("local_addr", VALID_ADDR, WILD_ADDR),
        local_port=v("local_port", st.integers(0, 65_535), UINT32),
        remote_addr=v("remote_addr", VALID_ADDR, WILD_ADDR),
        remote_port=v("remote_port", st.integers(0, 65_535), UINT32),
        interface=v("interface", st.just("") | IFNAMES, WILD_TEXT),
        bytes_out=v("bytes_out", COUNTS, UINT64),
        bytes_in=v("bytes_in", COUNTS, UINT64),
        packets_out=v("packets_out", COUNTS, UINT64),
        packets_in=v("packets_in", COUNTS, UINT64),
        start_ms=v("start_ms", start, wild_times(now)),
        end_ms=end,
        tcp_flags=v("tcp_flags", st.integers(0, 255), UINT32),
        remote_zone=v("remote_zone", labels(), WILD_TEXT),
        initiated_locally=draw(st.booleans()),
        process=v("process", st.none() | processes(False), processes(True)),
    )


@st.composite
def agent_health(draw: st.DrawFn, wild: bool) -> facts_pb2.AgentHealth:
    v = _Fields(draw, wild, facts_pb2.AgentHealth)
    sensors = st.dictionaries(labels(1), labels(max_size=80), max_size=5)
    wild_sensors = st.dictionaries(WILD_TEXT, WILD_TEXT, max_size=5) | st.dictionaries(
        labels(1, 10),
        labels(max_size=5),
        min_size=validate.MAX_SENSORS + 1,
        max_size=validate.MAX_SENSORS + 3,
    )
    return facts_pb2.AgentHealth(
        cpu_percent=v("cpu_percent", st.floats(0, 800), DOUBLE),
        rss_bytes=v("rss_bytes", COUNTS, UINT64),
        spool_bytes=v("spool_bytes", COUNTS, UINT64),
        spool_batches=v("spool_batches", COUNTS, UINT64),
        capture_packets=v("capture_packets", COUNTS, UINT64),
        capture_drops=v("capture_drops", COUNTS, UINT64),
        policy_version=v("policy_version", labels(), WILD_TEXT),
        sensor_status=v("sensor_status", sensors, wild_sensors),
    )


@st.composite
def access_summaries(draw: st.DrawFn, wild: bool) -> facts_pb2.AccessSummary:
    v = _Fields(draw, wild, facts_pb2.AccessSummary)
    # An admin service is named together with its port, or neither is set.
    service, port = draw(st.just(("", 0)) | st.tuples(labels(1, 20), st.integers(1, 65_535)))
    return facts_pb2.AccessSummary(
        peer_addr=v("peer_addr", VALID_ADDR | st.just("*"), WILD_ADDR),
        peer_zone=v("peer_zone", labels(), WILD_TEXT),
        local_zone=v("local_zone", labels(), WILD_TEXT),
        inbound=draw(st.booleans()),
        **{name: v(name, COUNTS, UINT64) for name in ("attempts", "half_open", "resets", "icmp_unreachable",
                                                       "bytes_in", "bytes_out", "window_ms")},
        distinct_ports=draw(UINT32),
        distinct_hosts=draw(UINT32),
        ports=v("ports", st.lists(st.integers(0, 65_535), max_size=64),
                st.lists(UINT32, min_size=1, max_size=8)
                | st.lists(st.just(1), min_size=1025, max_size=1030)),
        service=v("service", st.just(service), WILD_TEXT),
        service_port=v("service_port", st.just(port), UINT32),
    )  # fmt: skip


@st.composite
def listener_changes(draw: st.DrawFn, wild: bool) -> facts_pb2.ListenerChange:
    v = _Fields(draw, wild, facts_pb2.ListenerChange)
    return facts_pb2.ListenerChange(
        change=v("change", st.integers(1, 3), INT32),
        ip_protocol=v("ip_protocol", st.sampled_from([6, 17]), UINT32),
        local_addr=v("local_addr", VALID_ADDR, WILD_ADDR),
        local_port=v("local_port", st.integers(0, 65_535), UINT32),
        process=v("process", processes(False), processes(True)),
    )


CIDRS = st.ip_addresses().flatmap(lambda a: st.integers(0, a.max_prefixlen).map(lambda n: f"{a}/{n}"))
_ADDRESSES = st.builds(facts_pb2.Address, interface=IFNAMES, cidr=CIDRS)
_WILD_ADDRESSES = st.builds(facts_pb2.Address, interface=WILD_TEXT, cidr=WILD_ADDR)
_ROUTES = st.builds(
    facts_pb2.Route, destination=CIDRS, gateway=st.just("") | VALID_ADDR, interface=st.just("") | IFNAMES,
    table=st.integers(1, 2**32 - 1), metric=UINT32, policy=labels(),
)  # fmt: skip
_WILD_ROUTES = st.builds(
    facts_pb2.Route, destination=WILD_ADDR, gateway=WILD_ADDR, interface=WILD_TEXT, table=UINT32,
    metric=UINT32, policy=WILD_TEXT,
)  # fmt: skip


@st.composite
def inventories(draw: st.DrawFn, wild: bool) -> facts_pb2.Inventory:
    v = _Fields(draw, wild, facts_pb2.Inventory)
    full = draw(st.booleans())  # a full one lists everything as added: its removed lists are empty

    def items(name: str, valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        removed = name.endswith("_removed")
        return v(name, st.just([]) if full and removed else st.lists(valid, max_size=3),
                 st.lists(bad, min_size=1, max_size=3))  # fmt: skip

    return facts_pb2.Inventory(
        full=full,
        addresses_added=items("addresses_added", _ADDRESSES, _WILD_ADDRESSES),
        addresses_removed=items("addresses_removed", _ADDRESSES, _WILD_ADDRESSES),
        routes_added=items("routes_added", _ROUTES, _WILD_ROUTES),
        routes_removed=items("routes_removed", _ROUTES, _WILD_ROUTES),
        dns_resolvers=v(
            "dns_resolvers", st.lists(VALID_ADDR, max_size=3), st.lists(WILD_ADDR, min_size=1, max_size=3)
        ),
        hostname=v("hostname", labels(), WILD_TEXT),
        os_name=v("os_name", labels(), WILD_TEXT),
        os_version=v("os_version", labels(), WILD_TEXT),
    )


# Kinds the collector keeps verbatim: nothing in them is checked, so anything goes.
_VERBATIM: dict[str, st.SearchStrategy[Any]] = {
    "data_loss": st.builds(
        facts_pb2.DataLoss, reason=WILD_TEXT, facts=UINT64, first_seq=UINT64, last_seq=UINT64,
        from_ms=INT64, to_ms=INT64,
    ),
}  # fmt: skip
FACT_KINDS = [
    "interface_sample",
    "zone_traffic",
    "flow",
    "agent_health",
    "inventory",
    "access_summary",
    "listener_change",
    *_VERBATIM,
    "unknown",
    "none",
]


VALIDATED_KINDS = FACT_KINDS[:7]


@st.composite
def facts(draw: st.DrawFn, now: int, wild: bool, kinds: Sequence[str] = ()) -> facts_pb2.Fact:
    kind = draw(st.sampled_from(kinds or (FACT_KINDS if wild else FACT_KINDS[:-1])))
    # A wild fact has a wild time, wild content, or both.
    bad = draw(st.sampled_from(["content", "content", "time", "both"])) if wild else ""
    fact = facts_pb2.Fact(time_ms=draw(wild_times(now) if bad in ("time", "both") else times(now)))
    content = bad in ("content", "both")
    if kind == "interface_sample":
        fact.interface_sample.CopyFrom(draw(interface_samples(content)))
    elif kind == "zone_traffic":
        fact.zone_traffic.CopyFrom(draw(zone_traffic(content)))
    elif kind == "flow":
        fact.flow.CopyFrom(draw(flows(now, content)))
    elif kind == "agent_health":
        fact.agent_health.CopyFrom(draw(agent_health(content)))
    elif kind == "inventory":
        fact.inventory.CopyFrom(draw(inventories(content)))
    elif kind == "access_summary":
        fact.access_summary.CopyFrom(draw(access_summaries(content)))
    elif kind == "listener_change":
        fact.listener_change.CopyFrom(draw(listener_changes(content)))
    elif kind in _VERBATIM:
        getattr(fact, kind).CopyFrom(draw(_VERBATIM[kind]))
    elif kind == "unknown":  # a newer agent's kind: a field number this collector does not know
        number = draw(st.integers(21, 2**29 - 1))  # 18..20: the tier facts (collector/upstream/wire.py)
        payload = draw(st.binary(max_size=40))
        fact.MergeFromString(_varint(number << 3 | 2) + _varint(len(payload)) + payload)
    return fact  # "none": a fact of no kind at all


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def batches(draw: st.DrawFn, now: int, wild: bool) -> agent_pb2.Batch:
    v = _Fields(draw, wild, agent_pb2.Batch)
    fact = st.booleans().flatmap(lambda bad: facts(now, bad)) if wild else facts(now, False)
    listed = v(
        "facts",
        st.lists(fact, max_size=6)
        | st.lists(interface_samples(False), min_size=1, max_size=30).map(
            lambda samples: [facts_pb2.Fact(time_ms=now, interface_sample=s) for s in samples]
        ),
        st.lists(fact, max_size=6)
        | st.lists(fact, min_size=1, max_size=3).map(lambda few: few * 4)
        | st.lists(facts(now, True), max_size=6),
    )
    return agent_pb2.Batch(
        seq=v("seq", st.integers(1, 10**6), UINT64),
        sent_ms=v("sent_ms", times(now), wild_times(now)),
        facts=listed,
    )


@st.composite
def one_bad_fact(draw: st.DrawFn, now: int, kind: str) -> agent_pb2.Batch:
    """A clean batch but for one fact of ``kind`` with one or two wild fields."""
    listed = draw(st.lists(facts(now, False), max_size=3))
    bad = facts_pb2.Fact(time_ms=draw(times(now)))
    strategy = {
        "interface_sample": interface_samples(True),
        "zone_traffic": zone_traffic(True),
        "flow": flows(now, True),
        "agent_health": agent_health(True),
        "inventory": inventories(True),
        "access_summary": access_summaries(True),
        "listener_change": listener_changes(True),
    }[kind]
    getattr(bad, kind).CopyFrom(draw(strategy))
    listed.insert(draw(st.integers(0, len(listed))), bad)
    return agent_pb2.Batch(seq=draw(st.integers(1, 10**6)), sent_ms=now, facts=listed)


@st.composite
def hellos(draw: st.DrawFn, now: int, wild: bool) -> agent_pb2.Hello:
    v = _Fields(draw, wild, agent_pb2.Hello)
    host_labels = st.builds(
        agent_pb2.HostLabels, department=labels(), county=labels(), site=labels(), role=labels()
    )
    wild_labels = st.builds(
        agent_pb2.HostLabels, department=WILD_TEXT, county=WILD_TEXT, site=WILD_TEXT, role=WILD_TEXT
    )
    return agent_pb2.Hello(
        agent_id=v("agent_id", AGENT_IDS, WILD_TEXT),
        hostname=v("hostname", labels(1), WILD_TEXT),
        agent_version=v("agent_version", labels(), WILD_TEXT),
        labels=v("labels", host_labels, wild_labels),
        policy_version=v("policy_version", labels(), WILD_TEXT),
        time_ms=v("time_ms", st.just(0) | times(now), wild_times(now)),
    )


def report_requests(now: int) -> st.SearchStrategy[agent_pb2.ReportRequest]:
    """Hellos and batches, clean ones and ones with one or two wild fields; and the empty request."""
    return st.booleans().flatmap(
        lambda wild: st.one_of(
            hellos(now, wild).map(lambda hello: agent_pb2.ReportRequest(hello=hello)),
            batches(now, wild).map(lambda batch: agent_pb2.ReportRequest(batch=batch)),
            st.just(agent_pb2.ReportRequest()),
        )
    )


# --- mutations of serialized messages ----------------------------------------------------------

# Each is invalid UTF-8 however much of it fits (a lone continuation byte, an overlong form, an
# encoded surrogate, beyond U+10FFFF, a byte never used).
_NOT_UTF8 = [b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff"]


def _strings(message: Message) -> Iterator[str]:
    """Every non-empty string in a message, map keys and values included."""
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield from (s for item in value.items() for s in item if isinstance(s, str) and s)
        elif field.message_type is not None:
            for sub in value if field.is_repeated else [value]:
                yield from _strings(sub)
        elif field.type == field.TYPE_STRING:
            yield from (s for s in (value if field.is_repeated else [value]) if s)


def _damage(draw: st.DrawFn, data: bytearray, strings: Sequence[str] = ()) -> bytes:
    """One to four damages: bit flips, cuts, insertions, deletions, invalid UTF-8 over a string."""
    for _ in range(draw(st.integers(1, 4))):
        damage = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "utf8", "utf8"]))
        if damage == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif damage == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif damage == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif damage == "delete" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 8))]
        elif damage == "utf8" and strings:
            encoded = draw(st.sampled_from(strings)).encode()
            at = data.find(encoded)
            if at >= 0:
                bad = draw(st.sampled_from(_NOT_UTF8))[: len(encoded)]
                data[at : at + len(bad)] = bad
    return bytes(data)


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[Message]) -> bytes:
    """A message's wire bytes, damaged."""
    message = draw(messages)
    return _damage(draw, bytearray(message.SerializeToString()), sorted(set(_strings(message))))


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    return _damage(draw, bytearray(data))


# --- the properties ----------------------------------------------------------------------------


def assert_storable(value: Any, path: str = "result") -> None:
    """Only what SQLite holds as it is: int64, finite floats, printable UTF-8 text, bytes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            assert_storable(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            assert_storable(item, f"{path}[{index}]")
    elif isinstance(value, bool) or value is None or isinstance(value, bytes):
        pass
    elif isinstance(value, int):
        assert INT64_MIN <= value <= INT64_MAX, f"{path} = {value} does not fit SQLite's INTEGER"
    elif isinstance(value, float):
        assert math.isfinite(value), f"{path} = {value} is not a finite number"
    elif isinstance(value, str):
        value.encode("utf-8")  # raises on a lone surrogate
        # What operators read in tables and terminals: no escape sequences, no line breaks.
        assert value.isprintable(), f"{path} = {value[:80]!r} contains control characters"
    else:
        raise AssertionError(f"{path} is a {type(value).__name__}, not a value the store knows")


def outcome(check: Callable[[], T]) -> T | ValidationError:
    """A valid record (storable) or a ValidationError naming a field and a status; nothing else."""
    try:
        result = check()
    except ValidationError as exc:
        assert exc.field, f"no field named: {exc!r}"
        assert exc.message, f"no message: {exc!r}"
        assert exc.code in grpc.StatusCode.__members__ and exc.code not in ("OK", "UNKNOWN", "INTERNAL"), exc
        return exc
    assert_storable(result)
    return result


def check_batch(msg: agent_pb2.Batch) -> ValidBatch | ValidationError:
    result = outcome(lambda: validate.batch(msg, "agent-01", NOW))
    if isinstance(result, ValidBatch):
        # Nothing of a valid batch is dropped: every fact is in a table or kept verbatim.
        assert result.fact_count == len(msg.facts)
        assert len({len(column) for column in result.sample_columns}) <= 1
        assert result.first_ms <= result.last_ms
    return result


def check_bytes(data: bytes) -> None:
    parsed = parse_report_request(data)
    if isinstance(parsed, Unparseable):
        assert parsed.error
        return
    assert isinstance(parsed, agent_pb2.ReportRequest)
    if parsed.WhichOneof("body") == "hello":
        outcome(lambda: validate.hello(parsed.hello, NOW))
    elif parsed.WhichOneof("body") == "batch":
        check_batch(parsed.batch)


def _batch_of(*facts_: facts_pb2.Fact) -> agent_pb2.Batch:
    return agent_pb2.Batch(seq=1, sent_ms=NOW, facts=facts_)


def _flow_fact(**changes: Any) -> facts_pb2.Fact:
    values: dict[str, Any] = {
        "local_addr": "10.0.0.1",
        "remote_addr": "10.0.0.2",
        "start_ms": NOW,
        "end_ms": NOW,
    }
    return facts_pb2.Fact(time_ms=NOW, flow=facts_pb2.Flow(**{**values, **changes}))


# Found by these properties, kept as fixed examples.
SPEED_BEYOND_INT64 = _batch_of(
    facts_pb2.Fact(
        time_ms=NOW, interface_sample=facts_pb2.InterfaceSample(**sample(speed_bps=INT64_MAX + 1)._asdict())
    )
)
SCOPED_ADDRESS_WITH_ESCAPES = _batch_of(_flow_fact(remote_addr="fe80::1%\x1b[31m"))
SCOPED_ADDRESS_HUGE = _batch_of(_flow_fact(local_addr="fe80::1%" + "x" * 100_000))


@FUZZ
@given(batch=batches(NOW, True))
@example(batch=SPEED_BEYOND_INT64)
@example(batch=SCOPED_ADDRESS_WITH_ESCAPES)
@example(batch=SCOPED_ADDRESS_HUGE)
def test_batch_validation_returns_a_storable_batch_or_names_the_field(batch: agent_pb2.Batch) -> None:
    check_batch(batch)


@pytest.mark.parametrize("kind", VALIDATED_KINDS)
@FUZZ
@given(data=st.data())
def test_every_field_check_names_its_field(kind: str, data: st.DataObject) -> None:
    refused = check_batch(data.draw(one_bad_fact(NOW, kind)))
    if isinstance(refused, ValidationError):
        assert f".{kind}." in refused.field, refused


def test_the_fixed_examples_are_refused_naming_the_field() -> None:
    for batch, field in [
        (SPEED_BEYOND_INT64, "batch.facts[0].interface_sample.speed_bps"),
        (SCOPED_ADDRESS_WITH_ESCAPES, "batch.facts[0].flow.remote_addr"),
        (SCOPED_ADDRESS_HUGE, "batch.facts[0].flow.local_addr"),
    ]:
        refused = check_batch(batch)
        assert isinstance(refused, ValidationError) and refused.field == field, refused


def test_clean_batches_are_mostly_valid() -> None:
    """The generators are worth something only if clean batches pass: else every property above
    tests the first check and nothing behind it."""
    drawn = _drawn(batches(NOW, False), 100)
    refused = [r for r in map(check_batch, drawn) if isinstance(r, ValidationError)]
    assert len(refused) <= len(drawn) // 20, refused[:5]


@FUZZ
@given(hello=hellos(NOW, True))
def test_hello_validation_returns_a_storable_hello_or_names_the_field(hello: agent_pb2.Hello) -> None:
    outcome(lambda: validate.hello(hello, NOW))


@FUZZ
@given(data=st.binary(max_size=2_000))
def test_random_bytes_parse_or_are_unparseable(data: bytes) -> None:
    check_bytes(data)


@FUZZ
@given(data=mutated(report_requests(NOW)))
def test_damaged_messages_parse_or_are_unparseable(data: bytes) -> None:
    check_bytes(data)


@FUZZ
@given(data=st.binary(max_size=2_000) | mutated(report_requests(NOW)))
def test_enroll_requests_parse_or_are_unparseable(data: bytes) -> None:
    parsed = parse_enroll_request(data)
    assert isinstance(parsed, (Unparseable, agent_pb2.EnrollRequest))


# --- enrollment, in process --------------------------------------------------------------------


def _csr(key: Any, algorithm: hashes.SHA256 | hashes.SHA384 | None) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return request.public_bytes(serialization.Encoding.PEM)


GOOD_CSR = enroll_keys.make_csr(ec.generate_private_key(ec.SECP256R1()), "fuzz-host")
OTHER_CSRS = [
    _csr(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    _csr(ec.generate_private_key(ec.SECP521R1()), hashes.SHA256()),
    _csr(ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),
    _csr(ed25519.Ed25519PrivateKey.generate(), None),
    _csr(rsa.generate_private_key(public_exponent=65_537, key_size=1024), hashes.SHA256()),
]
TOKEN_CHARS = string.ascii_letters + string.digits + "_-"
# Shaped like a token (so they pass the format check), known to no collector.
TOKENS = st.text(st.sampled_from(TOKEN_CHARS), min_size=36, max_size=96).map(pki.TOKEN_PREFIX.__add__)


def _pem(der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [b"-----BEGIN CERTIFICATE REQUEST-----", *lines, b"-----END CERTIFICATE REQUEST-----", b""]
    )


_GOOD_DER = x509.load_pem_x509_csr(GOOD_CSR).public_bytes(serialization.Encoding.DER)
CSRS = st.one_of(
    st.just(GOOD_CSR),
    st.sampled_from(OTHER_CSRS),
    st.binary(max_size=200),
    st.binary(max_size=300).map(_pem),
    damaged(GOOD_CSR),  # damaged armour and base64
    damaged(_GOOD_DER).map(_pem),  # intact armour, damaged ASN.1
    st.integers(pki.MAX_CSR_BYTES - 100, pki.MAX_CSR_BYTES + 100).map(lambda n: GOOD_CSR + b" " * n),
)


@st.composite
def enroll_messages(draw: st.DrawFn) -> agent_pb2.EnrollRequest:
    v = _Fields(draw, True, agent_pb2.EnrollRequest)
    return agent_pb2.EnrollRequest(
        token=v("token", TOKENS, WILD_TEXT | st.just(pki.new_token()) | TOKENS.map(" {} ".format)),
        csr_pem=draw(CSRS),
        hostname=v("hostname", labels(1), WILD_TEXT),
        machine_id=v("machine_id", st.text(st.sampled_from("0123456789abcdef"), max_size=32), WILD_TEXT),
        agent_version=v("agent_version", labels(), WILD_TEXT),
    )


ENROLL_BYTES = st.one_of(
    enroll_messages().map(agent_pb2.EnrollRequest.SerializeToString),
    mutated(enroll_messages()),
    st.binary(max_size=300),
)


class _UnknownTokens:
    """The one part of Ingest that enrollment reaches (with a well-formed token and a good CSR)."""

    async def enroll(self, token_hash: str, **fields: Any) -> NoReturn:
        raise TokenRefused("unknown enrollment token")


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    directory = tmp_path_factory.mktemp("fuzz-pki")
    pki.init_pki(directory)
    return pki.load_pki(directory)


@settings(FUZZ, max_examples=200)
@given(data=ENROLL_BYTES)
def test_enrollment_refuses_with_invalid_argument_or_permission_denied(
    authority: pki.Pki, data: bytes
) -> None:
    # No lockout here: every example reaches the checks behind it.
    trust = Trust(cast(Ingest, _UnknownTokens()), authority, max_failures=10**9)
    request = parse_enroll_request(data)
    if isinstance(request, Unparseable):
        return
    with pytest.raises(Refusal) as refused:
        asyncio.run(trust.enroll(request, "ipv4:127.0.0.1:50000"))
    assert refused.value.code in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), refused.value
    assert refused.value.message


# --- against real collectors -------------------------------------------------------------------


def _drawn(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """``count`` examples of ``strategy``, the same shapes on every run: for feeding a live collector."""
    found: list[T] = []

    @settings(FUZZ, max_examples=count, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: T) -> None:
        found.append(value)

    collect()
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("fuzz") / "collector.db")
    yield c
    c.stop()


def _pipelined(
    server: Collector, stream: Stream, requests: Sequence[bytes]
) -> list[agent_pb2.ReportResponse]:
    """Send every request before reading an answer: the collector keeps many in flight."""
    for data in requests:
        stream.requests.put(data)
    replies = []
    try:
        for _ in requests:
            replies.append(next(stream.responses))
    except grpc.RpcError as exc:
        raise AssertionError(
            f"the stream ended after {len(replies)} of {len(requests)} answers: {exc}\n{server.log()}"
        ) from exc
    return replies


def _count(db: Path, sql: str, *args: Any) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (value,) = con.execute(sql, args).fetchone()
        return int(value)
    finally:
        con.close()


def stored(db: Path, agent_id: str) -> tuple[int, int, int]:
    """(stored batches, interface samples, rejections) of one agent."""
    join = "JOIN agents ON agents.id = {0}.agent WHERE agent_id = ?"
    return (
        _count(db, f"SELECT count(*) FROM batches {join.format('batches')} AND status = 'stored'", agent_id),
        _count(db, f"SELECT count(*) FROM interface_samples {join.format('interface_samples')}", agent_id),
        _count(db, "SELECT count(*) FROM rejections WHERE agent_id = ?", agent_id),
    )


class Expected:
    """What the collector must answer one request, predicted with its own parse and validation."""

    def __init__(self, seq: int, code: int = 0, field: str = "", maybe_valid: bool = False) -> None:
        self.seq = seq
        self.code = code  # 0: an ack
        self.field = field
        # Refused here only for a time over 24 h ahead: the collector's clock, later, may accept it.
        self.maybe_valid = maybe_valid

    def check(self, reply: agent_pb2.ReportResponse, index: int) -> None:
        where = f"request {index}: expected {vars(self)}, got {reply}"
        if reply.WhichOneof("body") == "ack" and (self.code == 0 or self.maybe_valid):
            assert reply.ack.acked_seq == self.seq and not reply.ack.duplicate, where
            return
        assert reply.WhichOneof("body") == "rejection" and self.code != 0, where
        assert (reply.rejection.seq, reply.rejection.code, reply.rejection.field) == (
            self.seq, self.code, self.field
        ) or self.maybe_valid, where  # fmt: skip
        assert reply.rejection.field and reply.rejection.message, where


@st.composite
def stream_requests(draw: st.DrawFn, now: int) -> tuple[str, agent_pb2.ReportRequest | bytes]:
    """(how to number it, the request): mostly batches, some clean, some not; and junk."""
    numbering = draw(st.sampled_from(["next", "next", "next", "gap", "zero", "repeat"]))
    request = draw(
        st.one_of(
            batches(now, False).map(lambda b: agent_pb2.ReportRequest(batch=b)),
            batches(now, True).map(lambda b: agent_pb2.ReportRequest(batch=b)),
            batches(now, True).map(lambda b: agent_pb2.ReportRequest(batch=b)),
            hellos(now, False).map(lambda h: agent_pb2.ReportRequest(hello=h)),
            st.binary(max_size=300),
            mutated(report_requests(now)),
        )
    )
    return numbering, request


def test_fuzzed_batches_on_one_stream_are_each_answered_in_order(server: Collector) -> None:
    agent_id = "fuzz-stream-01"
    now = now_ms()
    requests: list[bytes] = []
    expected: list[Expected] = []
    last = 0  # the collector's "previous batch on this stream"
    for numbering, request in _drawn(stream_requests(now), 200):
        if isinstance(request, agent_pb2.ReportRequest) and request.WhichOneof("body") == "batch":
            request.batch.seq = {
                "next": last + 1, "gap": last + 5, "zero": 0, "repeat": last
            }[numbering]  # fmt: skip
        data = request.SerializeToString() if isinstance(request, agent_pb2.ReportRequest) else request
        parsed = parse_report_request(data)
        if isinstance(parsed, Unparseable):
            expected.append(Expected(0, INVALID, "request"))
        elif parsed.WhichOneof("body") != "batch":
            expected.append(Expected(0, PRECONDITION, "request"))
        elif parsed.batch.seq != 0 and parsed.batch.seq <= last:
            expected.append(Expected(parsed.batch.seq, PRECONDITION, "batch.seq"))
        elif parsed.batch.seq > last + 1_000:
            # Junk that happens to be a batch far ahead would end the numbering; beyond int64 it
            # breaks storage (see the test below).
            continue
        else:
            result = outcome(partial(validate.batch, parsed.batch, agent_id, now))
            if isinstance(result, ValidationError):
                ahead = "ahead of the collector's clock" in result.message
                code = grpc.StatusCode[result.code].value[0]
                expected.append(Expected(parsed.batch.seq, code, result.field, maybe_valid=ahead))
            else:
                expected.append(Expected(parsed.batch.seq))
            if 0 < parsed.batch.seq <= INT64_MAX:
                last = parsed.batch.seq
        requests.append(data)
    acks = sum(e.code == 0 for e in expected)
    assert len(requests) >= 150 and 20 <= acks <= len(requests) - 50, "the mix is not a mix"

    stream = Stream(server.target, agent_id)
    try:
        replies = _pipelined(server, stream, requests)
        for index, (reply, expect) in enumerate(zip(replies, expected, strict=True)):
            expect.check(reply, index)
        # The stream lived through it all.
        assert stream.batch(last + 1).ack.acked_seq == last + 1
    finally:
        stream.close()
    assert server.proc.poll() is None, server.log()
    batches_, _, rejections = stored(server.db, agent_id)
    answered_acks = sum(r.WhichOneof("body") == "ack" for r in replies)
    names = {status.value[0]: status.name for status in grpc.StatusCode}
    refused = Counter(names[r.rejection.code] for r in replies if r.WhichOneof("body") == "rejection")
    print(f"{len(replies)} requests on one stream: {answered_acks} acked, refused: {dict(refused)}")
    assert batches_ == answered_acks + 1
    assert rejections == len(replies) - answered_acks, "every rejection is recorded"


def test_a_batch_numbered_beyond_int64_is_rejected_in_band(collector: Collector) -> None:
    stream = Stream(collector.target, "beyond-01")
    t = now_ms()
    msg = batch_request(1, t, t, [sample()])
    msg.batch.seq = INT64_MAX + 1
    try:
        reply = stream.send(msg.SerializeToString())
        assert (reply.rejection.code, reply.rejection.field) == (INVALID, "batch.seq"), reply
        assert stream.batch(1).ack.acked_seq == 1
    finally:
        stream.close()


def test_garbage_as_the_first_message_is_refused_and_the_collector_serves_on(server: Collector) -> None:
    def not_a_hello(data: bytes) -> bool:
        parsed = parse_report_request(data)
        return isinstance(parsed, Unparseable) or parsed.WhichOneof("body") != "hello"

    garbage = [b"", b"\xff" * 16, *_drawn(st.binary(max_size=200).filter(not_a_hello), 20)]
    t = now_ms()
    garbage.append(batch_request(1, t, t, [sample()]).SerializeToString()[:-3])
    channel = grpc.insecure_channel(server.target)
    try:
        for data in garbage:
            call = channel.stream_stream(REPORT_METHOD, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                next(call(iter([data]), timeout=10))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, data
    finally:
        channel.close()
    assert server.proc.poll() is None, server.log()
    stream = Stream(server.target, "after-garbage-01")
    assert stream.batch(1).ack.acked_seq == 1
    stream.close()


def test_a_captured_batch_replayed_is_stored_once(server: Collector) -> None:
    agent_id = "replayer-fuzz-01"
    t = now_ms()
    captured = batch_request(1, t, t, [sample(interface=f"eth{i}") for i in range(3)]).SerializeToString()
    started = time.monotonic()
    first = Stream(server.target, agent_id)
    try:
        assert first.send(captured).ack.acked_seq == 1
        # On one stream an agent never sends a sequence twice: each replay is refused in band,
        # and the stream goes on.
        replies = _pipelined(server, first, [captured] * 1_000)
        assert {(r.rejection.seq, r.rejection.code, r.rejection.field) for r in replies} == {
            (1, PRECONDITION, "batch.seq")
        }
    finally:
        first.close()
    for _ in range(10):
        # A reconnecting agent resends what it thinks unacknowledged: acked as a duplicate.
        again = Stream(server.target, agent_id)
        try:
            assert again.welcome.welcome.acked_seq == 1
            reply = again.send(captured)
            assert reply.ack.duplicate and reply.ack.acked_seq == 1, reply
            replies = _pipelined(server, again, [captured] * 99)
            assert all(r.rejection.code == PRECONDITION for r in replies)
        finally:
            again.close()
    elapsed = time.monotonic() - started
    print(f"2,001 copies of one batch over 11 streams answered in {elapsed:.2f} s")
    assert server.proc.poll() is None, server.log()
    assert stored(server.db, agent_id) == (1, 3, 1_000 + 10 * 99)
    assert elapsed < 30


# --- enrollment on a real collector ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    db = tmp_path_factory.mktemp("fuzz-tls") / "collector.db"
    run_cli("zonewatch-collector", "init", "--db", str(db))
    c = Collector(db, tls=True)
    yield c
    c.stop()


def test_fuzzed_enrollments_get_a_clear_status_and_the_collector_serves_on(tls_server: Collector) -> None:
    ca = (tls_server.db.parent / "pki" / "ca.crt").read_bytes()
    requests = _drawn(ENROLL_BYTES, 50)
    codes: dict[str, int] = {}
    with grpc.secure_channel(
        f"127.0.0.1:{tls_server.enroll_port}",
        grpc.ssl_channel_credentials(ca),
        [("grpc.ssl_target_name_override", pki.SERVER_NAME)],
    ) as channel:
        raw = channel.unary_unary(ENROLL, request_serializer=None, response_deserializer=None)
        for data in [*requests, b"\x0a\x01\xff"]:  # the last: unparseable, still answered when locked out
            with pytest.raises(grpc.RpcError) as info:
                raw(data, timeout=10)
            code = info.value.code()
            assert code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), (data[:200], code, info.value.details())
            codes[code.name] = codes.get(code.name, 0) + 1
    print(f"{len(requests) + 1} enrollments: {codes}")
    assert tls_server.proc.poll() is None, tls_server.log()
    assert codes.get("RESOURCE_EXHAUSTED"), "five failures lock the address out"

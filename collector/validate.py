"""Validation at the edge: protobuf in, typed records out, or a ValidationError naming the field.

This and the servicer are the only collector modules that see protobuf. The
interface-sample path is the hot one (hundreds of thousands a second), so it
pulls every field of a sample into a tuple with one C-level attrgetter call and
checks ranges over whole tuples instead of field by field.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any

from google.protobuf.unknown_fields import UnknownFieldSet

from collector.errors import ValidationError
from collector.model import AgentHello, HostLabels, InterfaceRow, ValidBatch
from protos.zonewatch.v1 import agent_pb2

INT64_MAX = 2**63 - 1
# 2000-01-01: anything earlier is a broken clock, not an observation.
MIN_TIME_MS = 946_684_800_000
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_INTERVAL_MS = 24 * 3600 * 1000
MAX_FACTS_PER_BATCH = 20_000
MAX_ID_LEN = 128
MAX_LABEL_LEN = 128
MAX_HOSTNAME_LEN = 253
MAX_INTERFACE_LEN = 64
# Utilization above 1 happens when a driver under-reports link speed; 1000x is nonsense.
MAX_UTILIZATION = 1000.0

_SAMPLE_FIELDS = (
    "interface",
    "rx_bytes",
    "tx_bytes",
    "rx_packets",
    "tx_packets",
    "rx_errors",
    "tx_errors",
    "rx_drops",
    "tx_drops",
    "interval_ms",
    "rx_bps",
    "tx_bps",
    "speed_bps",
    "utilization",
    "counter_reset",
)
_sample_tuple = attrgetter(*_SAMPLE_FIELDS)
_COUNTERS = slice(1, 10)  # rx_bytes .. interval_ms
_RATES = slice(10, 12)


def _text(value: str, field: str, max_len: int, *, required: bool = False) -> str:
    if required and not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters long, at most {max_len} allowed")
    if not value.isprintable():
        raise ValidationError(field, "contains control characters")
    return value


def hello(msg: agent_pb2.Hello) -> AgentHello:
    agent_id = _text(msg.agent_id, "hello.agent_id", MAX_ID_LEN, required=True)
    if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in agent_id):
        raise ValidationError("hello.agent_id", "may contain only ASCII letters, digits, '-', '_' and '.'")
    labels = msg.labels
    return AgentHello(
        agent_id=agent_id,
        hostname=_text(msg.hostname, "hello.hostname", MAX_HOSTNAME_LEN, required=True),
        agent_version=_text(msg.agent_version, "hello.agent_version", MAX_LABEL_LEN),
        labels=HostLabels(
            department=_text(labels.department, "hello.labels.department", MAX_LABEL_LEN),
            county=_text(labels.county, "hello.labels.county", MAX_LABEL_LEN),
            site=_text(labels.site, "hello.labels.site", MAX_LABEL_LEN),
            role=_text(labels.role, "hello.labels.role", MAX_LABEL_LEN),
        ),
        policy_version=_text(msg.policy_version, "hello.policy_version", MAX_LABEL_LEN),
        time_ms=msg.time_ms,
    )


def batch(msg: agent_pb2.Batch, agent_id: str, received_ms: int) -> ValidBatch:
    """Check one batch completely; nothing of an invalid batch is stored."""
    if msg.seq == 0:
        raise ValidationError("batch.seq", "must be >= 1")
    if msg.seq > INT64_MAX:
        raise ValidationError("batch.seq", f"{msg.seq} is out of range (at most {INT64_MAX})")
    facts = msg.facts
    if len(facts) > MAX_FACTS_PER_BATCH:
        raise ValidationError("batch.facts", f"has {len(facts)} facts, at most {MAX_FACTS_PER_BATCH} allowed")
    latest = received_ms + MAX_FUTURE_MS
    _check_time(msg.sent_ms, "batch.sent_ms", latest)
    rows: list[InterfaceRow] = []
    others: list[tuple[int, str, bytes]] = []
    for index, fact in enumerate(facts):
        time_ms = fact.time_ms
        if not MIN_TIME_MS <= time_ms <= latest:
            _check_time(time_ms, f"batch.facts[{index}].time_ms", latest)
        kind = fact.WhichOneof("kind")
        if kind == "interface_sample":
            values: tuple[Any, ...] = _sample_tuple(fact.interface_sample)
            if (
                max(values[_COUNTERS]) > INT64_MAX
                or not values[9]
                or values[9] > MAX_INTERVAL_MS
                or not 0.0 <= min(values[_RATES]) <= max(values[_RATES]) < math.inf
                or not 0 < len(values[0]) <= MAX_INTERFACE_LEN
                or not values[0].isprintable()
                or not -1.0 <= values[13] <= MAX_UTILIZATION
            ):
                _explain_sample(values, f"batch.facts[{index}].interface_sample")
            rows.append((time_ms, *values))
        elif kind is None and not len(UnknownFieldSet(fact)):
            raise ValidationError(f"batch.facts[{index}]", "has no fact kind set")
        else:
            # Kinds without a table yet, and kinds newer than this collector
            # (an unknown oneof member arrives as unknown fields): kept verbatim.
            others.append((time_ms, kind or "unknown", fact.SerializeToString()))
    return ValidBatch(agent_id, msg.seq, msg.sent_ms, received_ms, rows, others)


def _check_time(value: int, field: str, latest: int) -> None:
    if value < MIN_TIME_MS:
        raise ValidationError(field, f"{value} is before 2000-01-01 (agent clock broken?)")
    if value > latest:
        raise ValidationError(field, f"{value} is more than 24 h ahead of the collector's clock")


def _explain_sample(values: tuple[Any, ...], prefix: str) -> None:
    """Slow path: find which field made the fast check fail, and say so."""
    name = values[0]
    if not name:
        raise ValidationError(f"{prefix}.interface", "must not be empty")
    _text(name, f"{prefix}.interface", MAX_INTERFACE_LEN)
    for field, value in zip(_SAMPLE_FIELDS[1:10], values[_COUNTERS], strict=True):
        if value > INT64_MAX:
            raise ValidationError(f"{prefix}.{field}", f"{value} is out of range (at most {INT64_MAX})")
    if not values[9]:
        raise ValidationError(f"{prefix}.interval_ms", "must be > 0")
    if values[9] > MAX_INTERVAL_MS:
        raise ValidationError(f"{prefix}.interval_ms", f"{values[9]} is longer than a day")
    for field, value in (("rx_bps", values[10]), ("tx_bps", values[11])):
        if math.isnan(value) or math.isinf(value):
            raise ValidationError(f"{prefix}.{field}", f"must be a finite number, got {value}")
        if value < 0:
            raise ValidationError(f"{prefix}.{field}", f"must be >= 0, got {value}")
    if not -1.0 <= values[13] <= MAX_UTILIZATION:
        raise ValidationError(
            f"{prefix}.utilization", f"must be in [0, {MAX_UTILIZATION:g}] or -1 (unknown), got {values[13]}"
        )
    raise ValidationError(prefix, "is invalid")  # unreachable unless the fast check and this disagree

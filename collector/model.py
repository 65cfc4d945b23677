"""Typed records the collector works with; protobuf never gets past validate.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class HostLabels(NamedTuple):
    department: str = ""
    county: str = ""
    site: str = ""
    role: str = ""


class AgentHello(NamedTuple):
    agent_id: str
    hostname: str
    agent_version: str
    labels: HostLabels
    policy_version: str
    time_ms: int


# One row of interface_samples, in column order (see store/schema.py). A plain
# tuple on the hot path: built by operator.attrgetter in C, bound by executemany.
InterfaceRow = tuple[
    int,  # time_ms
    str,  # interface
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,  # rx/tx bytes, packets, errors, drops
    int,  # interval_ms
    float,
    float,  # rx_bps, tx_bps
    int,  # speed_bps
    float,  # utilization (negative: unknown)
    bool,  # counter_reset
]


@dataclass(frozen=True, slots=True)
class ValidBatch:
    """A batch that passed validation, ready for the writer."""

    agent_id: str
    seq: int
    sent_ms: int
    received_ms: int
    interface_rows: list[InterfaceRow]
    # Facts of kinds without a table of their own yet (and kinds newer than this
    # collector): kept verbatim as (time_ms, kind, serialized fact), never dropped.
    other_rows: list[tuple[int, str, bytes]]

    @property
    def fact_count(self) -> int:
        return len(self.interface_rows) + len(self.other_rows)


class Settled(NamedTuple):
    """What the writer did with one batch."""

    acked_seq: int
    duplicate: bool
    gap_from: int  # first missing seq before this batch, 0 when none
    gap_to: int

"""Typed records the collector works with; protobuf never gets past validate.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


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


# The facts of one batch come from one reporting window: their times may span at
# most this. Validation refuses wider batches; queries rely on it to bound their
# index ranges on both sides (store/queries.py).
MAX_BATCH_SPAN_MS = 3_600_000

# The interface samples of one batch, column by column: time_ms, interface, the
# eight counters (rx/tx bytes, packets, errors, drops), interval_ms, rx_bps,
# tx_bps, speed_bps, utilization (negative: unknown), counter_reset. Columns, not
# rows: validation checks each with one min/max in C, and the writer zips them
# into rows in C, so the hot path has no per-sample Python loop.
SAMPLE_COLUMNS = (
    "time_ms", "interface",
    "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_drops", "tx_drops",
    "interval_ms", "rx_bps", "tx_bps", "speed_bps", "utilization", "counter_reset",
)  # fmt: skip
SampleColumns = Sequence[Sequence[Any]]


# A zone as stored for queries: name, kind, direction, department, networks
# ("a, b"), capacity_bps.
CatalogRow = tuple[str, str, str, str, str, int]


class ZoneTrafficRow(NamedTuple):
    time_ms: int
    zone: str
    interface: str  # "" = every monitored interface
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    window_ms: int
    method: str  # "nftables" or "capture"
    sampling_rate: float  # 1.0 = every packet seen


class FlowRow(NamedTuple):
    """One closed 5-tuple flow; the process fields are "" / 0 when the agent could not attribute it."""

    time_ms: int
    ip_protocol: int
    local_addr: str  # normalized (ipaddress)
    local_port: int
    remote_addr: str
    remote_port: int
    interface: str
    bytes_out: int
    bytes_in: int
    packets_out: int
    packets_in: int
    start_ms: int
    end_ms: int
    tcp_flags: int
    remote_zone: str
    initiated_locally: bool
    pid: int
    process: str
    user: str
    cmdline: str


class HealthRow(NamedTuple):
    """The agent's own report on itself; the newest one is kept on its agents row."""

    time_ms: int
    cpu_percent: float
    rss_bytes: int
    spool_bytes: int  # what the agent holds that the collector has not acknowledged yet
    spool_batches: int
    capture_packets: int  # packets its capture accepted, dropped ones included
    capture_drops: int  # of those, packets the kernel dropped (ring full)
    sensors: str  # JSON object: sensor -> "on" / "off: <why>" / ...


# Of an inventory fact: (interface, cidr) and (destination, gateway, interface, table, metric,
# policy), normalized by ipaddress. Plain tuples: they cross the pipe to the writer with marshal.
AddressItem = tuple[str, str]
RouteItem = tuple[str, str, str, int, int, str]


class InventoryRow(NamedTuple):
    """The host's network inventory: everything (``full``) or what changed since the last one.

    Whether full or a diff, it carries the host's current resolvers, hostname and OS.
    """

    time_ms: int
    full: bool
    addresses_added: tuple[AddressItem, ...]  # a full one has everything here ...
    addresses_removed: tuple[AddressItem, ...]  # ... and nothing here
    routes_added: tuple[RouteItem, ...]
    routes_removed: tuple[RouteItem, ...]
    dns_resolvers: str  # JSON list of addresses
    hostname: str
    os_name: str
    os_version: str


class AccessRow(NamedTuple):
    """What one remote peer did to this host (inbound) or this host to it (outbound) in one window,
    for one administrative service port (service set) or all other ports (service "")."""

    time_ms: int
    inbound: bool
    peer_addr: str  # normalized (ipaddress); "*" for the agent's overflow record
    peer_zone: str
    local_zone: str
    attempts: int
    distinct_ports: int
    distinct_hosts: int
    half_open: int
    resets: int
    icmp_unreachable: int
    bytes_in: int
    bytes_out: int
    window_ms: int
    ports: tuple[int, ...]
    service: str
    service_port: int


class ListenerRow(NamedTuple):
    """A listening socket that opened, closed, or was there when the agent started (present)."""

    time_ms: int
    change: str  # "opened", "closed", "present"
    ip_protocol: int
    local_addr: str
    local_port: int
    pid: int
    process: str
    user: str
    cmdline: str


@dataclass(frozen=True, slots=True)
class ValidBatch:
    """A batch that passed validation, ready for the writer."""

    agent_id: str
    seq: int
    sent_ms: int
    received_ms: int
    # Time range of the batch's facts (agent clock); sent_ms for an empty batch.
    first_ms: int
    last_ms: int
    # len(SAMPLE_COLUMNS) columns of equal length, or () when the batch has no samples.
    sample_columns: SampleColumns
    # Facts of kinds without a table of their own yet (and kinds newer than this
    # collector): kept verbatim as (time_ms, kind, serialized fact), never dropped.
    other_rows: list[tuple[int, str, bytes]]
    # Zone traffic facts, one ZoneTrafficRow each (a handful per batch: no hot path).
    zone_rows: list[ZoneTrafficRow] = field(default_factory=list)
    # Flow facts, one FlowRow each.
    flow_rows: list[FlowRow] = field(default_factory=list)
    # Health facts, also kept verbatim in other_facts (so not counted again in fact_count).
    health_rows: list[HealthRow] = field(default_factory=list)
    # Inventory facts, in the batch's order: the writer applies them in that order. Also kept
    # verbatim in other_facts (so not counted again in fact_count): one row per fact, like every kind.
    inventory_rows: list[InventoryRow] = field(default_factory=list)
    # Access summaries and listener changes, for the rule engine; also kept verbatim in other_facts.
    access_rows: list[AccessRow] = field(default_factory=list)
    listener_rows: list[ListenerRow] = field(default_factory=list)
    # Tier facts from a lower-tier collector, as plain tuples (store/tiers.py TierRow); also kept
    # verbatim in other_facts. Stored only when the sender's role is "collector".
    tier_rows: list[tuple[Any, ...]] = field(default_factory=list)
    # The role the sender's certificate was enrolled with (the servicer's admission), set only for a
    # batch with tier rows; "" for a client without one (--insecure), whatever its hello claims.
    sender_role: str = ""

    @property
    def sample_count(self) -> int:
        return len(self.sample_columns[0]) if self.sample_columns else 0

    @property
    def fact_count(self) -> int:
        return self.sample_count + len(self.other_rows) + len(self.zone_rows) + len(self.flow_rows)

    @staticmethod
    def columns_of(rows: Sequence[Sequence[Any]]) -> SampleColumns:
        """Sample rows (in SAMPLE_COLUMNS order) as columns: for callers that think in rows."""
        return tuple(zip(*rows, strict=True)) if rows else ()


class Settled(NamedTuple):
    """What the writer did with one batch."""

    acked_seq: int
    duplicate: bool
    gap_from: int  # first missing seq before this batch, 0 when none
    gap_to: int


@dataclass(frozen=True)
class ZoneInfo:
    kind: str
    direction: str
    admin: bool


@dataclass(frozen=True)
class DetectionConfig:
    """What the server tells the detector: where the rules are, and the zone catalog's judgments."""

    rules_dir: str
    zones: dict[str, ZoneInfo] = field(default_factory=dict)
    # role (or "*") -> zone names and kinds hosts of that role may reach; empty: everything but classified
    access: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_interval_s: float = 10.0
    # A lower tier's copy of its upstream's rules (tiers_policy.py); "" on a top tier.
    upstream_rules_dir: str = ""

    def encode(self) -> tuple[Any, ...]:
        zones = {name: (z.kind, z.direction, z.admin) for name, z in self.zones.items()}
        access = {k: tuple(v) for k, v in self.access.items()}
        return (self.rules_dir, zones, access, self.default_interval_s, self.upstream_rules_dir)

    @classmethod
    def decode(cls, data: Sequence[Any]) -> DetectionConfig:
        rules_dir, zones, access, interval, upstream_rules_dir = data
        return cls(
            rules_dir,
            {name: ZoneInfo(*z) for name, z in zones.items()},
            {k: tuple(v) for k, v in access.items()},
            interval,
            upstream_rules_dir,
        )

    def allows(self, role: str, zone: str) -> bool:
        """The same judgment as ZoneCatalog.allows, from the catalog's summary."""
        info = self.zones.get(zone)
        return zone_allowed(self.access, role, zone, info.kind if info else None)


def zone_allowed(access: dict[str, tuple[str, ...]], role: str, zone: str, kind: str | None) -> bool:
    """May a host of ``role`` reach ``zone`` (of ``kind``; None: in no zone of the catalog, not judged)?

    ``access`` maps a role, or "*" for the roles not listed, to the zone names and kinds it may reach;
    without an entry every zone may be reached. Classified zones never may.
    """
    if kind is None:
        return True
    if kind == "classified":
        return False
    allowed = access.get(role, access.get("*"))
    return allowed is None or zone in allowed or kind in allowed

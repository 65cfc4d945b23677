from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InterfaceSample(_message.Message):
    __slots__ = ("interface", "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_drops", "tx_drops", "interval_ms", "rx_bps", "tx_bps", "speed_bps", "utilization", "counter_reset")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    RX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    RX_DROPS_FIELD_NUMBER: _ClassVar[int]
    TX_DROPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RX_BPS_FIELD_NUMBER: _ClassVar[int]
    TX_BPS_FIELD_NUMBER: _ClassVar[int]
    SPEED_BPS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    COUNTER_RESET_FIELD_NUMBER: _ClassVar[int]
    interface: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_errors: int
    tx_errors: int
    rx_drops: int
    tx_drops: int
    interval_ms: int
    rx_bps: float
    tx_bps: float
    speed_bps: int
    utilization: float
    counter_reset: bool
    def __init__(self, interface: _Optional[str] = ..., rx_bytes: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., rx_packets: _Optional[int] = ..., tx_packets: _Optional[int] = ..., rx_errors: _Optional[int] = ..., tx_errors: _Optional[int] = ..., rx_drops: _Optional[int] = ..., tx_drops: _Optional[int] = ..., interval_ms: _Optional[int] = ..., rx_bps: _Optional[float] = ..., tx_bps: _Optional[float] = ..., speed_bps: _Optional[int] = ..., utilization: _Optional[float] = ..., counter_reset: _Optional[bool] = ...) -> None: ...

class ZoneTraffic(_message.Message):
    __slots__ = ("zone", "interface", "bytes_in", "bytes_out", "packets_in", "packets_out", "window_ms", "method", "sampling_rate")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_IN_FIELD_NUMBER: _ClassVar[int]
    PACKETS_OUT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_RATE_FIELD_NUMBER: _ClassVar[int]
    zone: str
    interface: str
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    window_ms: int
    method: str
    sampling_rate: float
    def __init__(self, zone: _Optional[str] = ..., interface: _Optional[str] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., packets_in: _Optional[int] = ..., packets_out: _Optional[int] = ..., window_ms: _Optional[int] = ..., method: _Optional[str] = ..., sampling_rate: _Optional[float] = ...) -> None: ...

class ProcessRef(_message.Message):
    __slots__ = ("pid", "name", "user", "cmdline")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    user: str
    cmdline: str
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., user: _Optional[str] = ..., cmdline: _Optional[str] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("ip_protocol", "local_addr", "local_port", "remote_addr", "remote_port", "interface", "bytes_out", "bytes_in", "packets_out", "packets_in", "start_ms", "end_ms", "tcp_flags", "remote_zone", "initiated_locally", "process")
    IP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PORT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PORT_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    PACKETS_OUT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_IN_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    TCP_FLAGS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ZONE_FIELD_NUMBER: _ClassVar[int]
    INITIATED_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ip_protocol: int
    local_addr: str
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
    process: ProcessRef
    def __init__(self, ip_protocol: _Optional[int] = ..., local_addr: _Optional[str] = ..., local_port: _Optional[int] = ..., remote_addr: _Optional[str] = ..., remote_port: _Optional[int] = ..., interface: _Optional[str] = ..., bytes_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., packets_out: _Optional[int] = ..., packets_in: _Optional[int] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., tcp_flags: _Optional[int] = ..., remote_zone: _Optional[str] = ..., initiated_locally: _Optional[bool] = ..., process: _Optional[_Union[ProcessRef, _Mapping]] = ...) -> None: ...

class Address(_message.Message):
    __slots__ = ("interface", "cidr")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    interface: str
    cidr: str
    def __init__(self, interface: _Optional[str] = ..., cidr: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway", "interface", "table", "metric", "policy")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    interface: str
    table: int
    metric: int
    policy: str
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ..., interface: _Optional[str] = ..., table: _Optional[int] = ..., metric: _Optional[int] = ..., policy: _Optional[str] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("full", "addresses_added", "addresses_removed", "routes_added", "routes_removed", "dns_resolvers", "hostname", "os_name", "os_version")
    FULL_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_ADDED_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ROUTES_ADDED_FIELD_NUMBER: _ClassVar[int]
    ROUTES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    DNS_RESOLVERS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    OS_NAME_FIELD_NUMBER: _ClassVar[int]
    OS_VERSION_FIELD_NUMBER: _ClassVar[int]
    full: bool
    addresses_added: _containers.RepeatedCompositeFieldContainer[Address]
    addresses_removed: _containers.RepeatedCompositeFieldContainer[Address]
    routes_added: _containers.RepeatedCompositeFieldContainer[Route]
    routes_removed: _containers.RepeatedCompositeFieldContainer[Route]
    dns_resolvers: _containers.RepeatedScalarFieldContainer[str]
    hostname: str
    os_name: str
    os_version: str
    def __init__(self, full: _Optional[bool] = ..., addresses_added: _Optional[_Iterable[_Union[Address, _Mapping]]] = ..., addresses_removed: _Optional[_Iterable[_Union[Address, _Mapping]]] = ..., routes_added: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., routes_removed: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., dns_resolvers: _Optional[_Iterable[str]] = ..., hostname: _Optional[str] = ..., os_name: _Optional[str] = ..., os_version: _Optional[str] = ...) -> None: ...

class ListenerChange(_message.Message):
    __slots__ = ("change", "ip_protocol", "local_addr", "local_port", "process")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[ListenerChange.Change]
        OPENED: _ClassVar[ListenerChange.Change]
        CLOSED: _ClassVar[ListenerChange.Change]
        PRESENT: _ClassVar[ListenerChange.Change]
    CHANGE_UNSPECIFIED: ListenerChange.Change
    OPENED: ListenerChange.Change
    CLOSED: ListenerChange.Change
    PRESENT: ListenerChange.Change
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    IP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PORT_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    change: ListenerChange.Change
    ip_protocol: int
    local_addr: str
    local_port: int
    process: ProcessRef
    def __init__(self, change: _Optional[_Union[ListenerChange.Change, str]] = ..., ip_protocol: _Optional[int] = ..., local_addr: _Optional[str] = ..., local_port: _Optional[int] = ..., process: _Optional[_Union[ProcessRef, _Mapping]] = ...) -> None: ...

class AccessSummary(_message.Message):
    __slots__ = ("peer_addr", "peer_zone", "local_zone", "inbound", "attempts", "distinct_ports", "distinct_hosts", "half_open", "resets", "icmp_unreachable", "bytes_in", "bytes_out", "window_ms", "ports", "service", "service_port")
    PEER_ADDR_FIELD_NUMBER: _ClassVar[int]
    PEER_ZONE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ZONE_FIELD_NUMBER: _ClassVar[int]
    INBOUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_PORTS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_HOSTS_FIELD_NUMBER: _ClassVar[int]
    HALF_OPEN_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    ICMP_UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_PORT_FIELD_NUMBER: _ClassVar[int]
    peer_addr: str
    peer_zone: str
    local_zone: str
    inbound: bool
    attempts: int
    distinct_ports: int
    distinct_hosts: int
    half_open: int
    resets: int
    icmp_unreachable: int
    bytes_in: int
    bytes_out: int
    window_ms: int
    ports: _containers.RepeatedScalarFieldContainer[int]
    service: str
    service_port: int
    def __init__(self, peer_addr: _Optional[str] = ..., peer_zone: _Optional[str] = ..., local_zone: _Optional[str] = ..., inbound: _Optional[bool] = ..., attempts: _Optional[int] = ..., distinct_ports: _Optional[int] = ..., distinct_hosts: _Optional[int] = ..., half_open: _Optional[int] = ..., resets: _Optional[int] = ..., icmp_unreachable: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., window_ms: _Optional[int] = ..., ports: _Optional[_Iterable[int]] = ..., service: _Optional[str] = ..., service_port: _Optional[int] = ...) -> None: ...

class AgentHealth(_message.Message):
    __slots__ = ("cpu_percent", "rss_bytes", "spool_bytes", "spool_batches", "capture_packets", "capture_drops", "policy_version", "sensor_status")
    class SensorStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_PACKETS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_DROPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENSOR_STATUS_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    rss_bytes: int
    spool_bytes: int
    spool_batches: int
    capture_packets: int
    capture_drops: int
    policy_version: str
    sensor_status: _containers.ScalarMap[str, str]
    def __init__(self, cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., spool_batches: _Optional[int] = ..., capture_packets: _Optional[int] = ..., capture_drops: _Optional[int] = ..., policy_version: _Optional[str] = ..., sensor_status: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DataLoss(_message.Message):
    __slots__ = ("reason", "facts", "first_seq", "last_seq", "from_ms", "to_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    facts: int
    first_seq: int
    last_seq: int
    from_ms: int
    to_ms: int
    def __init__(self, reason: _Optional[str] = ..., facts: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., from_ms: _Optional[int] = ..., to_ms: _Optional[int] = ...) -> None: ...

class TierIncident(_message.Message):
    __slots__ = ("origin", "incident_id", "rule_id", "title", "severity", "status", "agent_id", "hostname", "department", "county", "first_seen_ms", "last_seen_ms", "count", "updated_ms", "detail_json")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    COUNTY_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    origin: str
    incident_id: int
    rule_id: str
    title: str
    severity: str
    status: str
    agent_id: str
    hostname: str
    department: str
    county: str
    first_seen_ms: int
    last_seen_ms: int
    count: int
    updated_ms: int
    detail_json: str
    def __init__(self, origin: _Optional[str] = ..., incident_id: _Optional[int] = ..., rule_id: _Optional[str] = ..., title: _Optional[str] = ..., severity: _Optional[str] = ..., status: _Optional[str] = ..., agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., department: _Optional[str] = ..., county: _Optional[str] = ..., first_seen_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ..., count: _Optional[int] = ..., updated_ms: _Optional[int] = ..., detail_json: _Optional[str] = ...) -> None: ...

class TierMigration(_message.Message):
    __slots__ = ("origin", "agent_id", "hostname", "department", "county", "network", "state", "since_ms", "blocker", "updated_ms")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    COUNTY_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCKER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    agent_id: str
    hostname: str
    department: str
    county: str
    network: str
    state: str
    since_ms: int
    blocker: str
    updated_ms: int
    def __init__(self, origin: _Optional[str] = ..., agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., department: _Optional[str] = ..., county: _Optional[str] = ..., network: _Optional[str] = ..., state: _Optional[str] = ..., since_ms: _Optional[int] = ..., blocker: _Optional[str] = ..., updated_ms: _Optional[int] = ...) -> None: ...

class TierRollup(_message.Message):
    __slots__ = ("origin", "zone", "direction", "hour_ms", "rx_bytes", "tx_bytes", "peak_bps", "capacity_bps", "hosts")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    HOUR_MS_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_BPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BPS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    zone: str
    direction: str
    hour_ms: int
    rx_bytes: int
    tx_bytes: int
    peak_bps: int
    capacity_bps: int
    hosts: int
    def __init__(self, origin: _Optional[str] = ..., zone: _Optional[str] = ..., direction: _Optional[str] = ..., hour_ms: _Optional[int] = ..., rx_bytes: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., peak_bps: _Optional[int] = ..., capacity_bps: _Optional[int] = ..., hosts: _Optional[int] = ...) -> None: ...

class Fact(_message.Message):
    __slots__ = ("time_ms", "interface_sample", "zone_traffic", "flow", "inventory", "listener_change", "access_summary", "agent_health", "data_loss", "tier_incident", "tier_migration", "tier_rollup")
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ZONE_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    LISTENER_CHANGE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    AGENT_HEALTH_FIELD_NUMBER: _ClassVar[int]
    DATA_LOSS_FIELD_NUMBER: _ClassVar[int]
    TIER_INCIDENT_FIELD_NUMBER: _ClassVar[int]
    TIER_MIGRATION_FIELD_NUMBER: _ClassVar[int]
    TIER_ROLLUP_FIELD_NUMBER: _ClassVar[int]
    time_ms: int
    interface_sample: InterfaceSample
    zone_traffic: ZoneTraffic
    flow: Flow
    inventory: Inventory
    listener_change: ListenerChange
    access_summary: AccessSummary
    agent_health: AgentHealth
    data_loss: DataLoss
    tier_incident: TierIncident
    tier_migration: TierMigration
    tier_rollup: TierRollup
    def __init__(self, time_ms: _Optional[int] = ..., interface_sample: _Optional[_Union[InterfaceSample, _Mapping]] = ..., zone_traffic: _Optional[_Union[ZoneTraffic, _Mapping]] = ..., flow: _Optional[_Union[Flow, _Mapping]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., listener_change: _Optional[_Union[ListenerChange, _Mapping]] = ..., access_summary: _Optional[_Union[AccessSummary, _Mapping]] = ..., agent_health: _Optional[_Union[AgentHealth, _Mapping]] = ..., data_loss: _Optional[_Union[DataLoss, _Mapping]] = ..., tier_incident: _Optional[_Union[TierIncident, _Mapping]] = ..., tier_migration: _Optional[_Union[TierMigration, _Mapping]] = ..., tier_rollup: _Optional[_Union[TierRollup, _Mapping]] = ...) -> None: ...

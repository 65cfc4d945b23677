from protos.zonewatch.v1 import facts_pb2 as _facts_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "hostname", "machine_id", "agent_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    hostname: str
    machine_id: str
    agent_version: str
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., hostname: _Optional[str] = ..., machine_id: _Optional[str] = ..., agent_version: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "agent_id", "not_after_ms", "labels")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    agent_id: str
    not_after_ms: int
    labels: HostLabels
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., agent_id: _Optional[str] = ..., not_after_ms: _Optional[int] = ..., labels: _Optional[_Union[HostLabels, _Mapping]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class HostLabels(_message.Message):
    __slots__ = ("department", "county", "site", "role")
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    COUNTY_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    department: str
    county: str
    site: str
    role: str
    def __init__(self, department: _Optional[str] = ..., county: _Optional[str] = ..., site: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "hostname", "agent_version", "labels", "policy_version", "time_ms")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    agent_version: str
    labels: HostLabels
    policy_version: str
    time_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., labels: _Optional[_Union[HostLabels, _Mapping]] = ..., policy_version: _Optional[str] = ..., time_ms: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("seq", "sent_ms", "facts")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_MS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_ms: int
    facts: _containers.RepeatedCompositeFieldContainer[_facts_pb2.Fact]
    def __init__(self, seq: _Optional[int] = ..., sent_ms: _Optional[int] = ..., facts: _Optional[_Iterable[_Union[_facts_pb2.Fact, _Mapping]]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("acked_seq", "policy_version", "server_time_ms")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    policy_version: str
    server_time_ms: int
    def __init__(self, acked_seq: _Optional[int] = ..., policy_version: _Optional[str] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked_seq", "duplicate", "policy_version")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    duplicate: bool
    policy_version: str
    def __init__(self, acked_seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., policy_version: _Optional[str] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("seq", "code", "message", "field")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    message: str
    field: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("welcome", "ack", "rejection")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    rejection: Rejection
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., rejection: _Optional[_Union[Rejection, _Mapping]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("agent_id", "current_version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    current_version: str
    def __init__(self, agent_id: _Optional[str] = ..., current_version: _Optional[str] = ...) -> None: ...

class Zone(_message.Message):
    __slots__ = ("name", "kind", "direction", "department", "cidrs", "capacity_bps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    CIDRS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    direction: str
    department: str
    cidrs: _containers.RepeatedScalarFieldContainer[str]
    capacity_bps: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., direction: _Optional[str] = ..., department: _Optional[str] = ..., cidrs: _Optional[_Iterable[str]] = ..., capacity_bps: _Optional[int] = ...) -> None: ...

class ZoneRange(_message.Message):
    __slots__ = ("first", "last", "zone")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    first: bytes
    last: bytes
    zone: int
    def __init__(self, first: _Optional[bytes] = ..., last: _Optional[bytes] = ..., zone: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("sample_interval_s", "interfaces", "batch_max_facts", "policy_refresh_s", "zones", "zone_ranges", "zones_version", "rule_pack", "catalog_yaml")
    SAMPLE_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_FACTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_REFRESH_S_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    ZONE_RANGES_FIELD_NUMBER: _ClassVar[int]
    ZONES_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_PACK_FIELD_NUMBER: _ClassVar[int]
    CATALOG_YAML_FIELD_NUMBER: _ClassVar[int]
    sample_interval_s: int
    interfaces: _containers.RepeatedScalarFieldContainer[str]
    batch_max_facts: int
    policy_refresh_s: int
    zones: _containers.RepeatedCompositeFieldContainer[Zone]
    zone_ranges: _containers.RepeatedCompositeFieldContainer[ZoneRange]
    zones_version: str
    rule_pack: _containers.RepeatedCompositeFieldContainer[RuleFile]
    catalog_yaml: str
    def __init__(self, sample_interval_s: _Optional[int] = ..., interfaces: _Optional[_Iterable[str]] = ..., batch_max_facts: _Optional[int] = ..., policy_refresh_s: _Optional[int] = ..., zones: _Optional[_Iterable[_Union[Zone, _Mapping]]] = ..., zone_ranges: _Optional[_Iterable[_Union[ZoneRange, _Mapping]]] = ..., zones_version: _Optional[str] = ..., rule_pack: _Optional[_Iterable[_Union[RuleFile, _Mapping]]] = ..., catalog_yaml: _Optional[str] = ...) -> None: ...

class RuleFile(_message.Message):
    __slots__ = ("name", "text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("version", "unchanged", "policy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    version: str
    unchanged: bool
    policy: Policy
    def __init__(self, version: _Optional[str] = ..., unchanged: _Optional[bool] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

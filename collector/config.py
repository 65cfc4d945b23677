"""The collector's configuration: one frozen object, built by the CLI only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from collector.migration import MigrationPolicy
from collector.policy import AgentPolicy
from collector.siem.config import SiemConfig
from collector.store.retention import RetentionPolicy

DEFAULT_LISTEN = "127.0.0.1:7390"
DEFAULT_DB = Path("zonewatch.db")


@dataclass(frozen=True)
class CollectorConfig:
    db_path: Path = DEFAULT_DB
    # host:port to listen on (mTLS: Report, GetPolicy, Renew); port 0 picks a free one (tests).
    listen: str = DEFAULT_LISTEN
    # host:port of the enrollment port (TLS without client certificates: Enroll only); None:
    # the host of `listen` and its port + 1 (port 0 stays 0).
    enroll_listen: str | None = None
    # The CA and server certificate (pki.py); None: beside the database, in "pki".
    pki_dir: Path | None = None
    # A lab collector without TLS: agents name themselves, nothing is enrolled. Never in production.
    insecure: bool = False
    policy: AgentPolicy = field(default_factory=AgentPolicy)
    # The zone catalog (YAML) served to agents; reloaded on SIGHUP and when the file changes.
    zones_path: Path | None = None
    # How often the catalog file is checked for changes.
    zones_poll_s: float = 2.0
    # Largest message an agent may send; larger ones end the stream with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 20_000
    # Report streams open at once, all agents together; more are refused (RESOURCE_EXHAUSTED).
    max_streams: int = 20_000
    # A Report stream must say hello within this many seconds, or it is ended (a slot held by nobody).
    hello_timeout_s: float = 30.0
    # Facts per second one agent may send (10 s worth may come at once); beyond it its stream is
    # read more slowly and the excess waits in the agent's spool.
    agent_facts_per_s: float = 2_000.0
    # Facts an agent may send at once beyond its rate (a backlog after an outage); None: 10 s worth.
    agent_burst_facts: float | None = None
    # Seconds granted to open streams to finish their in-flight batches on SIGTERM.
    shutdown_grace_s: float = 5.0
    # Facts per group commit at most: bounds one transaction's latency.
    max_group_facts: int = 100_000
    # How long raw facts, minute and hour rollups are kept (store/retention.py).
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    # Seconds between retention steps once caught up (while behind they run back to back).
    maintenance_interval_s: float = 30.0
    # Rows one retention step may read or delete: bounds how long a commit waits behind it.
    # Measured (bench/fleet.py): ~16 µs a rolled-up row, so 2,000 rows hold commits back ~40 ms; at
    # 50,000 a step stalled every ack for 0.8 s. Steps run back to back while behind: ~40 k rows/s.
    maintenance_budget_rows: int = 2_000
    # Dedicated-network migration: the quiet period and staleness (collector/migration.py), and
    # how often states are decided again (hosts with news or a deadline due).
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)
    migration_interval_s: float = 10.0
    # The Sigma rules judged against every stored fact (rules/README.md); None: no rules at all.
    # Reloaded on SIGHUP and when a file in it changes.
    rules_dir: Path | None = None
    # How often agents' silence is judged and the rules directory looked at.
    detection_interval_s: float = 2.0
    # SIEM export of incidents: syslog (TCP/TLS) and JSON lines (collector/siem/); none by default.
    siem: SiemConfig = field(default_factory=SiemConfig)
    # On a lower tier: where the upstream's rule pack and zone catalog are kept (rules/, zones.yaml),
    # merged with rules_dir and zones_path; None: policy/ in upstream_state_path when `upstream` is set.
    upstream_dir: Path | None = None
    # host:port of the Prometheus /metrics endpoint (collector/metrics.py); None: no endpoint.
    metrics_listen: str | None = None
    # A lower tier: HOST:PORT of the upstream collector to forward incidents, migration states and
    # rollups to (collector/upstream/); None on a top tier. Its identity, spool and cursors are in
    # upstream_state_dir (None: upstream/ beside the database), read every upstream_interval_s.
    upstream: str | None = None
    upstream_state_dir: Path | None = None
    upstream_interval_s: float = 5.0
    # How often the hourly zone rollups of the hours still filling are computed and sent (a scan of
    # their raw zone traffic).
    upstream_rollup_interval_s: float = 60.0

    @property
    def upstream_state_path(self) -> Path:
        return self.upstream_state_dir or self.db_path.resolve().parent / "upstream"

    @property
    def pki_path(self) -> Path:
        return self.pki_dir if self.pki_dir is not None else default_pki_dir(self.db_path)

    @property
    def enroll_address(self) -> str:
        if self.enroll_listen is not None:
            return self.enroll_listen
        host, _, port = self.listen.rpartition(":")
        return f"{host}:{int(port) + 1 if port.isdigit() and int(port) else 0}"


def default_rules_dir() -> Path:
    """The default rule pack: rules/ beside the collector package (the repository, or the install)."""
    return Path(__file__).resolve().parent.parent / "rules"


def default_pki_dir(db_path: Path) -> Path:
    """Where `init` puts the PKI and `serve` looks for it unless told: beside the database."""
    return db_path.resolve().parent / "pki"

"""The collector's configuration: one frozen object, built by the CLI only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from collector.policy import AgentPolicy
from collector.store.retention import RetentionPolicy

DEFAULT_LISTEN = "127.0.0.1:7390"
DEFAULT_DB = Path("zonewatch.db")


@dataclass(frozen=True)
class CollectorConfig:
    db_path: Path = DEFAULT_DB
    # host:port to listen on; port 0 picks a free one (tests).
    listen: str = DEFAULT_LISTEN
    policy: AgentPolicy = field(default_factory=AgentPolicy)
    # The zone catalog (YAML) served to agents; reloaded on SIGHUP and when the file changes.
    zones_path: Path | None = None
    # How often the catalog file is checked for changes.
    zones_poll_s: float = 2.0
    # Largest message an agent may send; larger ones end the stream with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 20_000
    # Seconds granted to open streams to finish their in-flight batches on SIGTERM.
    shutdown_grace_s: float = 5.0
    # Facts per group commit at most: bounds one transaction's latency.
    max_group_facts: int = 100_000
    # How long raw facts, minute and hour rollups are kept (store/retention.py).
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    # Seconds between retention steps once caught up (while behind they run back to back).
    maintenance_interval_s: float = 30.0
    # Rows one retention step may read or delete: bounds how long a commit waits behind it.
    maintenance_budget_rows: int = 50_000

"""The at-least-once export loop: read after the cursor, deliver, and only then move the cursor.

One thread per destination, each with its own database connection, so a stuck syslog receiver
delays neither the JSON lines file nor ingest (the writer process never waits for an exporter;
an exporter holds the write lock only for the one-row cursor update). A failed delivery closes
the connection, records the error for `siem status`, waits (backoff with jitter, up to
retry_max_s) and sends the same batch again from the cursor: duplicates are possible, loss is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.backoff import Backoff
from collector.errors import CollectorError
from collector.siem.config import SiemConfig, SyslogTarget
from collector.siem.format import frame, json_line, local_hostname, syslog_incident
from collector.siem.jsonl import JsonLinesFile
from collector.siem.transport import SyslogClient
from collector.store.database import open_database
from collector.store.export import (
    ExportedChange,
    backlog,
    changes_after,
    open_cursor,
    record_delivery,
    record_error,
)

log = logging.getLogger(__name__)


class Destination(Protocol):
    name: str  # the cursor's key: "syslog tls://host:6514", "jsonl /var/log/zonewatch/incidents.jsonl"

    def deliver(self, changes: list[ExportedChange]) -> None:
        """Return only once the changes are delivered; DeliveryError otherwise."""

    def close(self) -> None: ...

    def abort(self) -> None:
        """From another thread: cut a blocked delivery short."""


class SyslogDestination:
    def __init__(self, target: SyslogTarget, config: SiemConfig, hostname: str) -> None:
        self.name = f"syslog {target.url}"
        self.client = SyslogClient(target, timeout_s=config.timeout_s)
        self._config, self._hostname = config, hostname

    def deliver(self, changes: list[ExportedChange]) -> None:
        c = self._config
        self.client.send(
            [
                frame(syslog_incident(x, hostname=self._hostname, facility=c.facility, sd_id=c.sd_id))
                for x in changes
            ]
        )

    def close(self) -> None:
        self.client.close()

    def abort(self) -> None:
        self.client.abort()


class JsonLinesDestination:
    def __init__(self, path: Path, hostname: str) -> None:
        self.name = f"jsonl {path.resolve()}"
        self.file = JsonLinesFile(path.resolve())
        self._hostname = hostname

    def deliver(self, changes: list[ExportedChange]) -> None:
        self.file.write([json_line(c, hostname=self._hostname) for c in changes])

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        pass  # a write to a local file ends by itself


def destinations(config: SiemConfig) -> list[Destination]:
    hostname = config.hostname or local_hostname()
    found: list[Destination] = []
    if config.syslog is not None:
        found.append(SyslogDestination(config.syslog, config, hostname))
    if config.jsonl is not None:
        found.append(JsonLinesDestination(config.jsonl, hostname))
    return found


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Exporter:
    """One destination's loop. step() is one attempt; the thread repeats it until stop()."""

    def __init__(
        self,
        db_path: Path,
        destination: Destination,
        config: SiemConfig,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        backoff: Backoff | None = None,
    ) -> None:
        self.db_path = db_path
        self.destination = destination
        self.config = config
        self.cursor: int | None = None  # None until read from the database
        self._clock_ms = clock_ms
        self._backoff = backoff or Backoff(
            initial_s=min(0.5, config.retry_max_s), maximum_s=config.retry_max_s
        )
        self._db: sqlite3.Connection | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> int:
        """Deliver the next batch of changes after the cursor, then move the cursor past them; how many
        were delivered (0: nothing new). DeliveryError or StoreError: nothing moved, try again later."""
        db = self._database()
        if self.cursor is None:
            self.cursor = open_cursor(db, self.destination.name, self._clock_ms())
            log.info(
                "SIEM export to %s: from change %d, %d incidents to send",
                self.destination.name,
                self.cursor,
                backlog(db, self.cursor),
            )
        changes = changes_after(db, self.cursor, self.config.batch_size)
        if not changes:
            return 0
        self.destination.deliver(changes)
        record_delivery(db, self.destination.name, changes[-1].seq, len(changes), self._clock_ms())
        self.cursor = changes[-1].seq
        return len(changes)

    def _database(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_database(self.db_path, create=False)
        return self._db

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"zonewatch-siem-{self.destination.name.split()[0]}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        failing = ""
        while not self._stopping.is_set():
            try:
                sent = self.step()
            except CollectorError as exc:
                self.destination.close()
                message = str(exc)
                if message != failing:  # once per kind of failure, not once per retry
                    log.warning(
                        "SIEM export to %s failed: %s; sending again from the cursor",
                        self.destination.name,
                        message,
                    )
                failing = message
                with contextlib.suppress(CollectorError):
                    if self._db is not None:
                        record_error(self._db, self.destination.name, message, self._clock_ms())
                self._stopping.wait(self._backoff.next_delay())
                continue
            except Exception:  # a bug, not the receiver: say so and keep exporting
                log.exception("SIEM export to %s: internal error", self.destination.name)
                self.destination.close()
                self._stopping.wait(self._backoff.next_delay())
                continue
            if failing:
                log.info("SIEM export to %s: delivering again", self.destination.name)
                failing = ""
            self._backoff.reset()
            if sent < self.config.batch_size:
                self._stopping.wait(self.config.interval_s)
        self.destination.close()
        if self._db is not None:
            self._db.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self.destination.abort()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("SIEM export to %s did not stop within %g s", self.destination.name, timeout_s)


class SiemExport:
    """serve's exporters, started and stopped with the collector."""

    def __init__(self) -> None:
        self.exporters: list[Exporter] = []

    def start(self, db_path: Path, config: SiemConfig) -> None:
        for destination in destinations(config):
            exporter = Exporter(db_path, destination, config)
            exporter.start()
            self.exporters.append(exporter)

    async def stop(self) -> None:
        for exporter in self.exporters:
            await asyncio.to_thread(exporter.stop)
        self.exporters = []

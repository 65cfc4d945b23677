"""Wiring: a grpc.aio server around the servicer and the ingest pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from collector import pki
from collector.config import CollectorConfig
from collector.errors import CollectorError
from collector.ingest import Ingest
from collector.maintenance import (
    DetectionSchedule,
    MaintenanceSchedule,
    MigrationSchedule,
    report_rule_errors,
)
from collector.metrics import Sources
from collector.metrics_http import MetricsServer
from collector.model import DetectionConfig, ZoneInfo
from collector.policy import PolicySource
from collector.servicer import AgentService
from collector.siem.exporter import SiemExport
from collector.tiers_pack import RulePack
from collector.tiers_policy import policy_dir, upstream_catalog_path, upstream_rules_dir
from collector.trust import Trust

log = logging.getLogger(__name__)


class Collector:
    """A running collector: server, port and ingest, stopped together."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        ingest: Ingest,
        policy: PolicySource,
        maintenance: MaintenanceSchedule,
        trust: Trust,
        enroll_port: int = 0,
        migration: MigrationSchedule | None = None,
        detection: DetectionSchedule | None = None,
        rules_dir: Path | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.enroll_port = enroll_port  # 0 when insecure (no enrollment)
        self.ingest = ingest
        self.policy = policy
        self.maintenance = maintenance
        self.trust = trust
        self.migration = migration
        self.detection = detection
        self.rules_dir = rules_dir
        self.upstream_dir: Path | None = None  # a lower tier's copy of its upstream's files (tiers_policy.py)
        self._stop_watching = asyncio.Event()
        self._revocations = asyncio.create_task(trust.watch_revocations(self._stop_watching))
        self.metrics: MetricsServer | None = None  # serve --metrics-listen
        self.forwarder: Any = None  # serve --upstream: upstream.forwarder.RunningForwarder
        self.siem = SiemExport()  # serve --siem-syslog, --siem-jsonl: started by create_server

    async def store_catalog(self) -> None:
        """Record the catalog in force in the database, for queries and reports."""
        catalog = self.policy.catalog
        if catalog is None:
            return
        rows = [
            (z.name, z.kind, z.direction, z.department, ", ".join(map(str, z.networks)), z.capacity_bps)
            for z in catalog.zones
        ]
        await self.ingest.store_catalog(rows, catalog.version, time.time_ns() // 1_000_000)

    async def configure_detection(self) -> None:
        """Tell the rule engine its rules and the catalog's judgments (zone kinds, admin zones, access)."""
        catalog = self.policy.catalog
        zones = (
            {} if catalog is None else {z.name: ZoneInfo(z.kind, z.direction, z.admin) for z in catalog.zones}
        )
        upstream_rules = upstream_rules_dir(self.upstream_dir) if self.upstream_dir is not None else None
        config = DetectionConfig(
            str(self.rules_dir or ""),
            zones,
            {} if catalog is None else dict(catalog.access),
            float(self.policy.policy.sample_interval_s),
            str(upstream_rules or ""),
        )
        count, errors = await self.ingest.configure_detection(config)
        report_rule_errors(errors)
        if self.rules_dir is not None or upstream_rules is not None:
            sources = " and ".join(str(d) for d in (upstream_rules, self.rules_dir) if d is not None)
            log.info("%d rules in force from %s", count, sources)

    async def reload_zones(self, *, only_if_changed: bool) -> None:
        changed = self.policy.reload_if_changed() if only_if_changed else self.policy.reload()
        if changed:
            if self.migration is not None:
                self.migration.catalog_changed()
            try:
                await self.store_catalog()
            except CollectorError as exc:
                log.error("zone catalog in force but not recorded in the database: %s", exc)
            try:
                await self.configure_detection()
            except CollectorError as exc:
                log.error("zone catalog in force but the rules still judge by the previous one: %s", exc)

    async def reload_rules(self) -> None:
        if self.detection is not None:
            try:
                await self.detection.reload()
            except CollectorError as exc:
                log.error("rules not reloaded: %s", exc)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking new streams, let in-flight batches commit, close the database."""
        if self.forwarder is not None:
            await self.forwarder.stop()  # first: it reads the database the writer is about to close
        if self.metrics is not None:
            await self.metrics.stop()
        await self.siem.stop()
        await self.maintenance.stop()
        if self.detection is not None:
            await self.detection.stop()
        if self.migration is not None:
            await self.migration.stop()
        self._stop_watching.set()
        await self._revocations
        await self.server.stop(grace_s)
        await self.ingest.close()


async def create_server(config: CollectorConfig) -> Collector:
    """Start a collector listening on config.listen (port 0 = any free port).

    With TLS (the default) it listens twice: config.listen for agents with a client certificate
    (Report, GetPolicy, Renew) and config.enroll_address for agents that have none yet (Enroll).
    grpc offers a server either "require and verify a client certificate" or "never ask for
    one", so enrollment, which has no certificate, needs a port of its own.
    """
    upstream = config.upstream_dir  # a lower tier: the upstream's rules and zones come first
    if upstream is None and config.upstream is not None:
        upstream = policy_dir(config.upstream_state_path)  # where the forwarder stores them
    policy = PolicySource(  # a bad catalog stops us before anything starts
        config.policy, config.zones_path, upstream_catalog_path(upstream) if upstream is not None else None
    )
    upstream_rules = upstream_rules_dir(upstream) if upstream is not None else None
    authority = None if config.insecure else _load_pki(config)
    ingest = Ingest(config.db_path, max_group_facts=config.max_group_facts)
    await ingest.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            # Agents ping at most every 20 s; faster pings are abusive and get the connection closed.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 2),
            # The collector pings idle connections too: a vanished agent's stream is closed within
            # a few minutes instead of holding a slot for hours.
            ("grpc.keepalive_time_ms", 120_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.so_reuseport", 0),
        ]
    )
    trust = Trust(ingest, authority)
    service = AgentService(
        ingest,
        policy,
        trust,
        agent_facts_per_s=config.agent_facts_per_s,
        agent_burst_facts=config.agent_burst_facts,
        max_streams=config.max_streams,
        hello_timeout_s=config.hello_timeout_s,
        rule_pack=RulePack(config.rules_dir, upstream_rules),  # what lower tiers are sent
    )
    server.add_generic_rpc_handlers((service.handler(),))
    enroll_port = 0
    try:
        if authority is None:
            log.warning("running WITHOUT TLS (--insecure): agents are not authenticated")
            port = _bind(server, config.listen, None)
        else:
            key, chain = authority.server_key_pem, authority.server_chain_pem
            mtls = grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=authority.ca_cert_pem, require_client_auth=True
            )
            port = _bind(server, config.listen, mtls)
            enroll_port = _bind(server, config.enroll_address, grpc.ssl_server_credentials([(key, chain)]))
    except CollectorError:
        await ingest.close()
        raise
    await server.start()
    maintenance = MaintenanceSchedule(
        ingest,
        config.retention,
        interval_s=config.maintenance_interval_s,
        budget_rows=config.maintenance_budget_rows,
    )
    migration = MigrationSchedule(ingest, config.migration, interval_s=config.migration_interval_s)
    detection = DetectionSchedule(
        ingest, config.rules_dir, interval_s=config.detection_interval_s, upstream_rules_dir=upstream_rules
    )
    collector = Collector(
        server, port, ingest, policy, maintenance, trust, enroll_port, migration, detection, config.rules_dir
    )
    collector.upstream_dir = upstream
    if config.metrics_listen is not None:
        collector.metrics = MetricsServer(Sources(ingest, service, config.db_path))
        try:
            metrics_port = await collector.metrics.start(config.metrics_listen)
        except CollectorError:
            await collector.stop(0)
            raise
        host = config.metrics_listen.rpartition(":")[0] or "0.0.0.0"
        log.info("metrics at http://%s:%d/metrics", host, metrics_port)
    await collector.store_catalog()
    await collector.configure_detection()
    maintenance.start()
    migration.start()
    detection.start()
    try:
        collector.siem.start(config.db_path, config.siem)
    except CollectorError:
        await collector.stop(0)
        raise
    if config.upstream is not None:
        from collector.upstream.forwarder import start_forwarder  # a lower tier only

        try:
            collector.forwarder = start_forwarder(collector, config)
        except CollectorError:
            await collector.stop(0)
            raise
    return collector


def _load_pki(config: CollectorConfig) -> pki.Pki:
    try:
        return pki.load_pki(config.pki_path)
    except pki.PkiError as exc:
        raise CollectorError(
            f"{exc} (create it with `zonewatch-collector init --db {config.db_path}`, or serve --insecure "
            "for a lab without TLS)"
        ) from exc


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise CollectorError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise CollectorError(f"cannot listen on {address} (address in use?)")
    return port


async def serve(config: CollectorConfig, on_ready: Callable[[Collector], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    collector = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hangup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    if on_ready is not None:
        on_ready(collector)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_either(stop, hangup), config.zones_poll_s)
        if not stop.is_set():
            await collector.reload_zones(only_if_changed=not hangup.is_set())
            if hangup.is_set():
                await collector.reload_rules()
            hangup.clear()
    log.info("shutting down: finishing in-flight batches")
    await collector.stop(config.shutdown_grace_s)


async def _either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()

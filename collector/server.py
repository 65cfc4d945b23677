"""Wiring: a grpc.aio server around the servicer and the ingest pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

import grpc

from collector.config import CollectorConfig
from collector.errors import CollectorError
from collector.ingest import Ingest
from collector.maintenance import MaintenanceSchedule
from collector.policy import PolicySource
from collector.servicer import AgentService

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
    ) -> None:
        self.server = server
        self.port = port
        self.ingest = ingest
        self.policy = policy
        self.maintenance = maintenance

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

    async def reload_zones(self, *, only_if_changed: bool) -> None:
        changed = self.policy.reload_if_changed() if only_if_changed else self.policy.reload()
        if changed:
            try:
                await self.store_catalog()
            except CollectorError as exc:
                log.error("zone catalog in force but not recorded in the database: %s", exc)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking new streams, let in-flight batches commit, close the database."""
        await self.maintenance.stop()
        await self.server.stop(grace_s)
        await self.ingest.close()


async def create_server(config: CollectorConfig) -> Collector:
    """Start a collector listening on config.listen (port 0 = any free port)."""
    policy = PolicySource(config.policy, config.zones_path)  # a bad catalog stops us before anything starts
    ingest = Ingest(config.db_path, max_group_facts=config.max_group_facts)
    await ingest.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            # Agents ping at most every 20 s; faster pings are abusive and get the connection closed.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((AgentService(ingest, policy).handler(),))
    try:
        port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        await ingest.close()
        raise CollectorError(f"cannot listen on {config.listen}: {exc}") from exc
    if port == 0:
        await ingest.close()
        raise CollectorError(f"cannot listen on {config.listen} (address in use?)")
    await server.start()
    maintenance = MaintenanceSchedule(
        ingest,
        config.retention,
        interval_s=config.maintenance_interval_s,
        budget_rows=config.maintenance_budget_rows,
    )
    collector = Collector(server, port, ingest, policy, maintenance)
    await collector.store_catalog()
    maintenance.start()
    return collector


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

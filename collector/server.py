"""Wiring: a grpc.aio server around the servicer and the ingest pipeline."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc

from collector.config import CollectorConfig
from collector.errors import CollectorError
from collector.ingest import Ingest
from collector.servicer import AgentService

log = logging.getLogger(__name__)


class Collector:
    """A running collector: server, port and ingest, stopped together."""

    def __init__(self, server: grpc.aio.Server, port: int, ingest: Ingest) -> None:
        self.server = server
        self.port = port
        self.ingest = ingest

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking new streams, let in-flight batches commit, close the database."""
        await self.server.stop(grace_s)
        await self.ingest.close()


async def create_server(config: CollectorConfig) -> Collector:
    """Start a collector listening on config.listen (port 0 = any free port)."""
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
    server.add_generic_rpc_handlers((AgentService(ingest, config.policy).handler(),))
    try:
        port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        await ingest.close()
        raise CollectorError(f"cannot listen on {config.listen}: {exc}") from exc
    if port == 0:
        await ingest.close()
        raise CollectorError(f"cannot listen on {config.listen} (address in use?)")
    await server.start()
    return Collector(server, port, ingest)


async def serve(config: CollectorConfig, on_ready: Callable[[Collector], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    collector = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(collector)
    await stop.wait()
    log.info("shutting down: finishing in-flight batches")
    await collector.stop(config.shutdown_grace_s)

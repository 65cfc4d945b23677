"""The /metrics endpoint: plain HTTP/1.1 on the collector's event loop (metrics.py builds the text).

asyncio rather than http.server's threads: the figures are read and the writer is asked for its own
on the loop that owns them, and a scrape costs about a millisecond of it (1.7 ms measured on a loaded
2-core machine, mostly reading two processes' /proc entries): nothing next to a 15 s scrape
interval. One request per connection, a 5 s limit to send it and an 8 KiB limit on its size: a client
that connects and says nothing, or too much, holds nothing for long; and at most MAX_CONNECTIONS at
once: one more is closed unanswered, so a flood of idle connections cannot hold the loop's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from collector.errors import CollectorError
from collector.metrics import Sources, render

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 16


class MetricsServer:
    """GET /metrics over plain HTTP/1.1 (one request per connection); 404 elsewhere."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self._server: asyncio.Server | None = None
        self.port = 0
        self.scrapes = 0
        self.refused = 0  # connections closed unanswered: MAX_CONNECTIONS were open
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self, address: str) -> int:
        host, port = split_address(address)
        try:
            self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            raise CollectorError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            self.refused += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        async with self._slots:
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, content_type = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT_S)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, broken or oversized request: nothing to answer
        except Exception:  # a bug here must not end the collector's loop
            log.exception("metrics: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, _, rest = request.partition(" ")
        target = rest.partition(" ")[0].partition("?")[0]
        plain = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", plain
        if target != "/metrics":
            return "404 Not Found", b"not found: the metrics are at /metrics\n", plain
        body = (await render(self._sources)).encode("utf-8")
        self.scrapes += 1
        return "200 OK", b"" if method == "HEAD" else body, "text/plain; version=0.0.4; charset=utf-8"


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port); CollectorError for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise CollectorError(f"--metrics-listen {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9390")
    return host.strip("[]") or "0.0.0.0", int(port)

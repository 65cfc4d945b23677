"""An agent whose spool was wiped while the collector kept its record loses nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.errors import SpoolError
from agent.sensors.interfaces import InterfaceSample
from agent.spool import Spool
from agent.transport import Transport
from agent.wire import batch_request, hello_request, renumber_payload
from collector.config import CollectorConfig
from collector.server import create_server
from protos.zonewatch.v1 import agent_pb2

SAMPLE = InterfaceSample("eth0", 1, 2, 3, 4, 0, 0, 0, 0, 10_000, 0.8, 1.6, 0, -1.0, False)


def fill(spool: Spool, count: int, interface: str) -> None:
    for _ in range(count):
        now = time.time_ns() // 1_000_000

        def build(seq: int, now: int = now) -> tuple[bytes, int, int, int]:
            req = batch_request(seq, now, now, [SAMPLE._replace(interface=interface)])
            return req.SerializeToString(), 1, now, now

        spool.append(build)


async def deliver(target: str, spool: Spool) -> None:
    def hello() -> bytes:
        req = hello_request("agent-reset-01", "h", "t", {}, "", time.time_ns() // 1_000_000)
        return req.SerializeToString()

    transport = Transport(target, spool, hello, backoff=Backoff(0.05, 0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(transport.run(stop))
    try:
        async with asyncio.timeout(20):
            while spool.stats().batches:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await transport.close()


def test_wiped_spool_is_renumbered_past_what_the_collector_holds(tmp_path: Path) -> None:
    async def scenario() -> None:
        collector = await create_server(
            CollectorConfig(db_path=tmp_path / "c.db", listen="127.0.0.1:0", insecure=True)
        )
        target = f"127.0.0.1:{collector.port}"
        try:
            with Spool(tmp_path / "spool-1.db") as first:
                fill(first, 5, "eth0")
                await deliver(target, first)
            # The spool file is gone; the agent id is not. A fresh spool starts again at 1.
            with Spool(tmp_path / "spool-2.db") as second:
                fill(second, 3, "eth1")
                await deliver(target, second)
                assert second.stats().next_seq == 9
        finally:
            await collector.stop()

    asyncio.run(scenario())
    con = sqlite3.connect(tmp_path / "c.db")
    rows = con.execute(
        "SELECT seq, interface FROM interface_samples JOIN series ON series.id = series ORDER BY seq"
    ).fetchall()
    con.close()
    assert rows == [(i, "eth0") for i in range(1, 6)] + [(i, "eth1") for i in range(6, 9)]


def test_renumber_patches_payloads_and_keeps_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        fill(spool, 3, "eth0")
        assert spool.renumber_from(10, renumber_payload) == 3
        batches = spool.pending()
        assert [b.seq for b in batches] == [10, 11, 12]
        assert [agent_pb2.ReportRequest.FromString(b.payload).batch.seq for b in batches] == [10, 11, 12]
        fill(spool, 1, "eth0")
        assert spool.pending()[-1].seq == 13


def test_renumber_refuses_to_reuse_numbers(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        fill(spool, 3, "eth0")
        with pytest.raises(SpoolError, match="numbers up to 3 are used"):
            spool.renumber_from(2, renumber_payload)
        assert [b.seq for b in spool.pending()] == [1, 2, 3]

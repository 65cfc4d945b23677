"""The agent's transport against a real collector on a free port, with a real spool on disk.

pytest-asyncio is not installed: each test runs its scenario with asyncio.run, bounded
by asyncio.wait_for so that a stuck stream fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.backoff import Backoff
from agent.errors import TransportError
from agent.policy import PolicyUpdate
from agent.sensors.interfaces import InterfaceSample
from agent.spool import Spool
from agent.transport import Transport
from agent.wire import batch_request, hello_request
from collector.config import CollectorConfig
from collector.policy import AgentPolicy
from collector.server import Collector, create_server

AGENT_ID = "agent-transport-01"
LABELS = {"department": "市公安局", "county": "高新区", "site": "主机房", "role": "server"}
SAMPLES_PER_BATCH = 2
# No scenario needs more than a few seconds; this only turns a hang into a failure.
SCENARIO_TIMEOUT_S = 30.0


def run(scenario: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(asyncio.wait_for(scenario, SCENARIO_TIMEOUT_S))
    finally:
        # Collect the grpc objects a failed stream leaves in cycles now: when their finalizers run
        # instead inside pytest's ast.parse of a traceback entry, CPython 3.11.7 raises "AST
        # constructor recursion depth mismatch" and pytest dies with INTERNALERROR.
        gc.collect()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def hello() -> bytes:
    return hello_request(AGENT_ID, "web-01", "0.1.0", LABELS, "", now_ms()).SerializeToString()


def spool_batch(spool: Spool, *, rx_bps: float = 800.0, tx_bps: float = 1600.0) -> int:
    """Append one batch of SAMPLES_PER_BATCH samples whose rx_bytes is the batch's seq."""
    time_ms = now_ms()

    def build(seq: int) -> tuple[bytes, int, int, int]:
        samples = [
            InterfaceSample(f"eth{i}", seq, 2 * seq, 1, 1, 0, 0, 0, 0, 10_000, rx_bps, tx_bps, 0, -1.0, False)
            for i in range(SAMPLES_PER_BATCH)
        ]
        request = batch_request(seq, time_ms, time_ms, samples)
        return request.SerializeToString(), len(request.batch.facts), time_ms, time_ms

    return spool.append(build)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_collector(db: Path, port: int = 0, policy: AgentPolicy | None = None) -> Collector:
    config = CollectorConfig(
        db_path=db, listen=f"127.0.0.1:{port}", policy=policy or AgentPolicy(), insecure=True
    )
    return await create_server(config)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def delivering(transport: Transport) -> AsyncIterator[asyncio.Task[None]]:
    """Run the transport; on the way out stop it through its Event and re-raise anything run() raised."""
    stop = asyncio.Event()
    task = asyncio.create_task(transport.run(stop))
    try:
        yield task
    finally:
        stop.set()
        transport.notify()
        await asyncio.wait({task}, timeout=5.0)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        await transport.close()
    assert not task.cancelled(), "run() did not return within 5 s of stop being set"
    escaped = task.exception()
    assert escaped is None, f"run() raised {type(escaped).__name__}: {escaped}"


def acked(transport: Transport, seq: int) -> Callable[[], bool]:
    return lambda: transport.stats.acked_seq == seq


def drained(spool: Spool) -> Callable[[], bool]:
    return lambda: spool.stats().batches == 0


def collector_rows(db: Path) -> tuple[list[tuple[int, str]], list[tuple[int, int, int]]]:
    """(seq, status) of every batch row, and (seq, rx_bytes, count) of the samples per batch."""
    con = sqlite3.connect(db)
    try:
        batches = con.execute("SELECT seq, status FROM batches ORDER BY seq").fetchall()
        samples = con.execute(
            "SELECT seq, rx_bytes, count(*) FROM interface_samples GROUP BY seq, rx_bytes ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    return batches, samples


def stored_once(seqs: range | list[int]) -> list[tuple[int, int, int]]:
    """What interface_samples holds when each of seqs was stored exactly once."""
    return [(seq, seq, SAMPLES_PER_BATCH) for seq in seqs]


# --- delivery --------------------------------------------------------------------------------


def test_the_spool_drains_and_every_batch_is_stored_once(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def scenario() -> None:
        collector = await start_collector(db)
        try:
            with Spool(tmp_path / "spool.db") as spool:
                for _ in range(40):
                    spool_batch(spool)
                # A window smaller than the spool: sending has to wait for acks.
                transport = Transport(f"127.0.0.1:{collector.port}", spool, hello, window=8)
                async with delivering(transport):
                    await eventually(drained(spool), "the spool to drain")
                    await eventually(acked(transport, 40), "the last ack")
                    # Checked before stopping: the end of a stopped stream can race with the collector's EOF.
                    assert (transport.stats.sessions, transport.stats.rejected) == (1, 0)
                    assert transport.stats.last_error == ""
                assert spool.stats().next_seq == 41
        finally:
            await collector.stop(0.5)

    run(scenario())
    batches, samples = collector_rows(db)
    assert batches == [(seq, "stored") for seq in range(1, 41)]
    assert samples == stored_once(range(1, 41))


def test_batches_spooled_while_connected_are_delivered(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def scenario() -> None:
        collector = await start_collector(db)
        try:
            with Spool(tmp_path / "spool.db") as spool:
                transport = Transport(f"127.0.0.1:{collector.port}", spool, hello)
                async with delivering(transport):
                    await eventually(lambda: transport.stats.connected, "the welcome")
                    for expected in range(1, 4):
                        assert spool_batch(spool) == expected
                        transport.notify()
                        await eventually(acked(transport, expected), f"the ack of {expected}")
                        assert spool.stats().batches == 0
                assert transport.stats.sessions == 1
        finally:
            await collector.stop(0.5)

    run(scenario())
    batches, samples = collector_rows(db)
    assert batches == [(1, "stored"), (2, "stored"), (3, "stored")]
    assert samples == stored_once([1, 2, 3])


@pytest.mark.parametrize(
    "bad",
    [
        {"rx_bps": float("nan")},
        {"rx_bps": -1.0},
        {"tx_bps": float("inf")},
        # NaN after a number: min() and max() both skip it, so a min/max range check lets it through.
        {"tx_bps": float("nan")},
    ],
    ids=["rx-nan", "rx-negative", "tx-inf", "tx-nan"],
)
def test_an_invalid_batch_is_discarded_and_later_ones_still_delivered(
    tmp_path: Path, bad: dict[str, float]
) -> None:
    db = tmp_path / "c.db"

    async def scenario() -> None:
        collector = await start_collector(db)
        try:
            with Spool(tmp_path / "spool.db") as spool:
                spool_batch(spool)
                spool_batch(spool, **bad)
                spool_batch(spool)
                transport = Transport(
                    f"127.0.0.1:{collector.port}",
                    spool,
                    hello,
                    backoff=Backoff(initial_s=0.05, maximum_s=0.2),
                )
                async with delivering(transport):
                    await eventually(drained(spool), "the spool to drain", timeout=5.0)
                    await eventually(acked(transport, 3), "the ack of 3", timeout=5.0)
                assert transport.stats.rejected == 1
                # An invalid batch is answered in-band: the stream lived on.
                assert transport.stats.sessions == 1
        finally:
            await collector.stop(0.5)

    run(scenario())
    batches, samples = collector_rows(db)
    assert batches == [(1, "stored"), (2, "rejected"), (3, "stored")]
    assert samples == stored_once([1, 3])
    con = sqlite3.connect(db)
    try:
        rejections = con.execute("SELECT agent_id, seq, code, field FROM rejections").fetchall()
    finally:
        con.close()
    (field,) = bad
    assert rejections == [(AGENT_ID, 2, "INVALID_ARGUMENT", f"batch.facts[0].interface_sample.{field}")]


def test_a_collector_restart_on_the_same_port_delivers_what_was_spooled_meanwhile(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def scenario() -> None:
        first = await start_collector(db)
        port = first.port
        second: Collector | None = None
        try:
            with Spool(tmp_path / "spool.db") as spool:
                for _ in range(5):
                    spool_batch(spool)
                transport = Transport(
                    f"127.0.0.1:{port}", spool, hello, backoff=Backoff(initial_s=0.05, maximum_s=0.2)
                )
                async with delivering(transport):
                    await eventually(acked(transport, 5), "the first five acks")
                    await first.stop(0)
                    await eventually(lambda: transport.stats.last_error != "", "the transport to notice")
                    # The agent keeps sampling while its collector is away.
                    for _ in range(5):
                        spool_batch(spool)
                        transport.notify()
                    await asyncio.sleep(0.3)
                    assert spool.stats().batches == 5
                    second = await start_collector(db, port)
                    await eventually(drained(spool), "the spool to drain after the restart", timeout=15.0)
                    await eventually(acked(transport, 10), "the last ack")
                    assert transport.stats.sessions >= 2
        finally:
            await first.stop(0)
            if second is not None:
                await second.stop(0.5)

    run(scenario())
    batches, samples = collector_rows(db)
    assert batches == [(seq, "stored") for seq in range(1, 11)]
    assert samples == stored_once(range(1, 11))


async def until(
    task: asyncio.Task[None], predicate: Callable[[], bool], what: str, timeout: float = 10.0
) -> None:
    await eventually(lambda: predicate() or task.done(), what, timeout)
    assert not task.done(), f"Transport.run() ended while waiting for {what}"


def test_a_collector_stopped_mid_delivery_duplicates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    total = 205

    async def scenario() -> None:
        first = await start_collector(db)
        port = first.port
        second: Collector | None = None
        try:
            with Spool(tmp_path / "spool.db") as spool:
                for _ in range(200):
                    spool_batch(spool)
                transport = Transport(
                    f"127.0.0.1:{port}",
                    spool,
                    hello,
                    window=16,
                    backoff=Backoff(initial_s=0.05, maximum_s=0.2),
                )
                async with delivering(transport) as task:
                    await until(task, lambda: transport.stats.acked_seq >= 1, "the first ack")
                    # Stopped mid-delivery: some batches are committed whose acks never leave,
                    # and the new collector must recognise them when they come again.
                    await first.stop(0)
                    for _ in range(total - 200):
                        spool_batch(spool)
                    transport.notify()
                    await until(task, lambda: transport.stats.last_error != "", "the transport to notice")
                    second = await start_collector(db, port)
                    await until(task, drained(spool), "the spool to drain after the restart", timeout=15.0)
                    await until(task, acked(transport, total), "the last ack")
                    assert transport.stats.sessions >= 2
        finally:
            await first.stop(0)
            if second is not None:
                await second.stop(0.5)

    run(scenario())
    batches, samples = collector_rows(db)
    assert batches == [(seq, "stored") for seq in range(1, total + 1)]
    assert samples == stored_once(range(1, total + 1))


def test_an_unreachable_collector_is_retried_with_backoff(tmp_path: Path) -> None:
    draws: list[float] = []

    def rand() -> float:
        draws.append(0.5)
        return 0.5

    async def scenario() -> None:
        with Spool(tmp_path / "spool.db") as spool:
            spool_batch(spool)
            backoff = Backoff(initial_s=0.01, maximum_s=0.05, rand=rand)
            transport = Transport(f"127.0.0.1:{free_port()}", spool, hello, backoff=backoff)
            async with delivering(transport) as task:
                await eventually(lambda: backoff.attempts >= 3, "three retries")
                assert not task.done()
            assert "UNAVAILABLE" in transport.stats.last_error
            assert (transport.stats.connected, transport.stats.sessions, transport.stats.acked_seq) == (
                False,
                0,
                0,
            )
            assert spool.stats().batches == 1

    run(scenario())
    assert len(draws) >= 3


def test_a_collector_whose_storage_fails_is_retried_without_end(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    keep_trying_s = 8.0

    async def scenario() -> None:
        collector = await start_collector(db)
        # The samples table taken away under the running collector: every commit fails, and the
        # collector answers each new stream's first batch by aborting it (UNAVAILABLE).
        saboteur = sqlite3.connect(db, isolation_level=None)
        saboteur.execute("ALTER TABLE interface_samples RENAME TO interface_samples_away")
        saboteur.close()
        try:
            with Spool(tmp_path / "spool.db") as spool:
                for _ in range(300):
                    spool_batch(spool)
                transport = Transport(
                    f"127.0.0.1:{collector.port}",
                    spool,
                    hello,
                    window=64,
                    backoff=Backoff(initial_s=0.001, maximum_s=0.002),
                )
                async with delivering(transport) as task:
                    # Many short sessions, each ended by the collector while batches are being written.
                    deadline = asyncio.get_running_loop().time() + keep_trying_s
                    while not task.done() and asyncio.get_running_loop().time() < deadline:
                        await asyncio.sleep(0.05)
                    escaped = task.exception() if task.done() else None
                    assert not task.done(), f"run() ended by itself: {type(escaped).__name__}: {escaped}"
                    assert transport.stats.attempts > 1
                    assert transport.stats.last_error != ""
                assert spool.stats().batches == 300
        finally:
            await collector.stop(0.5)

    run(scenario())


# --- policy ----------------------------------------------------------------------------------


def test_get_policy_returns_the_policy_then_nothing_while_unchanged(tmp_path: Path) -> None:
    policy = AgentPolicy(
        sample_interval_s=30, interfaces=("eth0", "政务外网"), batch_max_facts=200, policy_refresh_s=120
    )

    async def scenario() -> None:
        collector = await start_collector(tmp_path / "c.db", policy=policy)
        try:
            with Spool(tmp_path / "spool.db") as spool:
                transport = Transport(f"127.0.0.1:{collector.port}", spool, hello)
                try:
                    update = await transport.get_policy("", AGENT_ID, timeout_s=5.0)
                    assert update == PolicyUpdate(policy.version, 30, ("eth0", "政务外网"), 200, 120)
                    assert await transport.get_policy(policy.version, AGENT_ID, timeout_s=5.0) is None
                    stale = await transport.get_policy("an-older-version", AGENT_ID, timeout_s=5.0)
                    assert stale is not None and stale.version == policy.version
                finally:
                    await transport.close()
        finally:
            await collector.stop(0.5)

    run(scenario())


def test_get_policy_from_an_unreachable_collector_is_a_transport_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Spool(tmp_path / "spool.db") as spool:
            transport = Transport(f"127.0.0.1:{free_port()}", spool, hello)
            try:
                with pytest.raises(TransportError, match="GetPolicy: UNAVAILABLE"):
                    await transport.get_policy("", AGENT_ID, timeout_s=2.0)
            finally:
                await transport.close()

    run(scenario())

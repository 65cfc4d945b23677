"""Ingest throughput: the collector over gRPC against SQLite's own insert rate on the same machine.

    .venv/bin/python bench/ingest.py [--agents 200] [--samples-per-batch 250] [--seconds 20]
                                     [--window 8] [--runs 3] [--profile off|py-spy|cprofile]

Each run has two halves, measured one after the other so they never share the CPU:

1. Collector: a real collector (collector.server.create_server) runs in its own process on
   127.0.0.1 with a fresh SQLite file (WAL, synchronous=FULL). This process plays --agents
   agents over grpc.aio: one Report stream each (Hello, then batches of --samples-per-batch
   interface samples, at most --window unacknowledged). After a warm-up, acknowledged samples
   are counted for --seconds; then the agents stop sending, wait for their last acks, close
   their streams, and the collector shuts down. The file is then checked: every acknowledged
   batch is stored exactly once, and nothing unacknowledged is.
2. Raw limit: plain executemany of the same 18-column rows into a fresh file with the same
   schema and pragmas, 50,000 rows per committed transaction, for --seconds / 2.

The last line is machine-readable:
    RESULT samples_per_s=<median> raw_limit_per_s=<median> ratio=<median> target=0.4
Exit status: 0 when the figures were measured (whether or not the target is met), 1 when the
verification found lost or duplicated rows, any rejection, or a failed stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from agent.sensors.interfaces import InterfaceSample
from agent.wire import REPORT_METHOD, batch_request, hello_request
from collector.config import CollectorConfig, default_rules_dir
from collector.server import create_server
from collector.store import open_database
from collector.store.schema import migrate
from protos.zonewatch.v1 import agent_pb2

TARGET_RATIO = 0.4
TARGET_SAMPLES_PER_S = 300_000
WARMUP_S = 2.0
AGENTS_PER_CHANNEL = 25
CONNECT_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
RAW_ROWS_PER_TXN = 50_000
# The collector's writer binds each row's id itself (consecutive per batch); here SQLite
# assigns the same next id, so the raw loop does no per-row Python work at all.
INSERT_SAMPLES = "INSERT INTO interface_samples VALUES (NULL, " + ", ".join("?" * 18) + ")"

DEPARTMENTS = (
    "财政局",
    "公安局",
    "教育局",
    "卫生健康委员会",
    "人力资源和社会保障局",
    "自然资源和规划局",
    "市场监督管理局",
    "交通运输局",
    "生态环境局",
    "应急管理局",
)
COUNTIES = ("城关区", "高新区", "临河县", "南山县", "北川县")
SITES = ("政务外网一号机房", "政务外网二号机房", "县级汇聚节点")
ROLES = ("终端", "服务器", "网关")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch(seq: int, sent_ms: int, facts: bytes) -> bytes:
    """A ReportRequest{batch: Batch{seq, sent_ms, facts}} from facts encoded once (Batch field 3)."""
    inner = b"".join((b"\x08", _varint(seq), b"\x10", _varint(sent_ms), facts))
    return b"".join((b"\x12", _varint(len(inner)), inner))


def make_samples(rng: random.Random, count: int) -> list[InterfaceSample]:
    """Plausible 10-second samples of `count` interfaces eth0..eth<count-1>."""
    samples = []
    for i in range(count):
        interval_ms = 10_000 + rng.randint(-40, 40)
        seconds = interval_ms / 1000
        speed_bps = rng.choice((1_000_000_000, 1_000_000_000, 10_000_000_000, 100_000_000, 0))
        ceiling = int(speed_bps * seconds / 8) if speed_bps else 5_000_000_000
        rx_bytes = min(ceiling, int(rng.lognormvariate(15.0, 2.0)))
        tx_bytes = min(ceiling, int(rng.lognormvariate(14.0, 2.0)))
        rx_packets = rx_bytes // rng.randint(200, 1400)
        tx_packets = tx_bytes // rng.randint(200, 1400)
        rx_bps = rx_bytes * 8 / seconds
        tx_bps = tx_bytes * 8 / seconds
        samples.append(
            InterfaceSample(
                interface=f"eth{i}",
                rx_bytes=rx_bytes,
                tx_bytes=tx_bytes,
                rx_packets=rx_packets,
                tx_packets=tx_packets,
                rx_errors=rng.randint(1, 30) if rng.random() < 0.03 else 0,
                tx_errors=rng.randint(1, 5) if rng.random() < 0.01 else 0,
                rx_drops=rng.randint(1, 200) if rng.random() < 0.05 else 0,
                tx_drops=rng.randint(1, 50) if rng.random() < 0.02 else 0,
                interval_ms=interval_ms,
                rx_bps=rx_bps,
                tx_bps=tx_bps,
                speed_bps=speed_bps,
                utilization=max(rx_bps, tx_bps) / speed_bps if speed_bps else -1.0,
                counter_reset=rng.random() < 0.002,
            )
        )
    return samples


@dataclass
class AgentTemplate:
    agent_id: str
    hello: bytes
    facts: bytes  # the Batch's repeated `facts` field, serialized once
    rows: list[tuple[Any, ...]]  # the same samples as interface_samples rows (agent key, seq 1)


def build_templates(agents: int, samples_per_batch: int, seed: int = 7) -> list[AgentTemplate]:
    now = int(time.time() * 1000)
    time_ms = now - 10_000
    templates = []
    for index in range(agents):
        rng = random.Random(seed * 1_000_003 + index)
        agent_id = f"bench-{index + 1:04d}"
        labels = {
            "department": DEPARTMENTS[index % len(DEPARTMENTS)],
            "county": COUNTIES[index % len(COUNTIES)],
            "site": SITES[index % len(SITES)],
            "role": ROLES[index % len(ROLES)],
        }
        hello = hello_request(agent_id, f"{agent_id}.bench.zw", "bench", labels, "", now).SerializeToString()
        samples = make_samples(rng, samples_per_batch)
        whole = batch_request(1, now, time_ms, samples)
        facts = agent_pb2.Batch(facts=whole.batch.facts).SerializeToString()
        # (agent, series, seq, time_ms, counters...): the interface name lives in the series table.
        rows = [
            (index + 1, index * len(samples) + n + 1, 1, time_ms, *sample[1:])
            for n, sample in enumerate(samples)
        ]
        templates.append(AgentTemplate(agent_id, hello, facts, rows))
    # The patched encoding must be exactly what agent.wire would have sent.
    first = templates[0]
    for seq in (1, 127, 128, 300_000):
        expected = batch_request(
            seq, now, time_ms, make_samples(random.Random(seed * 1_000_003), samples_per_batch)
        )
        if agent_pb2.ReportRequest.FromString(encode_batch(seq, now, first.facts)) != expected:
            raise SystemExit("bench bug: the patched batch encoding does not parse back to the batch")
    return templates


# --------------------------------------------------------------------------- collector process


def collector_main(db_path: str, conn: multiprocessing.connection.Connection, cprofile: bool) -> None:
    """Entry point of the collector process (multiprocessing, spawn)."""
    logging.basicConfig(level=logging.WARNING, format="collector: %(levelname)s %(name)s: %(message)s")
    asyncio.run(_collector(Path(db_path), conn, cprofile))


async def _collector(db_path: Path, conn: multiprocessing.connection.Connection, cprofile: bool) -> None:
    # The default rule pack judges every stored fact, as `zonewatch-collector serve` does.
    collector = await create_server(
        CollectorConfig(db_path=db_path, listen="127.0.0.1:0", insecure=True, rules_dir=default_rules_dir())
    )
    # cProfile sees this process's event loop only; the database writer is a child
    # process (use --profile py-spy, which follows it, to see that side).
    profilers = {"event loop": cProfile.Profile()}
    conn.send(("ready", collector.port))
    while True:
        command = await asyncio.to_thread(conn.recv)
        if command == "threads":
            conn.send({t.native_id: t.name for t in threading.enumerate()})
        elif command == "profile-on" and cprofile:
            profilers["event loop"].enable()
            conn.send("ok")
        elif command == "profile-off" and cprofile:
            profilers["event loop"].disable()
            conn.send("ok")
        elif command == "stop":
            await collector.stop()
            report = ""
            if cprofile:
                for name, profiler in profilers.items():
                    text = io.StringIO()
                    stats = pstats.Stats(profiler, stream=text)
                    stats.sort_stats("tottime").print_stats(25)
                    report += f"\n=== cProfile, collector {name} (top 25 by own time) ===\n{text.getvalue()}"
            conn.send((tuple(collector.ingest.stats()), report))
            return
        else:
            conn.send("ok")


class CollectorProcess:
    def __init__(self, db_path: Path, cprofile: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=collector_main,
            args=(str(db_path), child, cprofile),
            name="zonewatch-collector",
            # Not daemonic: the collector starts its own writer process.
            daemon=False,
        )
        self.process.start()
        child.close()
        self.port = 0

    async def _recv(self, timeout: float) -> Any:
        def receive() -> Any:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the collector process did not answer within {timeout:.0f} s")
            return self._conn.recv()

        return await asyncio.to_thread(receive)

    async def start(self) -> int:
        tag, self.port = await self._recv(CONNECT_TIMEOUT_S)
        assert tag == "ready"
        return self.port

    async def call(self, command: str, timeout: float = 30.0) -> Any:
        self._conn.send(command)
        return await self._recv(timeout)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_of(stat_text: str) -> tuple[str, float]:
    comm = stat_text[stat_text.index("(") + 1 : stat_text.rindex(")")]
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def _tree(pid: int) -> list[int]:
    """The collector and its children (the database writer process)."""
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def process_cpu(pid: int) -> float:
    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            total += _cpu_of(Path(f"/proc/{member}/stat").read_text())[1]
    return total


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    threads = {}
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{member}/task"):
                with contextlib.suppress(OSError):
                    threads[int(tid)] = _cpu_of(Path(f"/proc/{member}/task/{tid}/stat").read_text())
    return threads


# --------------------------------------------------------------------------- simulated agents


@dataclass
class Client:
    window: int
    t0: float = math.inf  # measurement window, perf_counter
    t1: float = math.inf
    connected: int = 0
    acked_batches: int = 0  # every ack: warm-up, window and drain
    window_batches: int = 0
    rejections: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    acked_by_agent: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent -> (acks, last seq)
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)


async def run_agent(
    channel: grpc.aio.Channel, template: AgentTemplate, client: Client, total: int, stop: asyncio.Event
) -> None:
    call = channel.stream_stream(
        REPORT_METHOD, request_serializer=None, response_deserializer=agent_pb2.ReportResponse.FromString
    )()
    agent_id = template.agent_id
    inflight: deque[tuple[int, float]] = deque()
    room = asyncio.Event()  # set whenever a reply frees a slot (or the stream ends)
    alive = True
    acked = last = 0

    async def receive() -> None:
        nonlocal alive, acked, last
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                now = time.perf_counter()
                if not inflight:
                    client.errors.append(f"{agent_id}: reply without a batch in flight: {response}")
                    return
                seq, written = inflight.popleft()
                kind = response.WhichOneof("body")
                if kind == "ack" and not response.ack.duplicate and response.ack.acked_seq == seq:
                    acked += 1
                    last = seq
                    client.acked_batches += 1
                    if client.t0 <= now < client.t1:
                        client.window_batches += 1
                        client.latencies.append(now - written)
                elif kind == "ack" and response.ack.duplicate:
                    client.duplicates += 1
                    client.errors.append(f"{agent_id}: batch {seq} acked as a duplicate")
                elif kind == "rejection":
                    client.rejections += 1
                    r = response.rejection
                    client.errors.append(
                        f"{agent_id}: batch {seq} rejected ({r.code}, {r.field}): {r.message}"
                    )
                else:
                    client.errors.append(f"{agent_id}: unexpected reply to batch {seq}: {response}")
                room.set()
        except grpc.aio.AioRpcError as exc:
            client.errors.append(f"{agent_id}: receiving: {exc.code().name}: {exc.details()}")
        finally:
            alive = False
            room.set()

    receiver: asyncio.Task[None] | None = None
    try:
        await call.write(template.hello)
        welcome = await call.read()
        if welcome is grpc.aio.EOF or welcome.WhichOneof("body") != "welcome":
            client.errors.append(f"{agent_id}: no welcome: {welcome}")
            return
        seq = welcome.welcome.acked_seq
        client.connected += 1
        if client.connected == total:
            client.all_connected.set()
        receiver = asyncio.create_task(receive())
        facts = template.facts
        while alive and not stop.is_set():
            if len(inflight) >= client.window:
                room.clear()
                await room.wait()
                continue
            seq += 1
            inflight.append((seq, time.perf_counter()))
            await call.write(encode_batch(seq, time.time_ns() // 1_000_000, facts))
        # Stop: wait for the acks of what is in flight, then end the stream cleanly.
        while alive and inflight:
            room.clear()
            await room.wait()
        await call.done_writing()
        await receiver
        status = await call.code()
        if status != grpc.StatusCode.OK:
            client.errors.append(f"{agent_id}: stream ended with {status.name}: {await call.details()}")
        if inflight:
            client.errors.append(f"{agent_id}: {len(inflight)} batches never answered")
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        client.errors.append(f"{agent_id}: {type(exc).__name__}: {exc}")
    finally:
        if receiver is not None:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        client.acked_by_agent[agent_id] = (acked, last)
        call.cancel()


# --------------------------------------------------------------------------- one collector measurement


@dataclass
class CollectorRun:
    samples_per_s: float
    window_s: float
    p50_ms: float
    p99_ms: float
    collector_cores: float
    client_cores: float
    threads: list[tuple[str, float]]  # (thread, cores) during the window, busiest first
    client: Client
    ingest_stats: tuple[int, int, int, int]  # batches, facts, commits, rejected
    verification: list[str]
    ok: bool
    profile: str


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_collector(
    args: argparse.Namespace, templates: list[AgentTemplate], workdir: Path
) -> CollectorRun:
    db_path = workdir / "collector.db"
    collector = CollectorProcess(db_path, cprofile=args.profile == "cprofile")
    channels: list[grpc.aio.Channel] = []
    try:
        port = await collector.start()
        pid = collector.process.pid
        assert pid is not None
        target = f"127.0.0.1:{port}"
        channels = [
            grpc.aio.insecure_channel(
                target,
                # A channel of its own per group of agents: separate TCP connections and HTTP/2 sessions.
                options=[("grpc.use_local_subchannel_pool", 1), ("zonewatch.bench.channel", i)],
            )
            for i in range(math.ceil(len(templates) / AGENTS_PER_CHANNEL))
        ]
        client = Client(window=args.window)
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(run_agent(channels[i // AGENTS_PER_CHANNEL], t, client, len(templates), stop))
            for i, t in enumerate(templates)
        ]
        connecting = asyncio.create_task(client.all_connected.wait())
        # Any agent task ending before all are connected has failed.
        await asyncio.wait(
            [connecting, *tasks], timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if not client.all_connected.is_set():
            connecting.cancel()
            stop.set()
            await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            raise RuntimeError(
                f"only {client.connected} of {len(templates)} agents connected: {client.errors[:3]}"
            )
        await asyncio.sleep(WARMUP_S)

        names = await collector.call("threads")
        spy: asyncio.subprocess.Process | None = None
        spy_out = workdir / "py-spy.txt"
        if args.profile == "py-spy":
            spy = await asyncio.create_subprocess_exec(
                *_py_spy_command(pid, args.seconds, spy_out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        elif args.profile == "cprofile":
            await collector.call("profile-on")
        threads0, cpu0, client_cpu0 = thread_cpu(pid), process_cpu(pid), time.process_time()
        client.t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        client.t1 = time.perf_counter()
        threads1, cpu1, client_cpu1 = thread_cpu(pid), process_cpu(pid), time.process_time()
        window_s = client.t1 - client.t0
        if args.profile == "cprofile":
            await collector.call("profile-off")

        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            client.errors.append(
                f"{len(pending)} agents did not finish within {DRAIN_TIMEOUT_S:.0f} s of stop"
            )
            await asyncio.wait(pending, timeout=5)
        for channel in channels:
            await channel.close()
        channels = []
        profile = ""
        if spy is not None:
            _, err = await asyncio.wait_for(spy.communicate(), timeout=args.seconds + 60)
            profile = summarize_py_spy(spy_out) if spy_out.exists() else f"py-spy failed: {err.decode()}"
        ingest_stats, cprofile_report = await collector.call("stop", timeout=60)
        profile += cprofile_report
        collector.process.join(30)
    finally:
        for channel in channels:
            await channel.close()
        collector.kill()

    busiest = []
    for tid, (comm, after) in threads1.items():
        used = after - threads0.get(tid, (comm, 0.0))[1]
        label = names.get(tid, comm) + (" (main)" if tid == pid else "")
        busiest.append((f"{label} [{tid}]", used / window_s))
    busiest.sort(key=lambda item: -item[1])
    verification, ok = verify(db_path, client, args.samples_per_batch, ingest_stats)
    return CollectorRun(
        samples_per_s=client.window_batches * args.samples_per_batch / window_s,
        window_s=window_s,
        p50_ms=_percentile(client.latencies, 0.50) * 1000,
        p99_ms=_percentile(client.latencies, 0.99) * 1000,
        collector_cores=(cpu1 - cpu0) / window_s,
        client_cores=(client_cpu1 - client_cpu0) / window_s,
        threads=busiest,
        client=client,
        ingest_stats=ingest_stats,
        verification=verification,
        ok=ok,
        profile=profile,
    )


def verify(
    db_path: Path, client: Client, samples_per_batch: int, ingest_stats: tuple[int, int, int, int]
) -> tuple[list[str], bool]:
    """Compare the file with what the agents were told: every acked batch stored once, nothing else."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        (rows,) = db.execute("SELECT count(*) FROM interface_samples").fetchone()
        keys = dict(db.execute("SELECT id, agent_id FROM agents"))
        stored: dict[str, list[int]] = {}  # agent -> [batches, max seq, batches with a wrong row count]
        for agent, seq, count in db.execute(
            "SELECT agent, seq, count(*) FROM interface_samples GROUP BY agent, seq"
        ):
            entry = stored.setdefault(keys.get(agent, f"unknown agent key {agent}"), [0, 0, 0])
            entry[0] += 1
            entry[1] = max(entry[1], seq)
            entry[2] += count != samples_per_batch
        (batch_rows,) = db.execute("SELECT count(*) FROM batches WHERE status = 'stored'").fetchone()
        (rejection_rows,) = db.execute("SELECT count(*) FROM rejections").fetchone()
        (gap_rows,) = db.execute("SELECT count(*) FROM sequence_gaps").fetchone()
    finally:
        db.close()
    expected = client.acked_batches * samples_per_batch
    mismatched = []
    for agent_id in sorted(set(stored) | set(client.acked_by_agent)):
        acked, last = client.acked_by_agent.get(agent_id, (0, 0))
        batches, max_seq, wrong = stored.get(agent_id, [0, 0, 0])
        # Acked seqs are 1..last with no hole; the file must hold exactly those, each complete.
        if not (batches == acked == last and max_seq == last and wrong == 0):
            mismatched.append(
                f"{agent_id}: acked {acked} (last {last}), stored {batches} (max {max_seq}, "
                f"{wrong} with a wrong row count)"
            )
    checks = [
        (rows == expected, f"interface_samples rows {rows:,} == facts acknowledged {expected:,}"),
        (
            not mismatched,
            f"per agent: stored batches == acked batches 1..last, {samples_per_batch} rows each"
            + (f" — {len(mismatched)} agents differ, e.g. {mismatched[:3]}" if mismatched else ""),
        ),
        (
            batch_rows == client.acked_batches,
            f"batches rows {batch_rows:,} == batches acknowledged {client.acked_batches:,}",
        ),
        (ingest_stats[1] == rows, f"collector's own count of stored facts {ingest_stats[1]:,} == rows"),
        (
            client.rejections == 0 and rejection_rows == 0 and ingest_stats[3] == 0,
            f"rejections: {client.rejections} received, {rejection_rows} recorded",
        ),
        (
            client.duplicates == 0 and gap_rows == 0,
            f"duplicate acks {client.duplicates}, sequence gaps {gap_rows}",
        ),
        (
            not client.errors,
            f"stream errors: {len(client.errors)}" + (f" e.g. {client.errors[:3]}" if client.errors else ""),
        ),
    ]
    return [("OK   " if good else "FAIL ") + text for good, text in checks], all(good for good, _ in checks)


# --------------------------------------------------------------------------- raw SQLite limit


def measure_raw(templates: list[AgentTemplate], seconds: float, workdir: Path) -> tuple[float, int]:
    """rows/s of plain executemany into the collector's schema, big committed transactions."""
    db = open_database(workdir / "raw.db")  # WAL, synchronous=FULL, and migrated ...
    migrate(db)  # ... (a no-op here, said for the reader)
    rows: list[tuple[Any, ...]] = []
    while len(rows) < RAW_ROWS_PER_TXN:
        for template in templates:
            rows.extend(template.rows)
    del rows[RAW_ROWS_PER_TXN:]
    inserted = 0
    start = time.perf_counter()
    try:
        while True:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT_SAMPLES, rows)
            db.execute("COMMIT")
            inserted += len(rows)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return inserted / elapsed, inserted
    finally:
        db.close()


# --------------------------------------------------------------------------- profiling


def _py_spy_command(pid: int, seconds: float, out: Path) -> list[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--threads",
        "--subprocesses",  # the database writer process
        "--nonblocking",  # blocking sampling with --native cut the collector to a third of its throughput
        "--nolineno",
        "--output",
        str(out),
    ]


def summarize_py_spy(path: Path) -> str:
    """Collapsed stacks (py-spy --format raw --threads) -> per-thread share, top self and inclusive frames."""
    by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]  # "thread (<tid>): <name>"
        frames = [f for f in frames[1:] if not f.startswith("process ")]
        total += count
        by_thread[thread] += count
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "py-spy recorded no samples"
    out = [f"\n=== py-spy, collector process: {total} on-CPU samples ===", "by thread:"]
    out += [f"  {100 * n / total:5.1f}%  {t}" for t, n in by_thread.most_common(8)]
    out.append("top frames by own (self) samples:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_time.most_common(30)]
    out.append("top frames by inclusive samples:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(45)]
    return "\n".join(out)


# --------------------------------------------------------------------------- driver


async def run_all(
    args: argparse.Namespace, templates: list[AgentTemplate], root: Path
) -> list[tuple[Any, ...]]:
    results = []
    for run in range(1, args.runs + 1):
        workdir = Path(tempfile.mkdtemp(prefix=f"run{run}-", dir=root))
        progress(
            f"run {run}/{args.runs}: collector, {args.agents} agents, {WARMUP_S:g} s warm-up + "
            f"{args.seconds:g} s"
        )
        measured = await measure_collector(args, templates, workdir)
        progress(
            f"run {run}/{args.runs}: collector {measured.samples_per_s:,.0f} samples/s, ack p50 "
            f"{measured.p50_ms:.0f} ms p99 {measured.p99_ms:.0f} ms, collector CPU "
            f"{measured.collector_cores:.2f} cores, verification {'OK' if measured.ok else 'FAILED'}"
        )
        for line in measured.verification:
            progress(f"  {line}")
        raw_s = args.seconds / 2
        progress(f"run {run}/{args.runs}: raw SQLite executemany for {raw_s:g} s")
        raw_rate, raw_rows = await asyncio.to_thread(measure_raw, templates, raw_s, workdir)
        progress(f"run {run}/{args.runs}: raw {raw_rate:,.0f} rows/s ({raw_rows:,} rows)")
        results.append((measured, raw_rate))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--samples-per-batch", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per collector run")
    parser.add_argument("--window", type=int, default=8, help="unacknowledged batches per agent")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--profile",
        choices=("off", "py-spy", "cprofile"),
        default="off",
        help="profile the collector process during each measured window (slows it down)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary SQLite files go")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite files")
    args = parser.parse_args(argv)
    if min(args.agents, args.samples_per_batch, args.window, args.runs) < 1 or args.seconds <= 0:
        parser.error("--agents, --samples-per-batch, --window, --runs and --seconds must be positive")

    templates = build_templates(args.agents, args.samples_per_batch)
    root = Path(tempfile.mkdtemp(prefix="zonewatch-bench-", dir=args.dir))
    try:
        results = asyncio.run(run_all(args, templates, root))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"ingest bench: {args.agents} agents × window {args.window} × {args.samples_per_batch} samples/batch,"
        " "
        f"{args.seconds:g} s measured per run, raw limit {RAW_ROWS_PER_TXN:,} rows/txn for "
        f"{args.seconds / 2:g} s; {os.cpu_count()} CPUs; SQLite {sqlite3.sqlite_version}"
        + (f"; PROFILED with {args.profile}" if args.profile != "off" else "")
    )
    header = (
        f"{'run':>3}  {'samples/s':>10}  {'raw rows/s':>10}  {'ratio':>5}  {'p50 ms':>6}  {'p99 ms':>6}  "
        f"{'coll CPU':>8}  {'client CPU':>10}  {'commits':>7}  verify"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    for run, (m, raw) in enumerate(results, start=1):
        ratios.append(m.samples_per_s / raw)
        print(
            f"{run:>3}  {m.samples_per_s:>10,.0f}  {raw:>10,.0f}  {ratios[-1]:>5.2f}  {m.p50_ms:>6.0f}  "
            f"{m.p99_ms:>6.0f}  {m.collector_cores:>8.2f}  {m.client_cores:>10.2f}  {m.ingest_stats[2]:>7,}  "
            f"{'OK' if m.ok else 'FAILED'}"
        )
    for run, (m, _) in enumerate(results, start=1):
        print(f"run {run} verification (collector file after shutdown):")
        for line in m.verification:
            print(f"  {line}")
        facts_per_commit = m.ingest_stats[1] / max(1, m.ingest_stats[2])
        print(
            f"  collector: {m.ingest_stats[0]:,} batches, {m.ingest_stats[1]:,} facts in "
            f"{m.ingest_stats[2]:,} commits ({facts_per_commit:,.0f} facts/commit)"
        )
        print(
            "  collector threads during the window (cores): "
            + ", ".join(f"{name} {cores:.2f}" for name, cores in m.threads[:6] if cores >= 0.01)
        )
        if m.profile:
            print(m.profile)

    samples = statistics.median(m.samples_per_s for m, _ in results)
    raw = statistics.median(r for _, r in results)
    ratio = statistics.median(ratios)
    p50 = statistics.median(m.p50_ms for m, _ in results)
    p99 = statistics.median(m.p99_ms for m, _ in results)
    ok = all(m.ok for m, _ in results)
    print(f"ack latency (write -> ack, median of runs): p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(
        f"absolute target: >= {TARGET_SAMPLES_PER_S:,} samples/s — measured {samples:,.0f}: "
        f"{'met' if samples >= TARGET_SAMPLES_PER_S else 'MISSED'}"
    )
    print(
        f"ratio target: >= {TARGET_RATIO} of raw SQLite — measured {ratio:.2f}: "
        f"{'met' if ratio >= TARGET_RATIO else 'MISSED'}"
    )
    print(f"verification: {'all runs OK' if ok else 'FAILED (see above)'}")
    sys.stderr.flush()
    print(
        f"RESULT samples_per_s={samples:.0f} raw_limit_per_s={raw:.0f} ratio={ratio:.2f} "
        f"target={TARGET_RATIO}",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

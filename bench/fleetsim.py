"""The simulated agents of bench/fleet.py: enrollment over the real Enroll RPC, and worker processes
that each play a slice of the fleet over grpc.aio.

Every simulated agent has its own key and certificate, its own mTLS channel (its own TCP and TLS
connection: a local subchannel pool keeps grpc from sharing one) and its own Report stream: a Hello,
then one batch every interval at its own phase, strictly increasing seq. Only one batch is in flight
per agent (at a 10 s interval an agent's ack comes back long before its next batch), so the time from
writing a batch to reading its ack is the ack latency the bench reports.

The facts are built once per worker with agent/wire.py's builders, in a pool of variants the agents
share; a send only sets seq, sent_ms and the facts' times, then serializes. That keeps the load
generator at a few percent of a core per thousand batches per second.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import random
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent.aggregate.access import INBOUND, AccessRecord
from agent.aggregate.flows import TCP, FlowRecord, ProcessRef
from agent.health import Health
from agent.sensors.accounting import ZoneDelta
from agent.sensors.interfaces import InterfaceSample
from agent.transport import CHANNEL_OPTIONS, TLS_OPTIONS
from agent.wire import (
    ENROLL_METHOD,
    REPORT_METHOD,
    access_fact,
    batch_request,
    enroll_request,
    flow_fact,
    health_fact,
    hello_request,
    parse_issued,
    zone_traffic_fact,
)
from protos.zonewatch.v1 import agent_pb2

# Zones of deploy/zones.sample.yaml, the catalog the bench's collector serves.
HORIZONTAL = "市电子政务外网（横向）"
VERTICAL = "省电子政务外网（纵向）"
DEDICATED = "公安专网"
DEPARTMENTS = ("市公安局", "市人社局", "市医保局", "市教育局", "市财政局")
COUNTIES = ("高新区", "城关区", "东城县", "西山县")
# One slot per counter a worker publishes to the parent (a shared array of doubles).
SLOTS = ("connected", "sent", "acked", "facts_sent", "errors", "recent_p99_ms", "done")
VARIANTS = 64
SLOW_S = 0.05  # the target: acks slower than this are timed, to show when the collector stalled


def labels_of(index: int) -> tuple[str, str]:
    """(department, county) of simulated agent ``index``: the token it enrolls with carries them."""
    return DEPARTMENTS[index % len(DEPARTMENTS)], COUNTIES[(index // len(DEPARTMENTS)) % len(COUNTIES)]


def hostname_of(index: int) -> str:
    return f"fleet-{index:05d}"


# --- enrollment ------------------------------------------------------------------------------


async def enroll_all(
    target: str, ca_pem: bytes, tokens: dict[tuple[str, str], str], indices: list[int], out: Path,
    concurrency: int, advance: Any,
) -> int:  # fmt: skip
    """Enroll ``indices`` (each with the token of its labels) over the Enroll RPC; append each identity
    to ``out`` as one JSON line as soon as it is issued, so an interrupted run keeps what it paid for.
    ``advance()`` is called per identity (the progress bar). Returns how many failed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent import enroll_keys

    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    failed = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)
    async with grpc.aio.secure_channel(target, credentials, options=TLS_OPTIONS) as channel:
        method = channel.unary_unary(ENROLL_METHOD, request_serializer=None, response_deserializer=None)
        with out.open("a", encoding="utf-8") as sink:

            async def one_by_one() -> None:
                nonlocal failed
                while not queue.empty():
                    i = queue.get_nowait()
                    key = ec.generate_private_key(ec.SECP256R1())
                    csr = enroll_keys.make_csr(key, hostname_of(i))
                    request = enroll_request(tokens[labels_of(i)], csr, hostname_of(i), "", "fleet-bench")
                    try:
                        issued = parse_issued(await method(request, timeout=120))
                    except grpc.aio.AioRpcError as exc:
                        failed += 1
                        if failed <= 3:
                            print(f"[fleet] enrollment of {hostname_of(i)} failed: {exc.code().name}: "
                                  f"{exc.details()}", flush=True)  # fmt: skip
                        continue
                    key_pem = key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                    line = {"index": i, "agent_id": issued.agent_id, "hostname": hostname_of(i),
                            "key": key_pem.decode(), "cert": issued.certificate_pem.decode()}  # fmt: skip
                    sink.write(json.dumps(line) + "\n")
                    advance()

            await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
    return failed


def read_identities(path: Path) -> dict[int, dict[str, str]]:
    """Cached identities by index; a torn last line (an interrupted enrollment) is skipped."""
    found: dict[int, dict[str, str]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                found[int(entry["index"])] = entry
    return found


# --- facts -----------------------------------------------------------------------------------


class BatchPool:
    """Pre-built batches (ReportRequest messages) in VARIANTS shapes, 9–18 facts each, that every
    agent of a worker shares: a send sets the times and seq and serializes at once, with no await in
    between, so sharing is safe."""

    def __init__(self, seed: int, interval_s: float) -> None:
        rng = random.Random(seed)
        window = int(interval_s * 1000)
        self.variants: list[agent_pb2.ReportRequest] = []
        for _ in range(VARIANTS):
            samples = [
                InterfaceSample(name, rx, tx, rx // 900, tx // 900, 0, 0, 0, 0, window,
                                rx * 8000 / window, tx * 8000 / window, 10**9,
                                max(rx, tx) * 8000 / window / 10**9, False)
                for name, rx, tx in (("eth0", rng.randint(10**5, 10**8), rng.randint(10**5, 10**8)),
                                     ("eth1", rng.randint(10**3, 10**6), rng.randint(10**3, 10**6)))
            ]  # fmt: skip
            zones = [HORIZONTAL, VERTICAL] + ([DEDICATED] if rng.random() < 0.3 else [])
            extra = [
                zone_traffic_fact(
                    ZoneDelta(z, rng.randint(10**4, 10**7), rng.randint(10**4, 10**7), 100, 100, window), 0
                )
                for z in zones
            ]
            extra.append(
                health_fact(Health(0.3, 45 << 20, 0, 0, "", {"interfaces": "on", "capture": "on"}), 0)
            )
            for _ in range(rng.randint(2, 8)):  # ordinary clients of the host's web service
                peer = f"10.32.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                port = rng.choice((80, 443, 8080))
                volume = rng.randint(10**3, 10**6), rng.randint(10**3, 10**6)
                attempts = rng.randint(1, 5)
                record = AccessRecord(0, INBOUND, peer, HORIZONTAL, HORIZONTAL, attempts, 0, 0, 0, 1, 1,
                                      (port,), "", 0, *volume, window)  # fmt: skip
                extra.append(access_fact(record, 0))
            for n in range(rng.randint(0, 3)):  # the host's own calls out, attributed to its process
                flow = FlowRecord(TCP, "10.32.1.10", 40000 + n, f"10.0.{rng.randint(0, 255)}.9", 443, "eth0",
                                  5000, 90000, 20, 60, 0, 0, 0x1B, VERTICAL, True,
                                  ProcessRef(1234, "java", "app", "java -jar app.jar"))  # fmt: skip
                extra.append(flow_fact(flow, 0))
            self.variants.append(batch_request(0, 0, 0, samples, extra=extra))
        self.fact_counts = [len(v.batch.facts) for v in self.variants]

    def build(self, variant: int, seq: int, now_ms: int) -> tuple[bytes, int]:
        request = self.variants[variant]
        batch = request.batch
        batch.seq = seq
        batch.sent_ms = now_ms
        for fact in batch.facts:
            fact.time_ms = now_ms
            if fact.HasField("flow"):
                fact.flow.start_ms = now_ms - 5000
                fact.flow.end_ms = now_ms
        return request.SerializeToString(), self.fact_counts[variant]


# --- the worker process ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """When things happen, on CLOCK_MONOTONIC (shared by every process of the machine)."""

    target: str
    ca_pem: bytes
    identities: Path
    indices: tuple[int, ...]
    start: float  # connections begin
    ramp_s: float  # connections are spread over this long
    measure_from: float  # the steady window starts...
    stop: float  # ...and ends: no batch is sent at or after it
    interval_s: float
    seed: int


class Worker:
    def __init__(self, plan: Plan, counters: Any, slot: int) -> None:
        self.plan = plan
        self.counters = counters
        self.base = slot * len(SLOTS)
        self.pool = BatchPool(plan.seed, plan.interval_s)
        self.connected = self.sent = self.acked = self.facts_sent = self.errors = 0
        self.steady = array.array("d")  # ack latencies (s) of batches sent in the steady window
        self.ramp = array.array("d")  # ... and before it
        self.slow = array.array("d")  # when (monotonic) batches whose ack took over SLOW_S were sent
        self.recent: list[float] = []
        self.error_messages: list[str] = []
        self.published = 0
        self.late = 0  # batches sent later than their schedule because the previous ack was late

    def publish(self) -> None:
        recent = sorted(self.recent)
        p99 = recent[int(0.99 * (len(recent) - 1))] * 1000 if recent else 0.0
        self.published += 1
        if self.published % 10 == 0:  # the parent prints every ~10 s: p99 over the last ten seconds
            self.recent = []
        values = (self.connected, self.sent, self.acked, self.facts_sent, self.errors, p99, 0)
        for n, value in enumerate(values):
            self.counters[self.base + n] = value

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 5:
            self.error_messages.append(what)

    async def agent(self, identity: dict[str, str], connect_at: float, phase: float) -> None:
        plan = self.plan
        await asyncio.sleep(max(0.0, connect_at - time.monotonic()))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=plan.ca_pem,
            private_key=identity["key"].encode(),
            certificate_chain=identity["cert"].encode(),
        )
        options = [*CHANNEL_OPTIONS, *TLS_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        index = int(identity["index"])
        variant = index % VARIANTS
        async with grpc.aio.secure_channel(plan.target, credentials, options=options) as channel:
            stream = channel.stream_stream(REPORT_METHOD, request_serializer=None, response_deserializer=None)
            call = stream(timeout=plan.stop - time.monotonic() + 300)
            welcomed = False
            try:
                department, county = labels_of(index)
                hello = hello_request(
                    identity["agent_id"], identity["hostname"], "fleet-bench",
                    {"department": department, "county": county}, "", time.time_ns() // 1_000_000,
                )  # fmt: skip
                await call.write(hello.SerializeToString())
                welcome = agent_pb2.ReportResponse.FromString(await call.read())
                if welcome.WhichOneof("body") != "welcome":
                    raise RuntimeError(f"expected a welcome, got {welcome.WhichOneof('body')}")
                seq = welcome.welcome.acked_seq
                self.connected += 1
                welcomed = True
                next_at = connect_at + phase
                while next_at < plan.stop:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    seq += 1
                    data, facts = self.pool.build(
                        (variant + seq) % VARIANTS, seq, time.time_ns() // 1_000_000
                    )
                    sent = time.monotonic()
                    await call.write(data)
                    self.sent += 1
                    self.facts_sent += facts
                    reply = agent_pb2.ReportResponse.FromString(await call.read())
                    latency = time.monotonic() - sent
                    if reply.WhichOneof("body") != "ack" or reply.ack.acked_seq != seq or reply.ack.duplicate:
                        self.fail(f"{identity['hostname']} seq {seq}: {str(reply).strip()[:200]}")
                        break
                    self.acked += 1
                    (self.steady if sent >= plan.measure_from else self.ramp).append(latency)
                    if latency > SLOW_S:
                        self.slow.append(sent)
                    self.recent.append(latency)
                    next_at += plan.interval_s
                    if next_at < time.monotonic():
                        self.late += 1
                        next_at = time.monotonic()
                # Connected until the window ends, as a real agent stays: the collector holds every stream.
                await asyncio.sleep(max(0.0, plan.stop - time.monotonic()))
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            except (grpc.aio.AioRpcError, RuntimeError) as exc:  # counted; a real agent would retry
                detail = (
                    f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else exc
                )
                self.fail(f"{identity['hostname']}: {detail}")
            finally:
                self.connected -= welcomed

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        wanted = set(plan.indices)
        identities = [v for k, v in sorted(read_identities(plan.identities).items()) if k in wanted]
        rng = random.Random(plan.seed)
        agents = [
            self.agent(identity, plan.start + rng.random() * plan.ramp_s, rng.random() * plan.interval_s)
            for identity in identities
        ]
        publisher = asyncio.create_task(self._publish_every_second())
        await asyncio.gather(*agents)
        publisher.cancel()
        self.publish()
        self.counters[self.base + SLOTS.index("done")] = 1
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "sent": self.sent, "acked": self.acked, "facts_sent": self.facts_sent, "errors": self.errors,
            "error_messages": self.error_messages, "late": self.late, "steady": self.steady.tobytes(),
            "ramp": self.ramp.tobytes(), "slow": self.slow.tobytes(),
            "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss,
        }  # fmt: skip

    async def _publish_every_second(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(1.0)


def worker_main(plan: Plan, counters: Any, slot: int, results: Any) -> None:
    """Entry point of one load-generator process (multiprocessing, spawn)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results.put((slot, asyncio.run(Worker(plan, counters, slot).run())))


def latencies(blobs: Iterator[bytes]) -> list[float]:
    values = array.array("d")
    for blob in blobs:
        values.frombytes(blob)
    return sorted(values)

"""One agent floods at 50x its normal rate: is it held back, and do the other agents notice?

    .venv/bin/python bench/flood.py [--agents 20] [--facts 10] [--factor 50] [--seconds 15] [--runs 3]

A real collector (`zonewatch-collector serve --insecure` in a subprocess on 127.0.0.1, fresh SQLite
file) with `--agent-rate` set to 10x the normal rate, the sizing rule README gives. --agents normal
agents each send one batch of --facts interface samples a second (a busy host reporting every
second) on their own Report stream, and measure each batch's ack latency (send to ack). Each run:

1. baseline: --seconds of the normal agents alone;
2. flood: --seconds more while one extra agent sends --factor times the normal rate, as fast as
   the collector reads it (its window of unacknowledged batches stays full, like an agent with a
   big backlog).

Printed per run: the normal agents' p50/p99 ack latency in both halves, the flooder's facts/s
(offered and acknowledged), and a check that every batch acked is stored once. The reference for
the latency is the same agents' baseline in the same run; the last line is

    RESULT latency_change_pct=<median over runs> baseline_p50_ms=<median> flood_p50_ms=<median> target=10

latency_change_pct = (p50 during the flood / p50 before - 1) x 100; the target is < 10 %.
Exit status 0 when measured (target met or not), 1 when a batch was lost or a stream failed.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.sensors.interfaces import InterfaceSample  # noqa: E402
from agent.wire import REPORT_METHOD, batch_request, hello_request, parse_response  # noqa: E402

LISTENING = re.compile(r"collector listening on [\d.]+:(\d+)")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def samples(count: int) -> list[InterfaceSample]:
    return [
        InterfaceSample(f"eth{i}", 1000, 2000, 10, 20, 0, 0, 0, 0, 1000, 8000.0, 16000.0, 0, -1.0, False)
        for i in range(count)
    ]


class Agent:
    """One Report stream; batches sent one at a time (send, wait for the ack) or pipelined."""

    def __init__(self, target: str, agent_id: str) -> None:
        self.agent_id = agent_id
        self.channel = grpc.insecure_channel(target)
        self._requests: list[bytes | None] = []
        self._ready = threading.Condition()
        call = self.channel.stream_stream(
            REPORT_METHOD, request_serializer=None, response_deserializer=parse_response
        )
        self.responses = call(self._feed(), timeout=600)
        now = int(time.time() * 1000)
        self._put(
            hello_request(agent_id, agent_id, "bench", {"department": "bench"}, "", now).SerializeToString()
        )
        welcome = next(self.responses)
        assert welcome.WhichOneof("body") == "welcome", welcome
        self.seq = 0
        self.acked = 0
        self.facts_acked = 0

    def _feed(self):  # type: ignore[no-untyped-def]
        while True:
            with self._ready:
                while not self._requests:
                    self._ready.wait()
                item = self._requests.pop(0)
            if item is None:
                return
            yield item

    def _put(self, item: bytes | None) -> None:
        with self._ready:
            self._requests.append(item)
            self._ready.notify()

    def send(self, facts: list[InterfaceSample]) -> None:
        self.seq += 1
        now = int(time.time() * 1000)
        self._put(batch_request(self.seq, now, now, facts).SerializeToString())

    def ack(self) -> int:
        reply = next(self.responses)
        assert reply.WhichOneof("body") == "ack", reply
        self.acked = reply.ack.acked_seq
        return self.acked

    def close(self) -> None:
        self._put(None)
        self.channel.close()


def normal_agent(
    agent: Agent, facts: int, stop: threading.Event, latencies: list[tuple[float, float]]
) -> None:
    batch = samples(facts)
    next_at = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        agent.send(batch)
        agent.ack()
        latencies.append((started, time.monotonic() - started))
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))


def flooder(agent: Agent, facts_per_s: float, stop: threading.Event, window: int = 32) -> None:
    """Offers facts_per_s in batches of 100, keeping up to ``window`` unacknowledged (an agent's window)."""
    batch = samples(100)
    interval = 100 / facts_per_s
    next_at = time.monotonic()
    in_flight = 0
    while not stop.is_set():
        while in_flight < window and time.monotonic() >= next_at:
            agent.send(batch)
            in_flight += 1
            next_at += interval
        if in_flight:
            agent.ack()
            in_flight = agent.seq - agent.acked
        else:
            time.sleep(min(0.01, max(0.0, next_at - time.monotonic())))
    while agent.acked < agent.seq:
        agent.ack()


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def one_run(args: argparse.Namespace, number: int) -> tuple[float, float, float, bool]:
    work = Path(tempfile.mkdtemp(prefix="zw-flood-"))
    db = work / "c.db"
    rate = 10 * args.facts  # the sizing rule: 10x the normal rate per agent
    collector = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--insecure", "--db", str(db),
         "--listen", "127.0.0.1:0", "--agent-rate", str(rate)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert collector.stderr is not None
    port = 0
    for line in collector.stderr:
        if m := LISTENING.search(line):
            port = int(m.group(1))
            break
    threading.Thread(target=lambda: collector.stderr and collector.stderr.read(), daemon=True).start()
    target = f"127.0.0.1:{port}"
    ok = True
    try:
        stop_normal, stop_flood = threading.Event(), threading.Event()
        agents = [Agent(target, f"normal-{i:02d}") for i in range(args.agents)]
        latencies: list[list[tuple[float, float]]] = [[] for _ in agents]
        threads = [
            threading.Thread(target=normal_agent, args=(a, args.facts, stop_normal, lat), daemon=True)
            for a, lat in zip(agents, latencies, strict=True)
        ]
        for t in threads:
            t.start()
        time.sleep(2)  # warm-up
        baseline_from = time.monotonic()
        time.sleep(args.seconds)
        flood_from = time.monotonic()
        flood = Agent(target, "flood-01")
        offered = args.factor * args.facts
        flood_thread = threading.Thread(target=flooder, args=(flood, offered, stop_flood), daemon=True)
        flood_thread.start()
        time.sleep(args.seconds)
        flood_until = time.monotonic()
        flood_acked = flood.acked  # before the in-flight window drains
        stop_flood.set()
        flood_thread.join(120)
        stop_normal.set()
        for t in threads:
            t.join(30)
        flood_facts_per_s = flood_acked * 100 / (flood_until - flood_from)
        before = [d for lat in latencies for s, d in lat if baseline_from <= s < flood_from]
        during = [d for lat in latencies for s, d in lat if flood_from <= s < flood_until]
        for a in [*agents, flood]:
            a.close()
        stored = _stored(db)
        for a in [*agents, flood]:
            if stored.get(a.agent_id, 0) < a.acked:
                ok = False
                kept = stored.get(a.agent_id, 0)
                progress(f"run {number}: {a.agent_id} acked {a.acked} batches but {kept} stored")
    finally:
        collector.terminate()
        collector.wait(30)
    b50, d50 = p(before, 0.5) * 1000, p(during, 0.5) * 1000
    progress(
        f"run {number}: normal agents ack p50 {b50:.2f} ms / p99 {p(before, 0.99) * 1000:.2f} ms before, "
        f"{d50:.2f} / {p(during, 0.99) * 1000:.2f} ms during the flood; flooder offered {offered} facts/s, "
        f"acked {flood_facts_per_s:.0f} facts/s (limit {rate}); every acked batch stored: {ok}"
    )
    return b50, d50, flood_facts_per_s, ok


def _stored(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return dict(
            con.execute(
                "SELECT a.agent_id, count(*) FROM batches AS b JOIN agents AS a ON a.id = b.agent"
                " WHERE b.status = 'stored' GROUP BY a.agent_id"
            ).fetchall()
        )
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20, help="normal agents (default 20)")
    parser.add_argument(
        "--facts", type=int, default=10, help="facts per normal agent per second (default 10)"
    )
    parser.add_argument("--factor", type=int, default=50, help="the flooder's rate over normal (default 50)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each half of a run (default 15)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    args = parser.parse_args(argv)
    results = [one_run(args, n + 1) for n in range(args.runs)]
    changes = [(d / b - 1) * 100 for b, d, _, _ in results]
    change = statistics.median(changes)
    base = statistics.median(r[0] for r in results)
    flood = statistics.median(r[1] for r in results)
    held = statistics.median(r[2] for r in results)
    print(f"normal agents' ack p50: {base:.2f} ms before, {flood:.2f} ms during (change {change:+.1f} %, "
          f"runs {', '.join(f'{c:+.1f}' for c in changes)}); flooder held at {held:.0f} facts/s "
          f"(offered {args.factor * args.facts}, limit {10 * args.facts})")  # fmt: skip
    figures = f"latency_change_pct={change:.1f} baseline_p50_ms={base:.2f} flood_p50_ms={flood:.2f}"
    print(f"RESULT {figures} target=10")
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

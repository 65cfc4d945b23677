"""Facts per second through the full default rule pack, on one core, against a no-op pipeline.

    .venv/bin/python bench/rules.py [--facts 300000] [--runs 5] [--agents 200]

The facts are what a city's agents send (ValidBatch rows, as the writer process has them after a
commit): per agent and window, access summaries (ordinary clients, a few admins, now and then a scan),
flows, zone traffic, interface samples and health, plus listener changes. Both pipelines run the
detector's real path (collector/detection.py: events built with the host's labels and the collector's
enrichment), then:

- rules: the engine with every rule of rules/ (what `zonewatch-collector serve` runs), incidents
  stored in a real SQLite file;
- no-op: the same events handed to an engine that judges nothing.

The ratio rules/no-op is the cost of the rules themselves. Medians over --runs. Last line:

    RESULT facts_per_s=N noop_facts_per_s=N ratio=R target=100000
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector.config import default_rules_dir  # noqa: E402
from collector.detection import Detector  # noqa: E402
from collector.model import (  # noqa: E402
    AccessRow,
    AgentHello,
    DetectionConfig,
    FlowRow,
    HealthRow,
    HostLabels,
    ListenerRow,
    Settled,
    ValidBatch,
    ZoneInfo,
    ZoneTrafficRow,
)
from collector.store.database import open_database  # noqa: E402
from collector.store.writer import Writer  # noqa: E402

DEPARTMENTS = ("市公安局", "市财政局", "市教育局", "市卫健委", "县人社局")
ZONES = {
    "市级横向外网": ZoneInfo("extranet", "horizontal", False),
    "省级纵向外网": ZoneInfo("extranet", "vertical", False),
    "运维区": ZoneInfo("extranet", "horizontal", True),
    "公安专网": ZoneInfo("dedicated", "", False),
    "互联网": ZoneInfo("internet", "", False),
}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def make_batches(agents: list[str], total: int, seed: int = 7) -> list[ValidBatch]:
    """About ``total`` facts in one batch per agent per window, windows of 10 s."""
    rng = random.Random(seed)
    batches: list[ValidBatch] = []
    facts = 0
    t0 = 1_800_000_000_000
    window = 0
    seq = dict.fromkeys(agents, 0)
    while facts < total:
        t = t0 + window * 10_000
        for agent in agents:
            seq[agent] += 1
            access: list[AccessRow] = []
            for _ in range(rng.randint(8, 16)):  # ordinary clients: one service, a few connections
                peer = f"10.{rng.randint(1, 40)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                port = rng.choice((80, 443, 8080, 3306))
                service, sport = ("mysql", 3306) if port == 3306 else ("", 0)
                volume = rng.randint(1000, 10**6), rng.randint(1000, 10**6)
                access.append(
                    AccessRow(t, True, peer, "市级横向外网", "市级横向外网", rng.randint(1, 5), 1, 1, 0, 0, 0,
                              *volume, 10_000, (port,), service, sport)
                )  # fmt: skip
            if rng.random() < 0.02:  # now and then a scanner
                ports = tuple(sorted(rng.sample(range(1, 65536), 64)))
                access.append(
                    AccessRow(t, True, "198.51.100.7", "互联网", "市级横向外网", 200, 200, 1, 150, 50, 0,
                              0, 0, 10_000, ports, "", 0)
                )  # fmt: skip
            flows = [
                FlowRow(t, 6, "10.250.1.10", 40000 + i, f"10.1.0.{i}", 443, "eth0", 5000, 90000, 20, 60,
                        t - 5000, t, 0x1B, "市级横向外网", True, 1234, "java", "app", "java -jar app.jar")
                for i in range(rng.randint(2, 6))
            ]  # fmt: skip
            zones = [
                ZoneTrafficRow(t, zone, "", rng.randint(10**4, 10**7), rng.randint(10**4, 10**7), 100, 100,
                               10_000, "nftables", 1.0)
                for zone in ("市级横向外网", "省级纵向外网", "互联网")
            ]  # fmt: skip
            samples = [
                [t, t], ["eth0", "eth1"], [1, 1], [1, 1], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0], [0, 0],
                [10_000, 10_000], [8e6, 9e5], [4e6, 1e5], [10**9, 10**9], [0.008, 0.0009], [0, 0],
            ]  # fmt: skip
            health = [HealthRow(t, 0.3, 45 << 20, 0, 0, 100_000 + window * 1000, 0, "{}")]
            listeners = []
            if rng.random() < 0.01:
                port = 9000 + window % 100
                listeners.append(
                    ListenerRow(t, "opened", 6, "0.0.0.0", port, 4321, "python3", "app", "python3")
                )
            n = len(access) + len(flows) + len(zones) + 2 + len(health) + len(listeners)
            facts += n
            batches.append(
                ValidBatch(
                    agent, seq[agent], t, t, t, t, samples, [], zones, flows, health, [], access, listeners
                )
            )
        window += 1
    return batches


def count_facts(batches: list[ValidBatch]) -> int:
    return sum(
        len(b.access_rows) + len(b.flow_rows) + len(b.zone_rows) + b.sample_count + len(b.health_rows)
        + len(b.listener_rows)
        for b in batches
    )  # fmt: skip


class NoopEngine:
    """Judges nothing; consumes the events like the engine does (a list), so only the rules differ."""

    def process(self, events: Any) -> list[Any]:
        for _ in events:
            pass
        return []

    def reload(self, rules: Any) -> None:
        pass


def run(batches: list[ValidBatch], db_path: Path, agents: list[str], *, noop: bool) -> tuple[float, int]:
    db = open_database(db_path)
    writer = Writer(db)
    for i, agent in enumerate(agents):
        labels = HostLabels(DEPARTMENTS[i % len(DEPARTMENTS)], "高新区", "", "office")
        writer.register(
            AgentHello(agent, f"host-{i}", "bench", labels, "", 1_800_000_000_000), 1_800_000_000_000
        )
    detector = Detector(db)
    detector.configure(DetectionConfig(str(default_rules_dir()), ZONES, {}, 10.0))
    if noop:
        detector.engine = NoopEngine()  # type: ignore[assignment]
    outcomes = [Settled(b.seq, False, 0, 0) for b in batches]
    group = 200
    started = time.process_time()
    for i in range(0, len(batches), group):
        detector.observe(batches[i : i + group], outcomes[i : i + group], writer.agent_key)
    elapsed = time.process_time() - started
    raised = detector.raised
    db.close()
    return elapsed, raised


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", type=int, default=300_000, help="facts per run (default 300000)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each pipeline (default 5)")
    parser.add_argument("--agents", type=int, default=200, help="agents reporting (default 200)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    gc.set_threshold(100_000, 50, 1_000)  # as the collector's writer process runs (store/process.py)
    agents = [f"agent-{i:05d}" for i in range(args.agents)]
    batches = make_batches(agents, args.facts)
    facts = count_facts(batches)
    progress(
        f"{facts} facts in {len(batches)} batches from {len(agents)} agents; rules from {default_rules_dir()}"
    )
    rates: dict[str, list[float]] = {"rules": [], "noop": []}
    raised = 0
    with tempfile.TemporaryDirectory(prefix="zw-rules-") as tmp:
        for n in range(args.runs):
            for name in ("noop", "rules"):
                path = Path(tmp) / f"{name}-{n}.db"
                elapsed, count = run(batches, path, agents, noop=name == "noop")
                rates[name].append(facts / elapsed)
                if name == "rules":
                    raised = count
                progress(
                    f"run {n + 1}/{args.runs} {name}: {facts / elapsed:,.0f} facts/s ({elapsed:.2f} s CPU)"
                )
    rules_rate = statistics.median(rates["rules"])
    noop_rate = statistics.median(rates["noop"])
    print(f"facts={facts} incidents_raised_or_updated={raised}")
    print(f"rules: median {rules_rate:,.0f} facts/s; no-op pipeline: median {noop_rate:,.0f} facts/s")
    print(
        f"RESULT facts_per_s={rules_rate:.0f} noop_facts_per_s={noop_rate:.0f} "
        f"ratio={rules_rate / noop_rate:.3f} target=100000"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

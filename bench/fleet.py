"""A fleet of 10,000 simulated agents reporting every 10 s to one real collector, with TLS and the rules on.

    .venv/bin/python bench/fleet.py [--agents 10000] [--duration 300] [--interval 10] [--workers N]
    .venv/bin/python bench/fleet.py --agents 50 --duration 15        # a quick check, ~40 s

The collector is `zonewatch-collector serve` in its own process (mTLS, the default rule pack, the
zone catalog deploy/zones.sample.yaml) on 127.0.0.1, with a copy of an enrolled database. Every
simulated agent has its own key and certificate, enrolled over the real Enroll RPC with tokens made by
`zonewatch-collector tokens create`; the identities and the enrolled database are cached (--cache), so
only the first run, or one with more agents than the cache holds, pays for enrollment. The agents are
coroutines in --workers processes (bench/fleetsim.py): each its own mTLS channel and Report stream,
connecting over --ramp seconds, then one batch of 9–18 facts (interface samples, zone traffic, health,
access summaries, flows) every --interval at its own random phase.

Measured over the steady window (--duration, after the ramp and one more interval): ack latency
p50/p99 (writing a batch to reading its ack; an ack follows the durable COMMIT), facts/s acknowledged,
the collector's CPU (its process and its writer child, psutil) in % of the machine's cores, its RSS,
and the load generator's CPU. After the agents close and the collector has shut down, the facts
stored in the database are counted: lost = facts sent - facts stored, which must be 0. Last line:

    RESULT ack_p99_ms=N agents=N facts_per_s=N lost=N target=50

Exit status 0 when measured (target met or not), 1 when facts were lost or a stream failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import queue
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fleetsim  # noqa: E402

ZONES = ROOT / "deploy" / "zones.sample.yaml"
FACT_TABLES = ("interface_samples", "other_facts", "zone_traffic", "flows")  # one row per stored fact
LISTENING = re.compile(r"collector listening on [\d.]+:(\d+) \(mTLS; enrollment on [\d.]+:(\d+)\)")
TOKEN = re.compile(r"^token \d+: (\S+)$", re.M)
CLK_TCK = os.sysconf("SC_CLK_TCK")
REFERENCE = ("reference: Velociraptor serves ~10,000 clients on 2 cores; Fleet (osquery) ~2,500 hosts "
             "per vCPU; target: ack p99 < 50 ms, collector within 2 cores, lost 0")  # fmt: skip


def say(message: str) -> None:
    print(f"[fleet] {message}", flush=True)


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            say(f"RLIMIT_NOFILE hard limit is {hard}, {needed} wanted: connections may fail")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, max(needed, soft))), hard))


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "collector.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"zonewatch-collector {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


class CollectorProcess:
    """`zonewatch-collector serve` as a child; stopped with SIGTERM (then SIGKILL) by its PID."""

    def __init__(self, db: Path, pki: Path, log: Path, *extra: str, profile: Path | None = None) -> None:
        self.log = log
        # cProfile sees the event loop's thread only (gRPC's threads and the writer child are not in it).
        prefix = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        self.process = subprocess.Popen(
            [sys.executable, *prefix, "-m", "collector.cli", "serve", "--db", str(db), "--pki", str(pki),
             "--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0", *extra],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        self.port = self.enroll_port = 0
        sink = log.open("w", encoding="utf-8")
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        for line in self.process.stderr:
            sink.write(line)
            if m := LISTENING.search(line):
                self.port, self.enroll_port = int(m.group(1)), int(m.group(2))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            sink.close()
            self.stop()
            raise SystemExit(f"the collector did not start; see {log}")
        stream = self.process.stderr

        def drain() -> None:  # the rest of its log, so that the pipe never fills and blocks it
            with sink:
                shutil.copyfileobj(stream, sink)

        threading.Thread(target=drain, daemon=True).start()
        self.ps = psutil.Process(self.process.pid)

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def threads_cpu(self) -> dict[str, float]:
        """CPU seconds per (process, thread name): where the collector's time goes."""
        found: dict[str, float] = {}
        for n, p in enumerate(self.processes()):
            for task in Path(f"/proc/{p.pid}/task").glob("*"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (task / "stat").read_text()
                    name = stat[stat.index("(") + 1 : stat.rindex(")")]
                    fields = stat[stat.rindex(")") + 2 :].split()
                    key = f"{'main' if n == 0 else 'writer'}:{name}"
                    found[key] = found.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        return found

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


# --- the identity cache ----------------------------------------------------------------------


def ensure_identities(cache: Path, agents: int, concurrency: int) -> None:
    """The cache holds a PKI, an enrolled database and one identity per agent index < ``agents``."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    db, pki, identities = cache / "enrolled.db", cache / "pki", cache / "identities.jsonl"
    cache.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists() and not any(pki.glob("*")):
        cli("init", "--db", str(db), "--pki", str(pki))
    have = fleetsim.read_identities(identities)
    missing = [i for i in range(agents) if i not in have]
    if not missing:
        say(f"{agents} identities from the cache {cache}")
        return
    say(f"enrolling {len(missing)} agents over the Enroll RPC (cached in {cache} for later runs)")
    collector = CollectorProcess(db, pki, cache / "enroll-collector.log", "--no-rules")
    try:
        groups: dict[tuple[str, str], int] = {}
        for i in missing:
            groups[fleetsim.labels_of(i)] = groups.get(fleetsim.labels_of(i), 0) + 1
        tokens = {}
        for (department, county), uses in groups.items():
            out = cli("tokens", "create", "--db", str(db), "--pki", str(pki), "--department", department,
                      "--county", county, "--role", "office", "--uses", str(uses), "--expires", "2h",
                      "--note", "bench/fleet.py")  # fmt: skip
            m = TOKEN.search(out)
            if m is None:
                raise SystemExit(f"cannot read the token in: {out}")
            tokens[(department, county)] = m.group(1)
        ca_pem = (pki / "ca.crt").read_bytes()
        columns = (TextColumn("enrolling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as progress:
            task = progress.add_task("enroll", total=len(missing))
            failed = asyncio.run(fleetsim.enroll_all(
                f"127.0.0.1:{collector.enroll_port}", ca_pem, tokens, missing, identities, concurrency,
                lambda: progress.advance(task),
            ))  # fmt: skip
    finally:
        collector.stop()
    if failed:
        raise SystemExit(f"{failed} enrollments failed; see {cache / 'enroll-collector.log'}")


def copy_database(source: Path, target: Path, agent_ids: set[str]) -> None:
    """A consistent copy of the enrolled database (SQLite's backup API), holding only the agents of this
    run: the cache may hold more, and enrolled agents that never report would be judged silent (the
    collector's silence check, run after run) and decided by the migration pass, skewing the figures."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
        dst.execute("CREATE TEMP TABLE wanted (agent_id TEXT PRIMARY KEY)")
        dst.executemany("INSERT INTO wanted VALUES (?)", [(a,) for a in agent_ids])
        dst.execute("DELETE FROM agents WHERE agent_id NOT IN (SELECT agent_id FROM wanted)")
    dst.execute("VACUUM")  # no free pages left: the file's growth is then the run's data
    dst.close()
    src.close()


def stored_facts(db: Path) -> tuple[int, int]:
    """(facts stored, rejections); the WAL is checkpointed into the file first, so its size is the data's."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        facts = sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in FACT_TABLES)
        rejected = con.execute("SELECT count(*) FROM rejections").fetchone()[0]
        return facts, rejected
    finally:
        con.close()


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


# --- one run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    cores = psutil.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="zw-fleet-", dir=args.dir))
    db, identities = work / "collector.db", args.cache / "identities.jsonl"
    known = fleetsim.read_identities(identities)
    copy_database(args.cache / "enrolled.db", db, {known[i]["agent_id"] for i in range(args.agents)})
    size_before = db_bytes(db)
    serve_args = ["--zones", str(ZONES), "--sample-interval", str(max(1, round(args.interval)))]
    collector = CollectorProcess(
        db, args.cache / "pki", work / "collector.log", *serve_args, profile=args.profile
    )
    say(f"collector pid {collector.process.pid} on 127.0.0.1:{collector.port} (mTLS, default rule pack, "
        f"{ZONES.name}); database {db}")  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.Array("d", args.workers * len(fleetsim.SLOTS), lock=False)
    results = ctx.Queue()
    start = time.monotonic() + 2.0
    measure_from = start + args.ramp + args.interval
    stop = measure_from + args.duration
    ca_pem = (args.cache / "pki" / "ca.crt").read_bytes()
    workers = []
    for slot in range(args.workers):
        plan = fleetsim.Plan(f"127.0.0.1:{collector.port}", ca_pem, identities,
                             tuple(range(slot, args.agents, args.workers)), start, args.ramp, measure_from,
                             stop, args.interval, seed=slot + 1)  # fmt: skip
        w = ctx.Process(target=fleetsim.worker_main, args=(plan, counters, slot, results), daemon=True)
        w.start()
        workers.append(w)
    say(
        f"{args.agents} agents in {args.workers} processes, connecting over {args.ramp:g} s; steady window "
        f"{args.duration:g} s from t={measure_from - start:.0f} s; a batch every {args.interval:g} s"
    )
    gen = [psutil.Process(w.pid) for w in workers]
    outcome: dict[int, dict[str, Any]] = {}
    marks: dict[str, tuple[float, float, float]] = {}  # "from"/"to": (time, collector CPU s, generator CPU s)
    threads: dict[str, dict[str, float]] = {}  # "from"/"to": the collector's CPU s per thread
    rss_max = 0
    last = (time.monotonic(), collector.cpu_s(), 0.0, 0.0)
    next_line = time.monotonic() + 10.0
    try:
        while len(outcome) < len(workers):
            # Wake for the next progress line, or exactly at the window's edges to read the CPU there.
            edges = [t for name, t in (("from", measure_from), ("to", stop)) if name not in marks]
            wake = min([next_line, *edges])
            while len(outcome) < len(workers) and time.monotonic() < wake:
                try:
                    slot, result = results.get(timeout=max(0.05, wake - time.monotonic()))
                    outcome[slot] = result
                except queue.Empty:
                    pass
            now = time.monotonic()
            if now > stop + args.interval + 600:
                raise SystemExit("the simulated agents did not finish 10 minutes after the window")
            cpu, gen_cpu = collector.cpu_s(), _cpu(gen)
            for name, t in (("from", measure_from), ("to", stop)):
                if name not in marks and now >= t:
                    marks[name] = (now, cpu, gen_cpu)
                    threads[name] = collector.threads_cpu()
            if now < next_line:
                continue
            next_line = now + 10.0
            rss = collector.rss()
            rss_max = max(rss_max, rss)
            col = {name: sum(counters[s * len(fleetsim.SLOTS) + n] for s in range(args.workers))
                   for n, name in enumerate(fleetsim.SLOTS)}  # fmt: skip
            p99 = max(counters[s * len(fleetsim.SLOTS) + 5] for s in range(args.workers))
            dt = now - last[0]
            say(
                f"t={now - start:5.0f} s  agents {col['connected']:.0f}  acked {col['acked']:.0f} batches, "
                f"{(col['facts_sent'] - last[3]) / dt:,.0f} facts/s  recent ack p99 {p99:.1f} ms  "
                f"collector {(cpu - last[1]) / dt / cores * 100:.0f} % of {cores} cores, "
                f"RSS {rss / 2**20:.0f} MB  load generator {(gen_cpu - last[2]) / dt / cores * 100:.0f} %  "
                f"errors {col['errors']:.0f}"
            )
            last = (now, cpu, gen_cpu, col["facts_sent"])
        for w in workers:
            w.join(30)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        code = collector.stop()
    stored, rejected = stored_facts(db)
    growth = db_bytes(db) - size_before
    if len(threads) == 2:
        spent = {k: v - threads["from"].get(k, 0.0) for k, v in threads["to"].items()}
        seconds = max(1e-9, marks["to"][0] - marks["from"][0])
        busiest = sorted(spent.items(), key=lambda kv: -kv[1])[:6]
        say("collector threads in the window (cores): "
            + ", ".join(f"{k} {v / seconds:.2f}" for k, v in busiest))  # fmt: skip
    return report(args, outcome, stored, rejected, growth, code, marks, rss_max, cores, work)


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def report(args: argparse.Namespace, outcome: dict[int, dict[str, Any]], stored: int, rejected: int,
           growth: int, code: int, marks: dict[str, tuple[float, float, float]], rss_max: int, cores: int,
           work: Path) -> int:  # fmt: skip
    results = list(outcome.values())
    steady = fleetsim.latencies(r["steady"] for r in results)
    ramp = fleetsim.latencies(r["ramp"] for r in results)
    sent = sum(r["facts_sent"] for r in results)
    batches = sum(r["sent"] for r in results)
    errors = sum(r["errors"] for r in results)
    lost = sent - stored
    begin, end = marks.get("from", (0.0, 0.0, 0.0)), marks.get("to", (1.0, 0.0, 0.0))
    seconds = max(1e-9, end[0] - begin[0])
    collector_cores = (end[1] - begin[1]) / seconds
    gen_cores = (end[2] - begin[2]) / seconds
    facts_per_batch = sent / batches if batches else 0.0
    facts_per_s = len(steady) * facts_per_batch / args.duration
    per_fact = growth / stored if stored else 0.0
    day = per_fact * facts_per_batch * 86_400 / args.interval
    slow = fleetsim.latencies(r["slow"] for r in results)
    if slow:
        # Slow acks come in bursts: one burst is one stall of the collector. When they happened shows
        # which periodic step stalls it (retention every 30 s, migration every 10 s, detection every 2 s).
        bursts: list[list[float]] = []
        for t in slow:
            if bursts and t - bursts[-1][-1] < 1.0:
                bursts[-1].append(t)
            else:
                bursts.append([t])
        start = marks.get("from", (0.0,))[0] - args.interval - args.ramp
        say(
            f"{len(slow)} acks over {fleetsim.SLOW_S * 1000:.0f} ms in {len(bursts)} bursts, at t = "
            + ", ".join(f"{b[0] - start:.1f} s ({len(b)}, {b[-1] - b[0]:.2f} s)" for b in bursts[:20])
        )
    for r in results:
        for message in r["error_messages"]:
            say(f"error: {message}")
    print(
        f"agents {args.agents}, a batch every {args.interval:g} s, steady window {args.duration:g} s "
        f"(ramp {args.ramp:g} s before it)"
    )
    print(
        f"batches {batches} ({len(steady)} in the window), facts sent {sent} "
        f"({facts_per_batch:.1f} a batch), "
        f"late sends {sum(r['late'] for r in results)}, stream errors {errors}, rejections {rejected}"
    )
    print(
        f"ack latency in the window: p50 {pct(steady, 0.5):.1f} ms, p99 {pct(steady, 0.99):.1f} ms, "
        f"max {pct(steady, 1.0):.1f} ms; during the ramp: p50 {pct(ramp, 0.5):.1f} ms, "
        f"p99 {pct(ramp, 0.99):.1f} ms, max {pct(ramp, 1.0):.1f} ms ({len(ramp)} batches)"
    )
    print(f"facts/s acknowledged in the window: {facts_per_s:,.0f}")
    print(
        f"collector CPU {collector_cores:.2f} cores = {collector_cores / cores * 100:.0f} % of {cores} "
        f"(process + writer child), RSS max {rss_max / 2**20:.0f} MB "
        f"({rss_max / max(1, args.agents) / 1024:.0f} KB an agent); "
        f"load generator {gen_cores:.2f} cores ({args.workers} processes)"
    )
    print(
        f"database grew {growth / 2**20:.1f} MB for {stored} facts: {per_fact:.0f} B a fact, "
        f"{day / 2**20:.2f} MB per agent per day at this interval and mix"
    )
    print(f"facts sent {sent}, stored {stored}: lost {lost}; collector exit status {code}")
    print(REFERENCE)
    print(
        f"RESULT ack_p99_ms={pct(steady, 0.99):.1f} agents={args.agents} facts_per_s={facts_per_s:.0f} "
        f"lost={lost} target=50"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"kept {work}")
    return 1 if lost or errors or len(results) < args.workers else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="simulated agents (default 10000)")
    parser.add_argument("--duration", type=float, default=300.0, help="steady window, s (default 300)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between batches (default 10)")
    parser.add_argument("--ramp", type=float, help="seconds over which agents connect (default agents/200, "
                        "at least 2)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="load-generator processes (default 1 per 2,500 agents)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zonewatch" / "bench-fleet",
        help="identity cache (default ~/.cache/zonewatch/bench-fleet)",
    )
    parser.add_argument("--dir", type=Path, help="where the run's database goes (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run's database and collector log")
    parser.add_argument(
        "--enroll-concurrency", type=int, default=32, help="Enroll calls in flight (default 32)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the collector's event loop under cProfile, stats to FILE (slower: do not compare figures)",
    )
    args = parser.parse_args(argv)
    if args.agents < 1 or args.duration <= 0 or args.interval <= 0:
        parser.error("--agents, --duration and --interval must be positive")
    args.ramp = args.ramp if args.ramp is not None else max(2.0, args.agents / 200)
    args.workers = args.workers or max(1, math.ceil(args.agents / 2500))
    raise_nofile(args.agents + 2000)
    ensure_identities(args.cache, args.agents, args.enroll_concurrency)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Retention on a real SQLite file with the real Writer: exact rollups, late data, pruning, bounded steps.

The oracle is a ledger of every fact committed, summed in Python: the rollups must equal it
exactly, whatever order, chunking or lateness the facts came in with.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import now_ms, run_cli, sample

from agent.wire import REPORT_METHOD, batch_request, hello_request, parse_response
from collector.cli import build_parser, serve_config
from collector.config import CollectorConfig
from collector.errors import CollectorError, StoreError
from collector.model import AgentHello, HostLabels, Settled, ValidBatch, ZoneTrafficRow
from collector.server import create_server
from collector.store import open_database, schema
from collector.store.queries import bandwidth
from collector.store.retention import (
    DAY_MS,
    HOUR_MS,
    INT64_MAX,
    MINUTE_MS,
    Maintenance,
    MaintenanceReport,
    RetentionPolicy,
)
from collector.store.traffic import traffic
from collector.store.writer import Writer

T0 = 1_795_000_000_000 // HOUR_MS * HOUR_MS  # an hour boundary (2026-11-18, UTC)
AGENTS = ("agent-a", "agent-b", "agent-c")
INTERFACES = ("eth0", "eth1", "bond0")
ZONES = ("省电子政务外网（纵向）", "公安专网", "internet")
# A sample in SAMPLE_COLUMNS order: time_ms, interface, rx/tx bytes, rx/tx packets, rx/tx errors,
# rx/tx drops, interval_ms, rx_bps, tx_bps, speed_bps, utilization, counter_reset.
Sample = tuple[Any, ...]


def sample_row(
    time_ms: int,
    interface: str = "eth0",
    counters: tuple[int, ...] = (1000, 2000, 10, 20, 0, 0, 0, 0),
    *,
    interval_ms: int = 10_000,
    rx_bps: float = 800.0,
    tx_bps: float = 1600.0,
    reset: bool = False,
) -> Sample:
    return (time_ms, interface, *counters, interval_ms, rx_bps, tx_bps, 1_000_000_000, 0.001, reset)


def zone_row(time_ms: int, zone: str = ZONES[0], bytes_in: int = 5000, rate: float = 1.0) -> ZoneTrafficRow:
    return ZoneTrafficRow(time_ms, zone, "", bytes_in, bytes_in // 2, 7, 3, 10_000, "nftables", rate)


class Fleet:
    """Agents committing through the real Writer, and the ledger of what they committed."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.writer = Writer(db)
        self.seq: dict[str, int] = {}
        self.samples: list[tuple[str, Sample]] = []
        self.zones: list[tuple[str, ZoneTrafficRow]] = []
        self.sent: dict[tuple[str, int], ValidBatch] = {}

    def send(
        self,
        agent_id: str,
        samples: list[Sample] | None = None,
        zones: list[ZoneTrafficRow] | None = None,
        *,
        received_ms: int | None = None,
    ) -> ValidBatch:
        samples, zones = samples or [], zones or []
        if agent_id not in self.seq:
            self.writer.register(
                AgentHello(agent_id, "host-" + agent_id, "t", HostLabels("市公安局"), "", T0), T0
            )
            self.seq[agent_id] = 0
        self.seq[agent_id] += 1
        times = [s[0] for s in samples] + [z.time_ms for z in zones]
        sent = min(times, default=T0)
        batch = ValidBatch(
            agent_id=agent_id,
            seq=self.seq[agent_id],
            sent_ms=sent,
            received_ms=received_ms if received_ms is not None else max(times, default=sent),
            first_ms=sent,
            last_ms=max(times, default=sent),
            sample_columns=ValidBatch.columns_of(samples),
            other_rows=[],
            zone_rows=zones,
        )
        (outcome,) = self.writer.commit([batch])
        assert outcome == Settled(batch.seq, False, 0, 0)
        self.samples.extend((agent_id, s) for s in samples)
        self.zones.extend((agent_id, z) for z in zones)
        self.sent[(agent_id, batch.seq)] = batch
        return batch


def random_traffic(fleet: Fleet, rng: random.Random, start_ms: int, end_ms: int, batches: int) -> None:
    """Batches of up to 10 minutes of facts each, anywhere in [start_ms, end_ms), in random order."""
    for _ in range(batches):
        agent = rng.choice(AGENTS)
        begin = rng.randrange(start_ms, end_ms - 10 * MINUTE_MS)
        samples = [
            sample_row(
                begin + rng.randrange(10 * MINUTE_MS),
                rng.choice(INTERFACES),
                tuple(rng.randrange(2**40) for _ in range(8)),
                interval_ms=rng.randrange(1, 86_400_000),
                rx_bps=rng.random() * 1e9,
                tx_bps=rng.random() * 1e9,
                reset=rng.random() < 0.1,
            )
            for _ in range(rng.randrange(0, 30))
        ]
        zones = [
            zone_row(
                begin + rng.randrange(10 * MINUTE_MS),
                rng.choice(ZONES),
                rng.randrange(2**40),
                rng.choice((1.0, 1.0, 0.5, 0.25, 0.1, 0.3)),
            )
            for _ in range(rng.randrange(0, 6))
        ]
        if samples or zones:
            fleet.send(agent, samples, zones)


# --- the oracle: the ledger summed in Python -------------------------------------------------


def _sqlite_round(value: float) -> int:
    """SQLite's round(): half away from zero (Python's round() goes to even)."""
    return math.floor(value + 0.5)


def expected_interfaces(
    ledger: list[tuple[str, Sample]], resolution: int, keep: Callable[[int], bool] = lambda _: True
) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    sums: dict[tuple[str, str, int], list[Any]] = {}
    for agent_id, s in ledger:
        bucket = s[0] // resolution * resolution
        if not keep(bucket):
            continue
        into = sums.setdefault((agent_id, s[1], bucket), [0] * 10 + [0.0, 0.0, 0])
        into[0] += 1
        for i in range(9):  # eight counters and interval_ms
            into[1 + i] += s[2 + i]
        into[10] = max(into[10], s[11])
        into[11] = max(into[11], s[12])
        into[12] += bool(s[15])
    return {key: tuple(v) for key, v in sums.items()}


def expected_zones(
    ledger: list[tuple[str, ZoneTrafficRow]], resolution: int, keep: Callable[[int], bool] = lambda _: True
) -> dict[tuple[str, str, int], tuple[int, ...]]:
    sums: dict[tuple[str, str, int], list[int]] = {}
    for agent_id, z in ledger:
        bucket = z.time_ms // resolution * resolution
        if not keep(bucket):
            continue
        into = sums.setdefault((agent_id, z.zone, bucket), [0] * 5)
        for i, count in enumerate((z.bytes_in, z.bytes_out, z.packets_in, z.packets_out)):
            into[i] += count if z.sampling_rate == 1.0 else _sqlite_round(count / z.sampling_rate)
        into[4] += z.window_ms
    return {key: tuple(v) for key, v in sums.items()}


def stored_interfaces(path: Path, resolution: int) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    rows = peek(
        path,
        "SELECT a.agent_id, s.interface, r.bucket_ms, r.samples, r.rx_bytes, r.tx_bytes, r.rx_packets,"
        " r.tx_packets, r.rx_errors, r.tx_errors, r.rx_drops, r.tx_drops, r.interval_ms, r.peak_rx_bps,"
        " r.peak_tx_bps, r.counter_resets FROM interface_rollups AS r JOIN agents AS a ON a.id = r.agent"
        " JOIN series AS s ON s.id = r.series WHERE r.resolution_ms = ?",
        (resolution,),
    )
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}


def stored_zones(path: Path, resolution: int) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    rows = peek(
        path,
        "SELECT a.agent_id, r.zone, r.bucket_ms, r.bytes_in, r.bytes_out, r.packets_in, r.packets_out,"
        " r.window_ms FROM zone_rollups AS r JOIN agents AS a ON a.id = r.agent WHERE r.resolution_ms = ?",
        (resolution,),
    )
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}


def assert_rollups_match(
    path: Path, fleet: Fleet, keep: dict[int, Callable[[int], bool]] | None = None
) -> None:
    keep = keep or {}
    for resolution in (MINUTE_MS, HOUR_MS):
        kept = keep.get(resolution, lambda _: True)
        assert stored_interfaces(path, resolution) == expected_interfaces(fleet.samples, resolution, kept)
        assert stored_zones(path, resolution) == expected_zones(fleet.zones, resolution, kept)


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def fleet(db: sqlite3.Connection) -> Fleet:
    return Fleet(db)


def peek(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a connection of its own: what is there is what was committed."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def count(path: Path, table: str) -> int:
    return int(peek(path, f"SELECT count(*) FROM {table}")[0][0])


def run_until_done(
    maintenance: Maintenance, now: int, budget: int = 50_000, limit: int = 10_000
) -> list[MaintenanceReport]:
    reports = []
    for _ in range(limit):
        reports.append(maintenance.run_step(now, budget))
        if reports[-1].done:
            return reports
    raise AssertionError(f"maintenance not done after {limit} steps: {reports[-1]}")


def watermarks(path: Path) -> dict[tuple[str, int], int]:
    return {
        (s, r): w for s, r, w in peek(path, "SELECT source, resolution_ms, watermark_ms FROM retention_state")
    }


def dump(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


# --- exact sums --------------------------------------------------------------------------------


def test_rollups_equal_the_sums_of_the_raw_rows_in_both_tiers(db: sqlite3.Connection, path: Path) -> None:
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(7), T0, T0 + 5 * HOUR_MS, batches=300)
    assert len(fleet.samples) > 3000 and len(fleet.zones) > 500
    # A budget that is no divisor of anything: buckets are split across steps and must add up.
    reports = run_until_done(Maintenance(db), T0 + 6 * HOUR_MS, budget=997)
    assert len(reports) > 3
    assert sum(r.rolled_samples for r in reports) == len(fleet.samples)
    assert sum(r.rolled_zone_rows for r in reports) == len(fleet.zones)
    assert_rollups_match(path, fleet)
    # Nothing older than 48 h: the raw rows are all still there.
    assert count(path, "interface_samples") == len(fleet.samples)
    assert count(path, "zone_traffic") == len(fleet.zones)


def test_the_hour_tier_is_the_sum_of_the_minute_tier(db: sqlite3.Connection, path: Path) -> None:
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(11), T0, T0 + 3 * HOUR_MS, batches=100)
    run_until_done(Maintenance(db), T0 + 4 * HOUR_MS, budget=500)
    minutes = stored_interfaces(path, MINUTE_MS)
    folded: dict[tuple[str, str, int], list[Any]] = {}
    for (agent_id, interface, bucket), values in minutes.items():
        into = folded.setdefault((agent_id, interface, bucket // HOUR_MS * HOUR_MS), [0] * 10 + [0.0, 0.0, 0])
        for i, value in enumerate(values):
            into[i] = max(into[i], value) if i in (10, 11) else into[i] + value
    assert stored_interfaces(path, HOUR_MS) == {key: tuple(v) for key, v in folded.items()}
    zone_minutes = stored_zones(path, MINUTE_MS)
    zone_folded: dict[tuple[str, str, int], list[int]] = {}
    for (agent_id, zone, bucket), values in zone_minutes.items():
        into = zone_folded.setdefault((agent_id, zone, bucket // HOUR_MS * HOUR_MS), [0] * 5)
        for i, value in enumerate(values):
            into[i] += value
    assert stored_zones(path, HOUR_MS) == {key: tuple(v) for key, v in zone_folded.items()}


def test_sampled_capture_counts_are_scaled_before_they_are_summed(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    fleet.send(
        "agent-a",
        zones=[zone_row(T0 + 1000, bytes_in=1001, rate=0.1), zone_row(T0 + 2000, bytes_in=3, rate=0.5)],
    )
    run_until_done(Maintenance(db), T0 + HOUR_MS)
    # 1001 / 0.1 = 10010 and 3 / 0.5 = 6; 500 / 0.1 = 5000 and 1 / 0.5 = 2; packets 70 + 14, 30 + 6.
    assert stored_zones(path, MINUTE_MS) == {("agent-a", ZONES[0], T0): (10_016, 5_002, 84, 36, 20_000)}


# --- late data ---------------------------------------------------------------------------------


def test_a_batch_arriving_after_its_buckets_were_rolled_up_is_added_to_them(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    for minute in range(10):
        t = T0 + minute * MINUTE_MS
        fleet.send("agent-a", [sample_row(t + 5_000), sample_row(t + 35_000, "eth1")], [zone_row(t + 5_000)])
    maintenance = Maintenance(db)
    now = T0 + 12 * MINUTE_MS + 30_000
    run_until_done(maintenance, now)
    # Buckets that ended a grace period (2 min) before now are rolled up: minute 10 ended at now - 2:30.
    assert watermarks(path)[("interface_samples", MINUTE_MS)] == T0 + 10 * MINUTE_MS
    assert watermarks(path)[("zone_traffic", MINUTE_MS)] == T0 + 10 * MINUTE_MS
    assert watermarks(path)[("interface_samples", HOUR_MS)] == T0
    before = stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0 + 3 * MINUTE_MS)]

    # Five minutes after its bucket was rolled up, a batch for minute 3 comes in (and one for a new
    # interface in the same minute): both are counted in the buckets already there.
    late = T0 + 3 * MINUTE_MS + 20_000
    fleet.send(
        "agent-b", [sample_row(late, "eth0")], [zone_row(late, ZONES[1])], received_ms=now + 5 * MINUTE_MS
    )
    fleet.send(
        "agent-a",
        [sample_row(late, "eth0", (1, 1, 1, 1, 1, 1, 1, 1), rx_bps=9e9), sample_row(late, "wlan0")],
        [zone_row(late, bytes_in=7)],
        received_ms=now + 5 * MINUTE_MS,
    )
    report = run_until_done(maintenance, now + 5 * MINUTE_MS)[0]
    assert (report.rolled_samples, report.rolled_zone_rows) == (3, 2)
    after = stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0 + 3 * MINUTE_MS)]
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1 and after[10] == 9e9
    assert_rollups_match(path, fleet)


def test_a_batch_received_before_a_step_but_committed_after_it_is_counted(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    """received_ms is stamped before the commit: a batch can carry a receive time older than a
    step that ran while it waited in the group commit. It must be counted all the same."""
    maintenance = Maintenance(db)
    fleet.send("agent-a", [sample_row(T0 + 1000)], [zone_row(T0 + 1000)])
    step_at = T0 + 10 * MINUTE_MS
    run_until_done(maintenance, step_at)
    fleet.send("agent-a", [sample_row(T0 + 2000)], [zone_row(T0 + 2000)], received_ms=step_at - 3_000)
    run_until_done(maintenance, step_at + 1_000)
    assert stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0)][0] == 2
    assert_rollups_match(path, fleet)


def test_a_batch_older_than_the_raw_retention_is_counted_then_pruned(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    """An agent back after three days replays its spool: the raw rows beside its facts are gone,
    so its buckets cannot be rolled up again from raw; its facts are added to them."""
    fleet.send("agent-a", [sample_row(T0 + 1000), sample_row(T0 + 2000)], [zone_row(T0 + 1000)])
    maintenance = Maintenance(db)
    now = T0 + 3 * DAY_MS
    run_until_done(maintenance, now)
    assert count(path, "interface_samples") == count(path, "zone_traffic") == 0

    fleet.send("agent-a", [sample_row(T0 + 3000)], [zone_row(T0 + 3000)], received_ms=now + 1000)
    run_until_done(maintenance, now + 2000)
    assert stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0)][:2] == (3, 3000)
    assert stored_zones(path, HOUR_MS)[("agent-a", ZONES[0], T0)][0] == 10_000
    assert_rollups_match(path, fleet)
    assert count(path, "interface_samples") == count(path, "zone_traffic") == 0
    assert count(path, "batches") == 2


def test_the_watermark_waits_for_the_backlog(fleet: Fleet, db: sqlite3.Connection, path: Path) -> None:
    for minute in range(20):
        fleet.send("agent-a", [sample_row(T0 + minute * MINUTE_MS + s * 1000) for s in range(10)])
    maintenance = Maintenance(db)
    now = T0 + HOUR_MS + 30 * MINUTE_MS
    report = maintenance.run_step(now, budget_rows=50)
    assert not report.done
    # Rows are left uncounted: no bucket can be called complete yet.
    assert watermarks(path)[("interface_samples", MINUTE_MS)] == 0
    run_until_done(maintenance, now, budget=50)
    assert watermarks(path)[("interface_samples", MINUTE_MS)] == T0 + HOUR_MS + 28 * MINUTE_MS
    assert watermarks(path)[("interface_samples", HOUR_MS)] == T0 + HOUR_MS
    # A clock stepping back does not take the watermark back.
    run_until_done(maintenance, now - HOUR_MS)
    assert watermarks(path)[("interface_samples", MINUTE_MS)] == T0 + HOUR_MS + 28 * MINUTE_MS


# --- pruning ---------------------------------------------------------------------------------


def _three_days(fleet: Fleet, now: int) -> None:
    """One batch per agent every 20 minutes over the three days before now."""
    for step in range(3 * 24 * 3):
        t = now - 3 * DAY_MS + step * 20 * MINUTE_MS
        for i, agent in enumerate(AGENTS):
            fleet.send(
                agent,
                [
                    sample_row(t + 1000 * k, INTERFACES[k % 3], (step + 1, i + 1, 1, 1, 0, 0, 0, 0))
                    for k in range(4)
                ],
                [zone_row(t + 500, ZONES[i], bytes_in=100 + step)],
            )


def test_pruning_removes_old_raw_rows_and_keeps_every_batch_row(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    now = T0 + 10 * DAY_MS
    _three_days(fleet, now)
    batches_before = peek(
        path, "SELECT agent, seq, sent_ms, received_ms, facts, status, first_ms, last_ms FROM batches"
    )
    reports = run_until_done(Maintenance(db), now, budget=1000)
    cutoff = now - 48 * HOUR_MS

    kept = [s for _, s in fleet.samples if s[0] >= cutoff]
    assert 0 < len(kept) < len(fleet.samples)
    assert sum(r.pruned_samples for r in reports) == len(fleet.samples) - len(kept)
    assert peek(path, "SELECT min(time_ms), count(*) FROM interface_samples") == [
        (min(s[0] for s in kept), len(kept))
    ]
    assert peek(path, "SELECT min(time_ms), count(*) FROM zone_traffic") == [
        (
            min(z.time_ms for _, z in fleet.zones if z.time_ms >= cutoff),
            sum(z.time_ms >= cutoff for _, z in fleet.zones),
        )
    ]
    # Every batch row is still there, unchanged but for the sample range of the pruned ones.
    assert (
        peek(path, "SELECT agent, seq, sent_ms, received_ms, facts, status, first_ms, last_ms FROM batches")
        == batches_before
    )
    assert peek(
        path, "SELECT count(*) FROM batches WHERE first_sample IS NULL AND last_ms >= ?", (cutoff,)
    ) == [(0,)]
    assert peek(
        path, "SELECT count(*) FROM batches WHERE first_sample IS NOT NULL AND last_ms < ?", (cutoff,)
    ) == [(0,)]
    # What remains is exactly the samples of the batches that still point at them.
    assert peek(
        path,
        "SELECT count(*) FROM interface_samples AS s"
        " LEFT JOIN batches AS b ON b.agent = s.agent AND b.seq = s.seq"
        " WHERE b.first_sample IS NULL OR s.id NOT BETWEEN b.first_sample AND b.last_sample",
    ) == [(0,)]
    # The rollups still hold everything, pruned or not.
    assert_rollups_match(path, fleet)


def test_a_replayed_old_batch_is_still_a_duplicate_after_pruning(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    now = T0 + 10 * DAY_MS
    _three_days(fleet, now)
    run_until_done(Maintenance(db), now)
    oldest = fleet.sent[("agent-a", 1)]
    assert peek(
        path,
        "SELECT first_sample FROM batches JOIN agents ON agents.id = agent"
        " WHERE agent_id = 'agent-a' AND seq = 1",
    ) == [(None,)]
    samples = count(path, "interface_samples")
    # The writer that pruned, and one started afresh on the file (nothing in memory), both know it.
    assert fleet.writer.commit([oldest]) == [Settled(fleet.seq["agent-a"], True, 0, 0)]
    restarted = open_database(path)
    try:
        assert Writer(restarted).commit([oldest, fleet.sent[("agent-b", 5)]]) == [
            Settled(fleet.seq["agent-a"], True, 0, 0),
            Settled(fleet.seq["agent-b"], True, 0, 0),
        ]
    finally:
        restarted.close()
    assert count(path, "interface_samples") == samples
    assert_rollups_match(path, fleet)


def test_traffic_and_bandwidth_still_read_the_raw_rows_in_the_retention_window(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    now = T0 + 10 * DAY_MS
    _three_days(fleet, now)
    run_until_done(Maintenance(db), now)
    reader = open_database(path, readonly=True)
    try:
        since = now - DAY_MS
        rows = bandwidth(reader, since_ms=since, until_ms=now)
        expected_rx = sum(s[2] for _, s in fleet.samples if since <= s[0] < now)
        assert sum(r.total_rx_bytes for r in rows) == expected_rx > 0
        assert {(r.agent_id, r.interface) for r in rows} == {(a, i) for a in AGENTS for i in INTERFACES}
        by_zone = {
            r.group: r.bytes_in
            for r in traffic(reader, by="zone", since_ms=since, until_ms=now, bucket_ms=MINUTE_MS)
        }
        assert by_zone == {
            zone: sum(z.bytes_in for _, z in fleet.zones if z.zone == zone and since <= z.time_ms < now)
            for zone in ZONES
        }
        # Beyond the raw retention the minute rollups answer (tests/collector/test_rollup_reads.py).
        since, until = now - 3 * DAY_MS, now - 2 * DAY_MS - HOUR_MS
        old = bandwidth(reader, since_ms=since, until_ms=until)
        assert {r.bucket_ms for r in old} == {MINUTE_MS}
        assert sum(r.total_rx_bytes for r in old) == sum(
            s[2] for _, s in fleet.samples if since <= s[0] < until
        )
    finally:
        reader.close()


def test_rollups_are_pruned_after_their_own_retention(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    now = T0 + 10 * DAY_MS
    _three_days(fleet, now)
    policy = RetentionPolicy(raw_hours=1, minute_days=1, hour_days=2)
    reports = run_until_done(Maintenance(db, policy), now, budget=700)
    assert sum(r.pruned_minute_rollups for r in reports) > 0
    assert sum(r.pruned_hour_rollups for r in reports) > 0
    # A bucket goes once it ended before the cutoff; one that ends after it stays.
    assert_rollups_match(
        path,
        fleet,
        {
            MINUTE_MS: lambda bucket: bucket + MINUTE_MS > now - DAY_MS,
            HOUR_MS: lambda bucket: bucket + HOUR_MS > now - 2 * DAY_MS,
        },
    )
    assert count(path, "interface_samples") == 3 * 4 * 3  # the last hour: 3 batches of 4 samples per agent


# --- bounded, idempotent, atomic -------------------------------------------------------------


def test_each_step_does_at_most_its_budget(fleet: Fleet, db: sqlite3.Connection, path: Path) -> None:
    now = T0 + 10 * DAY_MS
    for b in range(100):  # 100 batches of 50 samples and 5 zone rows, all three days old
        t = now - 3 * DAY_MS + b * MINUTE_MS
        fleet.send(
            "agent-a",
            [sample_row(t + k, INTERFACES[k % 3]) for k in range(50)],
            [zone_row(t + k) for k in range(5)],
        )
    reports = run_until_done(Maintenance(db), now, budget=400)
    # 5000 samples + 500 zone rows rolled, then as many pruned; minute rollups none (3 days < 30 days).
    assert all(r.rows_done <= 400 for r in reports)
    assert sum(r.rows_done for r in reports) == 2 * 5500
    assert len(reports) >= 2 * 5500 // 400
    assert all(not r.done for r in reports[:-1])
    assert count(path, "interface_samples") == count(path, "zone_traffic") == 0
    assert_rollups_match(path, fleet)


def test_a_batch_larger_than_the_budget_is_pruned_whole_and_pruning_goes_on(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    now = T0 + 10 * DAY_MS
    for b in range(4):
        fleet.send("agent-a", [sample_row(now - 3 * DAY_MS + b * MINUTE_MS + k) for k in range(50)])
    reports = run_until_done(Maintenance(db), now, budget=30)
    pruning = [r for r in reports if r.pruned_samples]
    assert [(r.pruned_samples, r.pruned_batches) for r in pruning] == [(50, 1)] * 4
    assert count(path, "interface_samples") == 0
    assert all(r.rows_done <= 30 for r in reports if not r.pruned_samples)


def test_running_again_changes_nothing(fleet: Fleet, db: sqlite3.Connection, path: Path) -> None:
    now = T0 + 10 * DAY_MS
    _three_days(fleet, now)
    maintenance = Maintenance(db)
    run_until_done(maintenance, now)
    before = dump(path)
    again = maintenance.run_step(now)
    assert again == MaintenanceReport(0, 0, 0, 0, 0, 0, 0, 0, 0, True)
    assert Maintenance(db).run_step(now) == again
    assert dump(path) == before


def test_a_failed_step_changes_nothing_and_the_next_counts_every_row_once(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    random_traffic(fleet, random.Random(3), T0, T0 + 2 * HOUR_MS, batches=40)
    before = dump(path)
    # The hour tier fails after the minute tier was written in the same step.
    db.execute(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.interface_rollups WHEN NEW.resolution_ms = 3600000"
        " BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
    )
    with pytest.raises(StoreError, match="disk trouble"):
        Maintenance(db).run_step(T0 + 3 * HOUR_MS)
    assert dump(path) == before
    db.execute("DROP TRIGGER refuse")
    run_until_done(Maintenance(db), T0 + 3 * HOUR_MS, budget=333)
    assert_rollups_match(path, fleet)


def test_sums_beyond_64_bits_are_held_at_the_maximum_and_retention_goes_on(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    """Validation takes any counter up to 2**63 - 1: a broken agent can send two of them in a minute.
    The sum is held at the largest integer instead of stopping retention for everyone."""
    huge = (INT64_MAX, 1, 1, 1, 1, 1, 1, 1)
    fleet.send("agent-a", [sample_row(T0 + 1000, counters=huge), sample_row(T0 + 2000, counters=huge)])
    fleet.send(
        "agent-b",
        [sample_row(T0 + 1000)],
        [zone_row(T0 + 1000, bytes_in=INT64_MAX), zone_row(T0 + 2000, bytes_in=INT64_MAX)],
    )
    maintenance = Maintenance(db)
    reports = run_until_done(maintenance, T0 + HOUR_MS)
    assert sum(r.saturated for r in reports) == 4  # agent-a's and agent-b's zone, minute and hour
    assert stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0)][:3] == (2, INT64_MAX, 2)
    assert stored_interfaces(path, HOUR_MS)[("agent-a", "eth0", T0)][:3] == (2, INT64_MAX, 2)
    assert stored_interfaces(path, MINUTE_MS)[("agent-b", "eth0", T0)][:2] == (1, 1000)
    assert stored_zones(path, MINUTE_MS)[("agent-b", ZONES[0], T0)][:2] == (INT64_MAX, INT64_MAX - 1)
    # Once more in a later step: the stored sum stays at the maximum.
    fleet.send("agent-a", [sample_row(T0 + 3000, counters=huge)])
    run_until_done(maintenance, T0 + HOUR_MS)
    assert stored_interfaces(path, MINUTE_MS)[("agent-a", "eth0", T0)][:3] == (3, INT64_MAX, 3)
    assert peek(path, "SELECT typeof(rx_bytes) FROM interface_rollups") == [("integer",)] * 4


def test_rows_written_after_everything_was_pruned_and_a_restart_are_counted(
    fleet: Fleet, db: sqlite3.Connection, path: Path
) -> None:
    """With every raw row pruned, a restarted writer numbers samples from 1 again, below the
    cursor: the cursor must come down with the pruned rows, or the new rows would never count."""
    fleet.send("agent-a", [sample_row(T0 + k) for k in range(20)], [zone_row(T0 + k) for k in range(20)])
    now = T0 + 3 * DAY_MS
    run_until_done(Maintenance(db), now)
    assert count(path, "interface_samples") == count(path, "zone_traffic") == 0
    db.close()
    reopened = open_database(path)
    try:
        restarted = Fleet(reopened)
        restarted.seq, restarted.samples, restarted.zones = fleet.seq, fleet.samples, fleet.zones
        restarted.send("agent-a", [sample_row(now + 1000)], [zone_row(now + 1000)])
        assert peek(path, "SELECT id FROM interface_samples") == [(1,)]
        run_until_done(Maintenance(reopened), now + 2000)
        assert_rollups_match(path, restarted)
    finally:
        reopened.close()


def test_migration_keeps_zone_traffic_rows_and_their_ids(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
    old = open_database(path)
    old.executemany(
        "INSERT INTO zone_traffic VALUES (1, ?, ?, 'z', '', 10, 20, 1, 2, 10000, 'nftables', 1.0)",
        [(seq, T0 + seq) for seq in range(1, 6)],
    )
    old.execute("DELETE FROM zone_traffic WHERE seq IN (2, 5)")
    rows = old.execute("SELECT rowid, * FROM zone_traffic ORDER BY rowid").fetchall()
    old.close()
    monkeypatch.undo()
    db = open_database(path)
    try:
        assert db.execute("SELECT * FROM zone_traffic ORDER BY id").fetchall() == rows
        assert [r[0] for r in rows] == [1, 3, 4]
        names = db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'zone_traffic'").fetchall()
        assert {n for (n,) in names} == {"zone_traffic", "zone_traffic_by_time", "zone_traffic_by_agent"}
        fleet = Fleet(db)
        fleet.send("agent-a", zones=[zone_row(T0 + 10)])
        assert db.execute("SELECT max(id) FROM zone_traffic").fetchone() == (5,)
    finally:
        db.close()


def test_a_nonsense_policy_or_budget_is_refused(db: sqlite3.Connection) -> None:
    with pytest.raises(CollectorError, match="raw_hours"):
        RetentionPolicy(raw_hours=0)
    with pytest.raises(CollectorError, match="hour_days"):
        RetentionPolicy(hour_days=-1)
    with pytest.raises(CollectorError, match="budget_rows"):
        Maintenance(db).run_step(T0, budget_rows=0)


# --- a running collector -----------------------------------------------------------------------


def test_a_running_collector_keeps_acking_while_maintenance_catches_up(tmp_path: Path) -> None:
    path = tmp_path / "collector.db"
    db = open_database(path)
    fleet = Fleet(db)
    old = now_ms() - 3 * DAY_MS
    for b in range(100):  # 100 k samples three days old: 50 steps to roll up, 50 to prune
        fleet.send(
            "agent-old",
            [sample_row(old + b * MINUTE_MS + k, INTERFACES[k % 3]) for k in range(1000)],
            [zone_row(old + b * MINUTE_MS)],
        )
    db.close()
    config = CollectorConfig(
        db_path=path,
        listen="127.0.0.1:0",
        insecure=True,
        maintenance_interval_s=0.05,
        maintenance_budget_rows=2000,
    )
    acks: list[tuple[int, float, int]] = []  # (seq, seconds to ack, maintenance steps done when acked)

    async def scenario() -> None:
        collector = await create_server(config)
        schedule = collector.maintenance
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{collector.port}")
        try:
            call = channel.stream_stream(
                REPORT_METHOD, request_serializer=None, response_deserializer=parse_response
            )(timeout=60)
            await call.write(
                hello_request("agent-live", "live-01", "t", {}, "", now_ms()).SerializeToString()
            )
            assert (await call.read()).WhichOneof("body") == "welcome"
            seq = 0
            while not (schedule.last_report is not None and schedule.last_report.done) and seq < 5000:
                seq += 1
                t = now_ms()
                started = time.monotonic()
                await call.write(
                    batch_request(seq, t, t, [sample(), sample(interface="eth1")]).SerializeToString()
                )
                reply = await call.read()
                assert reply.WhichOneof("body") == "ack" and reply.ack.acked_seq == seq, reply
                acks.append((seq, time.monotonic() - started, schedule.steps))
            await call.done_writing()
        finally:
            await channel.close()
            await collector.stop()
        assert schedule.failures == 0

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        gc.collect()  # see tests/agent/test_transport.py: grpc objects in cycles, collected now
    steps_seen = sorted({steps for _, _, steps in acks})
    # Acks kept coming between maintenance steps, not only before or after them.
    assert len(steps_seen) >= 10, steps_seen
    assert max(seconds for _, seconds, _ in acks) < 2.0
    # Maintenance finished its work: the old raw rows are gone, their sums are in the rollups, and
    # every acknowledged batch of the live agent is stored.
    assert peek(
        path,
        "SELECT count(*) FROM interface_samples JOIN agents ON agents.id = agent"
        " WHERE agent_id = 'agent-old'",
    ) == [(0,)]
    ((rx, count_),) = peek(
        path,
        "SELECT sum(rx_bytes), sum(samples) FROM interface_rollups JOIN agents ON agents.id = agent"
        " WHERE agent_id = 'agent-old' AND resolution_ms = 60000",
    )
    assert (rx, count_) == (sum(s[2] for _, s in fleet.samples), 100_000)
    assert peek(
        path, "SELECT count(*) FROM batches JOIN agents ON agents.id = agent WHERE agent_id = 'agent-live'"
    ) == [(len(acks),)]


# --- the command line ----------------------------------------------------------------------------


def test_retention_command_shows_every_tier(fleet: Fleet, db: sqlite3.Connection, path: Path) -> None:
    now = now_ms() // HOUR_MS * HOUR_MS
    fleet.send("agent-a", [sample_row(now - 3 * DAY_MS)])
    fleet.send("agent-a", [sample_row(now - 2 * HOUR_MS)], [zone_row(now - 2 * HOUR_MS)])
    run_until_done(Maintenance(db), now)
    fleet.send("agent-a", [sample_row(now - HOUR_MS)])  # not rolled up yet
    rows = json.loads(
        run_cli("zonewatch-collector", "retention", "--db", str(path), "--format", "json").stdout
    )
    by_tier = {(r["data"], r["tier"]): r for r in rows}
    assert list(by_tier) == [(d, t) for d in ("interface", "zone") for t in ("raw", "minute", "hour")]
    raw = by_tier[("interface", "raw")]
    assert (raw["rows"], raw["oldest_ms"], raw["newest_ms"], raw["pending"]) == (
        2,
        now - 2 * HOUR_MS,
        now - HOUR_MS,
        1,
    )
    minute = by_tier[("interface", "minute")]
    assert (minute["rows"], minute["oldest_ms"], minute["newest_ms"]) == (
        2,
        now - 3 * DAY_MS,
        now - 2 * HOUR_MS,
    )
    assert minute["watermark_ms"] == now - 2 * MINUTE_MS and minute["pending"] is None
    assert by_tier[("interface", "hour")]["watermark_ms"] == now - HOUR_MS
    assert by_tier[("zone", "raw")]["rows"] == 1 and by_tier[("zone", "hour")]["rows"] == 1

    csv = run_cli(
        "zonewatch-collector", "retention", "--db", str(path), "--format", "csv"
    ).stdout.splitlines()
    assert csv[0] == "data,tier,rows,oldest_ms,newest_ms,watermark_ms,pending"
    assert csv[1] == f"interface,raw,2,{now - 2 * HOUR_MS},{now - HOUR_MS},,1"
    table = run_cli("zonewatch-collector", "retention", "--db", str(path)).stdout
    assert "rolled up to" in table and "minute" in table and "hour" in table


def test_serve_takes_the_retention_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--raw-hours", "72", "--minute-days", "90", "--hour-days", "730"]
    )
    assert serve_config(args).retention == RetentionPolicy(raw_hours=72, minute_days=90, hour_days=730)
    assert serve_config(build_parser().parse_args(["serve"])).retention == RetentionPolicy(48, 30, 365)


@pytest.mark.parametrize("flag", ["--raw-hours", "--minute-days", "--hour-days"])
def test_serve_refuses_a_retention_below_one(tmp_path: Path, flag: str) -> None:
    result = run_cli(
        "zonewatch-collector", "serve", "--db", str(tmp_path / "c.db"), flag, "0", "--log-format", "text",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"zonewatch-collector: error: {flag} must be at least 1, got 0"
    assert not (tmp_path / "c.db").exists()

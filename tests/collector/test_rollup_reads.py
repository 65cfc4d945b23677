"""traffic() and bandwidth() across the tiers: raw rows where they are kept, rollups where they were pruned.

Real SQLite files filled through the real Writer, with the clock injected (facts days old, maintenance
run at a chosen `now`). The oracle is test_retention's ledger of every fact committed: over any range
the readers' byte totals must equal its sums exactly, however the range lies across the tiers, and a
row that arrives late counts once before it is rolled up and once after.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_json, now_ms, run_cli
from test_queries import sample
from test_retention import (
    AGENTS,
    T0,
    Fleet,
    _sqlite_round,
    count,
    peek,
    random_traffic,
    run_until_done,
    zone_row,
)
from test_retention import ZONES as ZONE_NAMES

from collector.store import open_database
from collector.store.queries import bandwidth
from collector.store.retention import (
    DAY_MS,
    HOUR_MS,
    INTERFACES,
    MINUTE_MS,
    RAW,
    ZONES,
    Maintenance,
    RetentionPolicy,
    Span,
    read_plan,
)
from collector.store.schema import READS
from collector.store.traffic import traffic

NOW = T0 + 3 * DAY_MS
ZONE = ZONE_NAMES[0]  # zone_row()'s default
# Raw rows for 6 h, minute buckets for a day: three days of facts reach every tier.
POLICY = RetentionPolicy(raw_hours=6, minute_days=1)
# Hour-aligned ranges, named by the tiers that answer for them once NOW's maintenance has run.
RANGES = {
    "raw": (NOW - 5 * HOUR_MS, NOW),
    "minute": (NOW - 20 * HOUR_MS, NOW - 8 * HOUR_MS),
    "hour": (T0, NOW - 2 * DAY_MS),
    "minute and raw": (NOW - 8 * HOUR_MS, NOW - 5 * HOUR_MS),
    "hour and minute": (NOW - 30 * HOUR_MS, NOW - 20 * HOUR_MS),
    "everything": (T0 - DAY_MS, NOW + HOUR_MS),
}
TIERS = {
    "raw": (RAW,),
    "minute": (MINUTE_MS,),
    "hour": (HOUR_MS,),
    "minute and raw": (MINUTE_MS, RAW),
    "hour and minute": (HOUR_MS, MINUTE_MS),
    "everything": (HOUR_MS, MINUTE_MS, RAW),
}


@pytest.fixture
def reader(path: Path, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A CLI's connection: read-only, beside the writer's."""
    con = open_database(path, readonly=True)
    yield con
    con.close()


# --- the ledger, per range ---------------------------------------------------------------------


def zone_totals(fleet: Fleet, since: int, until: int) -> dict[str, tuple[int, int]]:
    """Per zone, estimated bytes in and out: a sampled capture's counts scaled per row and rounded."""
    totals: dict[str, tuple[int, int]] = {}
    for _, z in fleet.zones:
        if since <= z.time_ms < until:
            scaled = [
                c if z.sampling_rate == 1.0 else _sqlite_round(c / z.sampling_rate)
                for c in (z.bytes_in, z.bytes_out)
            ]
            before = totals.get(z.zone, (0, 0))
            totals[z.zone] = (before[0] + scaled[0], before[1] + scaled[1])
    return totals


def interface_totals(
    fleet: Fleet, since: int, until: int
) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Per (agent, interface): samples, rx bytes, tx bytes, counter resets."""
    totals: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for agent_id, s in fleet.samples:
        if since <= s[0] < until:
            n, rx, tx, resets = totals.get((agent_id, s[1]), (0, 0, 0, 0))
            totals[(agent_id, s[1])] = (n + 1, rx + s[2], tx + s[3], resets + bool(s[15]))
    return totals


def read_zone_totals(
    db: sqlite3.Connection, since: int, until: int, bucket_ms: int = MINUTE_MS
) -> dict[str, tuple[int, int]]:
    rows = traffic(db, by="zone", since_ms=since, until_ms=until, bucket_ms=bucket_ms)
    return {r.group: (r.bytes_in, r.bytes_out) for r in rows}


def read_interface_totals(
    db: sqlite3.Connection, since: int, until: int
) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    rows = bandwidth(db, since_ms=since, until_ms=until)
    return {
        (r.agent_id, r.interface): (r.samples, r.total_rx_bytes, r.total_tx_bytes, r.counter_resets)
        for r in rows
    }


def assert_exact(db: sqlite3.Connection, fleet: Fleet, since: int, until: int) -> None:
    assert read_zone_totals(db, since, until) == zone_totals(fleet, since, until)
    assert read_interface_totals(db, since, until) == interface_totals(fleet, since, until)


def tiers(
    db: sqlite3.Connection, since: int, until: int, sources: tuple[Any, ...] = (ZONES, INTERFACES)
) -> tuple[int, ...]:
    """The tiers that answer for the range, the same for each of the sources."""
    (answer,) = {
        tuple(span.resolution_ms for span in read_plan(db, src, since, until).spans) for src in sources
    }
    return answer


def three_days(db: sqlite3.Connection, seed: int = 5) -> Fleet:
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(seed), T0, NOW, batches=700)
    return fleet


# --- exact across the tiers --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RANGES))
def test_totals_are_exact_in_every_tier_and_across_each_boundary(
    db: sqlite3.Connection, reader: sqlite3.Connection, path: Path, name: str
) -> None:
    fleet = three_days(db)
    since, until = RANGES[name]
    before = (read_zone_totals(reader, since, until), read_interface_totals(reader, since, until))
    run_until_done(Maintenance(db, POLICY), NOW, budget=5000)
    # Pruned: most raw rows and the older minute buckets are gone.
    assert count(path, "zone_traffic") < len(fleet.zones) // 5
    assert count(path, "interface_samples") < len(fleet.samples) // 5
    assert (
        peek(path, "SELECT min(bucket_ms) FROM zone_rollups WHERE resolution_ms = 60000")[0][0]
        >= NOW - DAY_MS
    )
    assert tiers(reader, since, until) == TIERS[name]
    assert_exact(reader, fleet, since, until)
    assert (read_zone_totals(reader, since, until), read_interface_totals(reader, since, until)) == before
    assert zone_totals(fleet, since, until)  # the range is not empty


def test_the_horizons_record_how_far_pruning_went(db: sqlite3.Connection, path: Path) -> None:
    fleet = three_days(db)
    run_until_done(Maintenance(db, POLICY), NOW, budget=5000)
    horizons = {
        (s, t): b for s, t, b in peek(path, "SELECT source, tier, pruned_before_ms FROM retention_horizons")
    }
    # Just past the newest raw row deleted: the newest older than the raw retention. Every row kept
    # lies after it; a batch's samples go together, so theirs is just past a batch's last time.
    newest_gone = max(z.time_ms for _, z in fleet.zones if z.time_ms < NOW - 6 * HOUR_MS)
    assert horizons[("zone_traffic", "raw")] == newest_gone + 1
    kept = peek(path, "SELECT min(time_ms) FROM zone_traffic")[0][0]
    assert horizons[("zone_traffic", "raw")] <= kept
    assert NOW - 7 * HOUR_MS < horizons[("interface_samples", "raw")] <= NOW - 6 * HOUR_MS
    # The end of the newest minute bucket deleted: those that ended a day before NOW went.
    for source, times in (
        ("zone_traffic", [z.time_ms for _, z in fleet.zones]),
        ("interface_samples", [s[0] for _, s in fleet.samples]),
    ):
        ends = {t - t % MINUTE_MS + MINUTE_MS for t in times}
        assert horizons[(source, "minute")] == max(end for end in ends if end <= NOW - DAY_MS)
        assert horizons[(source, "hour")] == 0  # kept a year: nothing went yet
    # Again, with nothing left to prune: nothing moves.
    run_until_done(Maintenance(db, POLICY), NOW)
    assert {
        (s, t): b for s, t, b in peek(path, "SELECT source, tier, pruned_before_ms FROM retention_horizons")
    } == horizons


def test_before_anything_is_pruned_the_readers_read_the_raw_rows_as_before(
    db: sqlite3.Connection, reader: sqlite3.Connection
) -> None:
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(9), T0, T0 + 5 * HOUR_MS, batches=150)
    ranges = [
        (T0, T0 + 5 * HOUR_MS),
        (T0 + 12_345, T0 + HOUR_MS + 678),
        (T0 + 2 * HOUR_MS, T0 + 2 * HOUR_MS + 90_000),
    ]

    def answers() -> list[object]:
        return [
            (
                traffic(reader, by=by, since_ms=since, until_ms=until, bucket_ms=bucket),
                bandwidth(reader, since_ms=since, until_ms=until),
            )
            for since, until in ranges
            for by, bucket in (("zone", MINUTE_MS), ("agent", 10_000))
        ]

    before = answers()
    # Rolled up (both tiers), nothing old enough to prune under the default 48 h.
    reports = run_until_done(Maintenance(db), T0 + 6 * HOUR_MS)
    assert sum(r.rolled_zone_rows for r in reports) == len(fleet.zones)
    assert not any(r.pruned_samples or r.pruned_zone_rows for r in reports)
    assert answers() == before
    for since, until in ranges:
        assert read_plan(reader, ZONES, since, until).spans == (Span(RAW, since, until),)
        assert {
            r.bucket_ms for r in traffic(reader, by="zone", since_ms=since, until_ms=until, bucket_ms=10_000)
        } == {10_000}
        assert {r.bucket_ms for r in bandwidth(reader, since_ms=since, until_ms=until)} == {0}
        assert_exact(reader, fleet, since, until)


# --- late rows ---------------------------------------------------------------------------------


def test_a_late_row_counts_once_before_and_after_it_is_rolled_up(
    db: sqlite3.Connection, reader: sqlite3.Connection, path: Path
) -> None:
    fleet = three_days(db)
    maintenance = Maintenance(db, POLICY)
    run_until_done(maintenance, NOW)
    rolled = peek(path, "SELECT source, rolled_id FROM retention_state WHERE resolution_ms = 60000")

    # An agent back online replays its spool: facts in the hour tier's and the minute tier's time,
    # committed after the step (ids above the cursor), received a minute after NOW.
    late_hour, late_minute = T0 + 5 * HOUR_MS + 10_000, NOW - 10 * HOUR_MS + 20_000
    for late in (late_hour, late_minute):
        fleet.send(
            "agent-b",
            [sample(late, interface="eth1", rx_bytes=123_456, tx_bytes=789), sample(late + 1, rx_bytes=5)],
            [zone_row(late, "internet", bytes_in=777_777), zone_row(late, rate=0.1, bytes_in=1001)],
            received_ms=NOW + MINUTE_MS,
        )
    pending = peek(
        path,
        "SELECT 'zone_traffic', count(*) FROM zone_traffic WHERE id > ?"
        " UNION ALL SELECT 'interface_samples', count(*) FROM interface_samples WHERE id > ?",
        (dict(rolled)["zone_traffic"], dict(rolled)["interface_samples"]),
    )
    assert dict(pending) == {"zone_traffic": 4, "interface_samples": 4}
    late_ranges = [
        RANGES["everything"],
        RANGES["hour"],
        RANGES["minute"],
        (T0 + 5 * HOUR_MS, T0 + 6 * HOUR_MS),
    ]
    for since, until in late_ranges:
        assert_exact(reader, fleet, since, until)

    # Rolled up (into the buckets already there) and pruned again: still exactly once.
    run_until_done(maintenance, NOW + 2 * MINUTE_MS)
    assert peek(
        path, "SELECT count(*) FROM zone_traffic WHERE time_ms IN (?, ?)", (late_hour, late_minute)
    ) == [(0,)]
    for since, until in late_ranges:
        assert_exact(reader, fleet, since, until)


# --- what the figures mean from rollups --------------------------------------------------------


def test_traffic_from_rollups_is_over_whole_buckets_of_the_tier(
    db: sqlite3.Connection, reader: sqlite3.Connection
) -> None:
    fleet = Fleet(db)
    h0 = T0 + HOUR_MS
    fleet.send(
        "agent-a",
        zones=[zone_row(h0 + 1000, bytes_in=36_000), zone_row(h0 + 30 * MINUTE_MS, bytes_in=54_000)],
    )
    fleet.send("agent-b", zones=[zone_row(h0 + 2 * HOUR_MS + 5, bytes_in=9_000)])
    fleet.send("agent-a", zones=[zone_row(NOW - 10 * MINUTE_MS, bytes_in=1)])  # kept raw
    run_until_done(Maintenance(db, RetentionPolicy(raw_hours=1, minute_days=1)), NOW)

    (row,) = traffic(reader, by="zone", since_ms=h0, until_ms=h0 + 3 * HOUR_MS, bucket_ms=MINUTE_MS)
    # One size for every bucket: an hour, the hour tier's; hour 1 idle but counted.
    assert row.bucket_ms == HOUR_MS
    assert (row.bytes_in, row.bytes_out, row.agents) == (99_000, 49_500, 2)
    assert row.peak_in_bps == pytest.approx(90_000 * 8 / 3600)
    assert row.p95_in_bps == pytest.approx(90_000 * 8 / 3600)  # nearest rank of 3: the largest
    assert row.avg_in_bps == pytest.approx(99_000 * 8 / (3 * 3600))
    assert row.capacity_bps == 0 and row.utilization_p95 is None
    # A longer bucket is rounded up to whole hours; a range is taken in whole buckets that start in it.
    (row,) = traffic(reader, by="zone", since_ms=h0 + 1, until_ms=h0 + 3 * HOUR_MS, bucket_ms=90 * MINUTE_MS)
    assert (row.bucket_ms, row.bytes_in) == (2 * HOUR_MS, 9_000)
    # Where the raw rows answer, as asked.
    (row,) = traffic(reader, by="zone", since_ms=NOW - HOUR_MS, until_ms=NOW, bucket_ms=10_000)
    assert (row.bucket_ms, row.bytes_in) == (10_000, 1)

    # The zone filter holds in the rollups too.
    only = traffic(reader, by="agent", since_ms=h0, until_ms=NOW, bucket_ms=MINUTE_MS, zone="internet")
    assert only == []


def test_sampled_counts_are_scaled_per_row_and_rounded_before_and_after_they_are_rolled_up(
    db: sqlite3.Connection, reader: sqlite3.Connection
) -> None:
    fleet = Fleet(db)
    # A capture that saw 30 % of the packets: each 1-byte row stands for round(3.33) = 3 bytes.
    fleet.send("agent-a", zones=[zone_row(T0 + 1000 * k, bytes_in=1, rate=0.3) for k in range(1, 4)])
    assert read_zone_totals(reader, T0, T0 + HOUR_MS) == {ZONE: (9, 0)}
    run_until_done(Maintenance(db, RetentionPolicy(raw_hours=1)), T0 + 3 * HOUR_MS)
    assert tiers(reader, T0, T0 + HOUR_MS, (ZONES,)) == (MINUTE_MS, RAW)  # raw rows gone
    assert read_zone_totals(reader, T0, T0 + HOUR_MS) == {ZONE: (9, 0)}


def test_bandwidth_from_rollups_figures_by_hand(db: sqlite3.Connection, reader: sqlite3.Connection) -> None:
    fleet = Fleet(db)
    m0 = T0 + 2 * HOUR_MS  # minute rollups, once maintenance runs at NOW with a day of minutes
    now = T0 + 20 * HOUR_MS
    gbit = 1_000_000_000
    fleet.send(
        "agent-a",
        [
            # Minute 0: 6 kB and 3 kB over 30 s each: 1200 bit/s on average, peaks 1600 and 800.
            sample(m0, rx_bytes=6_000, tx_bytes=600, interval_ms=30_000),
            sample(m0 + 30_000, rx_bytes=3_000, tx_bytes=300, interval_ms=30_000),
            # Minute 1: 60 kB over a minute: 8000 bit/s; a counter reset.
            sample(m0 + MINUTE_MS, rx_bytes=60_000, interval_ms=60_000, counter_reset=True),
            # Minute 3: link speed unknown.
            sample(m0 + 3 * MINUTE_MS, rx_bytes=30_000, interval_ms=60_000, speed_bps=0),
        ],
    )
    fleet.send("agent-a", [sample(now - 10 * MINUTE_MS, rx_bytes=1_000, tx_bytes=2_000, speed_bps=10 * gbit)])
    run_until_done(Maintenance(db, RetentionPolicy(raw_hours=1, minute_days=1)), now)
    assert tiers(reader, m0, now, (INTERFACES,)) == (MINUTE_MS, RAW)

    (row,) = bandwidth(reader, since_ms=m0, until_ms=now)
    assert row.bucket_ms == MINUTE_MS
    assert (row.samples, row.total_rx_bytes, row.total_tx_bytes, row.counter_resets) == (5, 100_000, 2_900, 1)
    # Bits counted over the samples' intervals: 190 s.
    assert row.avg_rx_bps == pytest.approx(100_000 * 8 / 190)
    # Per-minute averages 1200, 8000, 4000 and the raw sample's minute 800: nearest rank of 4 is the largest.
    assert row.p95_rx_bps == pytest.approx(8_000)
    assert row.peak_rx_bps == pytest.approx(8_000)  # the highest per-sample rate
    assert row.peak_tx_bps == pytest.approx(2_000 * 8 / 10)  # the raw sample's
    # Utilization over the buckets with a known speed: minutes 0, 1 and the raw one.
    assert row.utilization_p95 == pytest.approx(8_000 / gbit)
    assert row.utilization_peak == pytest.approx(8_000 / gbit)
    # Current: the latest sample, kept raw.
    assert (row.current_rx_bps, row.current_tx_bps, row.speed_bps, row.last_ms) == (
        800,
        1_600,
        10 * gbit,
        now - 10 * MINUTE_MS,
    )

    # Only rollups in range: the last bucket is current (minute 3: 4000 bit/s, speed unknown).
    (row,) = bandwidth(reader, since_ms=m0, until_ms=m0 + HOUR_MS)
    assert (row.current_rx_bps, row.speed_bps, row.last_ms) == (4_000, 0, m0 + 3 * MINUTE_MS)
    assert row.p95_rx_bps == pytest.approx(8_000)  # of 1200, 8000, 4000
    # Per-minute buckets start in range or are left out.
    (row,) = bandwidth(reader, since_ms=m0 + 1, until_ms=m0 + HOUR_MS)
    assert (row.samples, row.total_rx_bytes) == (2, 90_000)


def test_read_plan_rounds_the_horizons_to_whole_buckets(db: sqlite3.Connection) -> None:
    def plan(raw: int, minute: int, since: int, until: int) -> tuple[Span, ...]:
        db.executemany(
            "UPDATE retention_horizons SET pruned_before_ms = ? WHERE source = 'zone_traffic' AND tier = ?",
            [(raw, "raw"), (minute, "minute")],
        )
        return read_plan(db, ZONES, since, until).spans

    raw, minute = T0 + 10 * HOUR_MS + 90_001, T0 + 2 * HOUR_MS + MINUTE_MS
    assert plan(raw, minute, T0, T0 + DAY_MS) == (
        Span(HOUR_MS, T0, T0 + 3 * HOUR_MS),
        Span(MINUTE_MS, T0 + 3 * HOUR_MS, T0 + 10 * HOUR_MS + 2 * MINUTE_MS),
        Span(RAW, T0 + 10 * HOUR_MS + 2 * MINUTE_MS, T0 + DAY_MS),
    )
    # A range not on bucket boundaries: the rollup buckets that start in it.
    assert plan(raw, minute, T0 + 1, T0 + 10 * HOUR_MS + 1) == (
        Span(HOUR_MS, T0 + HOUR_MS, T0 + 3 * HOUR_MS),
        Span(MINUTE_MS, T0 + 3 * HOUR_MS, T0 + 10 * HOUR_MS + MINUTE_MS),
    )
    # Minute buckets pruned further than raw rows (a day of raw, an hour of minutes): no minute span.
    assert plan(T0 + HOUR_MS, T0 + 5 * HOUR_MS, T0, T0 + DAY_MS) == (
        Span(HOUR_MS, T0, T0 + 5 * HOUR_MS),
        Span(RAW, T0 + 5 * HOUR_MS, T0 + DAY_MS),
    )
    assert plan(0, 0, T0 + 1, T0 + 2) == (Span(RAW, T0 + 1, T0 + 2),)
    assert plan(raw, minute, T0, T0) == ()


# --- an older database -------------------------------------------------------------------------


def test_a_database_pruned_before_the_horizons_were_recorded_still_reads_exactly(path: Path) -> None:
    """The migration cannot know how far an older collector pruned: it assumes the most it could have
    (everything rolled up, up to an hour ago), which costs resolution, never a row."""
    now = now_ms() // HOUR_MS * HOUR_MS
    db = open_database(path)
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(13), now - 3 * DAY_MS, now, batches=300)
    run_until_done(Maintenance(db, POLICY), now)
    recorded = peek(path, "SELECT source, tier, pruned_before_ms FROM retention_horizons")
    # What that older collector left: the same tables, without the horizons and the link speeds.
    db.executescript("DROP TABLE retention_horizons; ALTER TABLE interface_rollups DROP COLUMN speed_bps;")
    # ... and the step that upgrades it, as migrate runs it (later steps are independent of it).
    started = now_ms() // 1000 * 1000
    db.executescript("BEGIN IMMEDIATE;\n" + READS + "\nCOMMIT;")
    finished = now_ms()
    try:
        assumed = {
            (s, t): b
            for s, t, b in peek(path, "SELECT source, tier, pruned_before_ms FROM retention_horizons")
        }
        for source, tier, truth in recorded:
            assert assumed[(source, tier)] >= truth  # never less than what was pruned
            rollups = "zone_rollups" if source == "zone_traffic" else "interface_rollups"
            newest_end = (
                peek(path, f"SELECT max(bucket_ms) FROM {rollups} WHERE resolution_ms = 3600000")[0][0]
                + HOUR_MS
            )
            youngest = HOUR_MS if tier == "raw" else DAY_MS
            assert (
                min(newest_end, started - youngest)
                <= assumed[(source, tier)]
                <= min(newest_end, finished - youngest)
            )
        for since, until in [
            (now - 3 * DAY_MS, now),
            (now - 2 * DAY_MS, now - DAY_MS),
            (now - 3 * HOUR_MS, now),
        ]:
            assert_exact(db, fleet, since, until)
        assert peek(path, "SELECT count(*) FROM interface_rollups WHERE speed_bps != 0") == [(0,)]
    finally:
        db.close()


def test_a_new_database_has_pruned_nothing(path: Path) -> None:
    open_database(path).close()
    assert Counter(b for (b,) in peek(path, "SELECT pruned_before_ms FROM retention_horizons")) == {0: 6}


# --- the command line --------------------------------------------------------------------------


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_traffic_and_bandwidth_commands_say_when_they_read_coarser_buckets(
    db: sqlite3.Connection, path: Path
) -> None:
    now = now_ms() // HOUR_MS * HOUR_MS
    fleet = Fleet(db)
    random_traffic(fleet, random.Random(17), now - 3 * DAY_MS, now, batches=200)
    run_until_done(Maintenance(db, POLICY), now)
    since, until = now - 3 * DAY_MS, now - 2 * DAY_MS
    args = ("--db", str(path), "--since", iso(since), "--until", iso(until))

    rows = cli_json("zonewatch-collector", "traffic", *args)
    assert {r["group"]: (r["bytes_in"], r["bytes_out"]) for r in rows} == zone_totals(fleet, since, until)
    assert {r["bucket_ms"] for r in rows} == {HOUR_MS}
    table = run_cli("zonewatch-collector", "traffic", *args)
    assert all(zone in table.stdout for zone in zone_totals(fleet, since, until))
    assert table.stderr.strip() == (
        "zonewatch-collector: note: the range is older than the raw horizon:"
        " rates are averages over 1 h buckets, not 1 min"
    )
    asked_hours = run_cli("zonewatch-collector", "traffic", *args, "--bucket", "2h")
    assert asked_hours.stderr == ""  # as coarse as asked: nothing to say

    rows = cli_json("zonewatch-collector", "bandwidth", *args)
    assert {(r["agent_id"], r["interface"]): r["total_rx_bytes"] for r in rows} == {
        key: totals[1] for key, totals in interface_totals(fleet, since, until).items()
    }
    table = run_cli("zonewatch-collector", "bandwidth", *args)
    assert "host-" + AGENTS[0] in table.stdout
    assert "averages over 1 h buckets" in table.stderr and len(table.stderr.splitlines()) == 1
    recent = run_cli(
        "zonewatch-collector",
        "bandwidth",
        "--db",
        str(path),
        "--since",
        iso(now - HOUR_MS),
        "--until",
        iso(now),
    )
    assert recent.stderr == ""

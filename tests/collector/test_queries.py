"""Operator queries over a real SQLite file, and how the CLI prints them."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.errors import QueryError, StoreError
from collector.model import MAX_BATCH_SPAN_MS
from collector.output import (
    AGENT_COLUMNS,
    BANDWIDTH_COLUMNS,
    check_range,
    human_bps,
    human_bytes,
    parse_since,
    parse_time,
    render,
)
from collector.store import open_database, queries
from collector.store.queries import AgentRow, BandwidthRow, bandwidth, list_agents, resolve_agent
from collector.store.schema import migrate

# 2026-11-28 07:40:01 in Beijing (UTC+8), 2026-11-27 23:40:01 UTC.
NOW = 1_795_822_801_000
STALE_AFTER = 60_000
OFFLINE_AFTER = 600_000
GBIT = 1_000_000_000


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "zonewatch.db", isolation_level=None)
    migrate(connection)
    yield connection
    connection.close()


@pytest.fixture
def beijing() -> Iterator[None]:
    """Local time is UTC+8 (a POSIX TZ string: no zoneinfo files needed)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "CST-8"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def add_agent(
    db: sqlite3.Connection,
    agent_id: str,
    hostname: str,
    *,
    department: str = "市公安局",
    county: str = "高新区",
    last_seen_ms: int = NOW,
) -> int:
    cursor = db.execute(
        "INSERT INTO agents (agent_id, hostname, department, county, site, role, agent_version,"
        " policy_version, first_seen_ms, last_seen_ms, last_seq, clock_skew_ms)"
        " VALUES (?, ?, ?, ?, '政务云', 'web', '0.1.0', 'p-1', ?, ?, 42, -15)",
        (agent_id, hostname, department, county, last_seen_ms - 86_400_000, last_seen_ms),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def series_of(db: sqlite3.Connection, agent: int, interface: str) -> int:
    """The (agent, interface) series id, created on first use as the writer does."""
    db.execute("INSERT OR IGNORE INTO series (agent, interface) VALUES (?, ?)", (agent, interface))
    (series,) = db.execute(
        "SELECT id FROM series WHERE agent = ? AND interface = ?", (agent, interface)
    ).fetchone()
    return int(series)


def sample(
    time_ms: int,
    *,
    interface: str = "eth0",
    rx_bytes: int = 0,
    tx_bytes: int = 0,
    interval_ms: int = 10_000,
    speed_bps: int = GBIT,
    counter_reset: bool = False,
) -> tuple[Any, ...]:
    """One sample as (time_ms, interface, counters..., rates...), with the rates and
    utilization the agent would have computed."""
    rx_bps = rx_bytes * 8 / (interval_ms / 1000)
    tx_bps = tx_bytes * 8 / (interval_ms / 1000)
    utilization = max(rx_bps, tx_bps) / speed_bps if speed_bps else -1.0
    counters = (rx_bytes, tx_bytes, 10, 10, 0, 0, 0, 0)
    return (
        time_ms,
        interface,
        *counters,
        interval_ms,
        rx_bps,
        tx_bps,
        speed_bps,
        utilization,
        int(counter_reset),
    )


def add_batch(db: sqlite3.Connection, agent: int, samples: list[tuple[Any, ...]]) -> None:
    """Store samples as the writer does: one batch (the agent's next seq), its samples
    in consecutive ids that the batch row points to, each naming its series."""
    (seq,) = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM batches WHERE agent = ?", (agent,)).fetchone()
    (first,) = db.execute("SELECT coalesce(max(id), 0) + 1 FROM interface_samples").fetchone()
    times = [row[0] for row in samples]
    db.execute(
        "INSERT INTO batches VALUES (?, ?, ?, ?, ?, 'stored', ?, ?, ?, ?)",
        (
            agent,
            seq,
            max(times),
            max(times),
            len(samples),
            min(times),
            max(times),
            first,
            first + len(samples) - 1,
        ),
    )
    db.executemany(
        "INSERT INTO interface_samples VALUES (" + ", ".join("?" * 19) + ")",
        [
            (first + i, agent, series_of(db, agent, interface), seq, time_ms, *values)
            for i, (time_ms, interface, *values) in enumerate(samples)
        ],
    )


def add_sample(db: sqlite3.Connection, agent: int, time_ms: int, **fields: Any) -> None:
    """One sample, in a batch of its own."""
    add_batch(db, agent, [sample(time_ms, **fields)])


# --- list_agents -------------------------------------------------------------------------------


def test_status_follows_silence_with_inclusive_thresholds(db: sqlite3.Connection) -> None:
    for hostname, silent_ms in [
        ("a-just-now", 10_000),
        ("b-at-stale-limit", STALE_AFTER),
        ("c-just-stale", STALE_AFTER + 1),
        ("d-at-offline-limit", OFFLINE_AFTER),
        ("e-just-offline", OFFLINE_AFTER + 1),
        ("f-long-gone", 30 * 86_400_000),
    ]:
        add_agent(db, f"id-{hostname}", hostname, last_seen_ms=NOW - silent_ms)

    agents = list_agents(db, NOW, STALE_AFTER, OFFLINE_AFTER)

    assert [(a.hostname, a.status) for a in agents] == [
        ("a-just-now", "online"),
        ("b-at-stale-limit", "online"),
        ("c-just-stale", "stale"),
        ("d-at-offline-limit", "stale"),
        ("e-just-offline", "offline"),
        ("f-long-gone", "offline"),
    ]


def test_agents_sorted_by_department_county_hostname_with_every_field(db: sqlite3.Connection) -> None:
    add_agent(db, "id-3", "web-02", department="市教育局", county="高新区")
    add_agent(db, "id-2", "web-01", department="市公安局", county="高新区")
    add_agent(db, "id-1", "db-01", department="市公安局", county="高新区")
    add_agent(db, "id-4", "aaa-01", department="市公安局", county="雁塔区")

    agents = list_agents(db, NOW, STALE_AFTER, OFFLINE_AFTER)

    # Chinese labels sort by code point: 公 (U+516C) before 教, 雁 (U+96C1) before 高.
    assert [(a.department, a.county, a.hostname) for a in agents] == [
        ("市公安局", "雁塔区", "aaa-01"),
        ("市公安局", "高新区", "db-01"),
        ("市公安局", "高新区", "web-01"),
        ("市教育局", "高新区", "web-02"),
    ]
    assert agents[1] == AgentRow(
        agent_id="id-1",
        hostname="db-01",
        department="市公安局",
        county="高新区",
        site="政务云",
        role="web",
        agent_version="0.1.0",
        policy_version="p-1",
        first_seen_ms=NOW - 86_400_000,
        last_seen_ms=NOW,
        last_seq=42,
        clock_skew_ms=-15,
        status="online",
    )


def test_no_agents_is_an_empty_list(db: sqlite3.Connection) -> None:
    assert list_agents(db, NOW, STALE_AFTER, OFFLINE_AFTER) == []


def test_sqlite_errors_become_store_errors(tmp_path: Path) -> None:
    unmigrated = sqlite3.connect(tmp_path / "empty.db", isolation_level=None)
    with pytest.raises(StoreError, match="no such table"):
        list_agents(unmigrated, NOW, STALE_AFTER, OFFLINE_AFTER)
    with pytest.raises(StoreError):
        resolve_agent(unmigrated, "web-01")
    with pytest.raises(StoreError):
        bandwidth(unmigrated, since_ms=0, until_ms=NOW)


# --- resolve_agent -----------------------------------------------------------------------------


@pytest.fixture
def fleet(db: sqlite3.Connection) -> dict[str, int]:
    return {
        "web": add_agent(db, "7f3a9c2e-0001", "gaj-web-01"),
        "db": add_agent(db, "7f3a11d0-0002", "gaj-db-01"),
        "edu": add_agent(db, "c0ffee00-0003", "jyj-web-01", department="市教育局"),
        "twin-a": add_agent(db, "aaaa0001", "twin"),
        "twin-b": add_agent(db, "bbbb0002", "twin"),
    }


def test_resolve_by_agent_id(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    assert resolve_agent(db, "7f3a11d0-0002") == fleet["db"]


def test_resolve_by_unique_prefix(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    assert resolve_agent(db, "7f3a9") == fleet["web"]
    assert resolve_agent(db, "c0ff") == fleet["edu"]


def test_resolve_by_hostname_ignores_case_and_spaces(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    assert resolve_agent(db, "gaj-web-01") == fleet["web"]
    assert resolve_agent(db, " GAJ-DB-01 ") == fleet["db"]


def test_full_agent_id_wins_over_the_longer_ids_it_prefixes(db: sqlite3.Connection) -> None:
    short = add_agent(db, "abcd1234", "one")
    add_agent(db, "abcd12345", "two")
    assert resolve_agent(db, "abcd1234") == short


def test_unknown_agent(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    with pytest.raises(QueryError) as raised:
        resolve_agent(db, "nope")
    assert str(raised.value) == "unknown agent 'nope'"


def test_prefix_shorter_than_four_characters_is_not_a_handle(
    db: sqlite3.Connection, fleet: dict[str, int]
) -> None:
    with pytest.raises(QueryError, match="unknown agent 'c0f'"):
        resolve_agent(db, "c0f")


def test_ambiguous_prefix_lists_the_candidates(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    with pytest.raises(QueryError) as raised:
        resolve_agent(db, "7f3a")
    message = str(raised.value)
    assert "ambiguous" in message
    assert "7f3a11d0-0002 (gaj-db-01)" in message
    assert "7f3a9c2e-0001 (gaj-web-01)" in message


def test_shared_hostname_is_ambiguous(db: sqlite3.Connection, fleet: dict[str, int]) -> None:
    with pytest.raises(QueryError, match=r"aaaa0001 \(twin\).*bbbb0002 \(twin\)"):
        resolve_agent(db, "twin")


def test_long_ambiguity_is_counted_not_listed(db: sqlite3.Connection) -> None:
    for n in range(8):
        add_agent(db, f"dead{n:04d}", f"host-{n}")
    with pytest.raises(QueryError) as raised:
        resolve_agent(db, "dead")
    message = str(raised.value)
    assert "matches 8 agents" in message
    assert "and 3 more" in message
    assert "dead0005" not in message


# --- bandwidth ---------------------------------------------------------------------------------

T0 = NOW - 3_600_000
# The 20 samples of gaj-web-01/eth0, in time order: rx bytes in a shuffled order
# (so the latest is not the largest), tx bytes falling.
RX_KB = [3, 17, 9, 20, 1, 12, 5, 19, 14, 2, 8, 16, 11, 4, 18, 6, 15, 10, 13, 7]


@pytest.fixture
def web(db: sqlite3.Connection) -> int:
    agent = add_agent(db, "7f3a9c2e-0001", "gaj-web-01")
    for i, kb in enumerate(RX_KB):
        add_sample(db, agent, T0 + i * 10_000, rx_bytes=kb * 1000, tx_bytes=(20 - i) * 500)
    return agent


def test_bandwidth_against_hand_computed_figures(db: sqlite3.Connection, web: int) -> None:
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)

    # per-sample rx rates are kb * 800 bit/s: 800, 1600, ..., 16000 in some order;
    # tx rates 400 * (20 - i): 8000 down to 400.
    assert row.samples == 20
    assert row.current_rx_bps == 7 * 800  # the last sample
    assert row.current_tx_bps == 400
    assert row.peak_rx_bps == 16_000
    assert row.peak_tx_bps == 8_000
    # nearest rank: ceil(0.95 * 20) = 19th smallest
    assert row.p95_rx_bps == 19 * 800
    assert row.p95_tx_bps == 19 * 400
    # 210 kB and 105 kB over 200 s
    assert row.avg_rx_bps == pytest.approx(210_000 * 8 / 200)
    assert row.avg_tx_bps == pytest.approx(105_000 * 8 / 200)
    assert row.total_rx_bytes == 210_000
    assert row.total_tx_bytes == 105_000
    assert row.speed_bps == GBIT
    # utilization = max(rx, tx) / speed per sample; its 19th smallest is 15200 / 1 Gbit
    assert row.utilization_p95 == pytest.approx(15_200 / GBIT)
    assert row.utilization_peak == pytest.approx(16_000 / GBIT)
    assert row.counter_resets == 0
    assert row.last_ms == T0 + 19 * 10_000
    assert (row.hostname, row.agent_id, row.department, row.county, row.interface) == (
        "gaj-web-01",
        "7f3a9c2e-0001",
        "市公安局",
        "高新区",
        "eth0",
    )


def test_p95_is_nearest_rank(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "rank0001", "rank")
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 100]  # one burst among ten samples
    for i, kb in enumerate(sizes):
        add_sample(db, agent, T0 + i * 10_000, rx_bytes=kb * 1000)
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    # ceil(0.95 * 10) = 10: with ten samples the p95 is the largest
    assert row.p95_rx_bps == 100 * 800
    add_sample(db, agent, T0 + 10 * 10_000, rx_bytes=1000)
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert row.p95_rx_bps == 100 * 800  # ceil(0.95 * 11) = 11


def test_average_is_byte_weighted_not_a_mean_of_rates(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "wide0001", "uneven")
    add_sample(db, agent, T0, rx_bytes=10_000, interval_ms=10_000)  # 8000 bit/s
    add_sample(db, agent, T0 + 30_000, rx_bytes=10_000, interval_ms=30_000)  # 2667 bit/s
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert row.avg_rx_bps == pytest.approx(20_000 * 8 / 40)  # 4000, not 5333
    assert row.avg_tx_bps == 0


def test_utilization_unknown_without_link_speed(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "virt0001", "virtual")
    for i in range(5):
        add_sample(db, agent, T0 + i * 10_000, interface="veth0", rx_bytes=1000, speed_bps=0)
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert row.speed_bps == 0
    assert row.utilization_p95 is None
    assert row.utilization_peak is None
    assert row.p95_rx_bps == 800


def test_utilization_only_over_samples_with_a_known_speed(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "flap0001", "flapping")
    add_sample(db, agent, T0, rx_bytes=100_000, speed_bps=0)  # 80 kbit/s, speed unknown
    add_sample(db, agent, T0 + 10_000, rx_bytes=1_000, speed_bps=GBIT)
    add_sample(db, agent, T0 + 20_000, rx_bytes=2_000, speed_bps=GBIT, counter_reset=True)
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert row.utilization_peak == pytest.approx(1600 / GBIT)
    assert row.utilization_p95 == pytest.approx(1600 / GBIT)
    assert row.peak_rx_bps == 80_000
    assert row.counter_resets == 1


def test_range_includes_since_and_excludes_until(db: sqlite3.Connection, web: int) -> None:
    first, second = T0, T0 + 10_000
    (row,) = bandwidth(db, since_ms=first, until_ms=second)
    assert (row.samples, row.last_ms, row.current_rx_bps) == (1, first, RX_KB[0] * 800)
    (row,) = bandwidth(db, since_ms=first + 1, until_ms=second + 1)
    assert (row.samples, row.last_ms) == (1, second)
    assert bandwidth(db, since_ms=first + 1, until_ms=second) == []
    assert bandwidth(db, since_ms=NOW, until_ms=NOW + 60_000) == []


def test_a_batch_straddling_the_range_counts_only_its_samples_in_range(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "edge0001", "edge")
    add_batch(db, agent, [sample(T0 + i * 10_000, rx_bytes=(i + 1) * 1000) for i in range(5)])
    db.execute(
        "INSERT INTO batches VALUES (?, 99, ?, ?, 0, 'rejected', NULL, NULL, NULL, NULL)", (agent, T0, T0)
    )
    (row,) = bandwidth(db, since_ms=T0 + 10_000, until_ms=T0 + 40_000)
    assert (row.samples, row.total_rx_bytes, row.last_ms) == (3, 9_000, T0 + 30_000)
    assert row.current_rx_bps == 4 * 800


def test_latest_sample_is_the_latest_in_time_not_of_the_newest_batch(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "late0001", "late")
    # The newest batch (by its last time) holds an old eth0 sample; the latest eth0
    # sample sits in an earlier batch, and within that batch before an older one.
    add_batch(db, agent, [sample(T0 + 55_000, rx_bytes=5_500), sample(T0 + 20_000, rx_bytes=2_000)])
    add_batch(db, agent, [sample(T0 + 10_000, rx_bytes=1_000), sample(T0 + 60_000, interface="eth1")])
    rows = {r.interface: r for r in bandwidth(db, since_ms=T0, until_ms=NOW)}
    assert (rows["eth0"].samples, rows["eth0"].last_ms, rows["eth0"].current_rx_bps) == (3, T0 + 55_000, 4400)
    assert rows["eth1"].last_ms == T0 + 60_000


def test_of_two_latest_samples_with_the_same_time_the_one_stored_last_is_current(
    db: sqlite3.Connection,
) -> None:
    agent = add_agent(db, "twice001", "twice")
    add_batch(db, agent, [sample(T0, rx_bytes=1_000), sample(T0, rx_bytes=3_000)])
    (row,) = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert (row.samples, row.current_rx_bps) == (2, 2400)


def test_samples_are_read_through_the_batch_index(db: sqlite3.Connection, web: int) -> None:
    plan = " | ".join(
        row[3]
        for row in db.execute(
            "EXPLAIN QUERY PLAN " + queries._SCAN,
            {"agent": web, "since": T0, "until": NOW, "span": MAX_BATCH_SPAN_MS},
        )
    )
    # Bounded on both sides: an old window does not walk every later batch.
    assert "USING INDEX batches_by_time (agent=? AND last_ms>? AND last_ms<?)" in plan
    assert "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan
    assert "SCAN" not in plan


@pytest.fixture
def three_hosts(db: sqlite3.Connection) -> dict[str, int]:
    hosts = {
        "quiet": add_agent(db, "q0000001", "quiet"),
        "busy-rx": add_agent(db, "b0000001", "busy-rx"),
        "busy-tx": add_agent(db, "t0000001", "busy-tx", department="市教育局"),
    }
    for i in range(10):
        when = T0 + i * 10_000
        add_sample(db, hosts["quiet"], when, rx_bytes=1_000, tx_bytes=1_000)
        add_sample(db, hosts["busy-rx"], when, rx_bytes=50_000, tx_bytes=1_000)
        add_sample(db, hosts["busy-rx"], when, interface="eth1", rx_bytes=5_000, tx_bytes=5_000)
        add_sample(db, hosts["busy-tx"], when, rx_bytes=1_000, tx_bytes=90_000)
    return hosts


def test_busiest_first_by_larger_direction_and_top_limits(
    db: sqlite3.Connection, three_hosts: dict[str, int]
) -> None:
    rows = bandwidth(db, since_ms=T0, until_ms=NOW)
    assert [(r.hostname, r.interface) for r in rows] == [
        ("busy-tx", "eth0"),
        ("busy-rx", "eth0"),
        ("busy-rx", "eth1"),
        ("quiet", "eth0"),
    ]
    top = bandwidth(db, since_ms=T0, until_ms=NOW, top=2)
    assert top == rows[:2]
    assert bandwidth(db, since_ms=T0, until_ms=NOW, top=10) == rows


def test_top_must_be_positive(db: sqlite3.Connection) -> None:
    with pytest.raises(QueryError, match="top"):
        bandwidth(db, since_ms=T0, until_ms=NOW, top=0)


def test_agent_and_interface_filters(db: sqlite3.Connection, three_hosts: dict[str, int]) -> None:
    by_agent = bandwidth(db, since_ms=T0, until_ms=NOW, agent=three_hosts["busy-rx"])
    assert sorted(r.interface for r in by_agent) == ["eth0", "eth1"]
    assert {r.hostname for r in by_agent} == {"busy-rx"}

    by_interface = bandwidth(db, since_ms=T0, until_ms=NOW, interface="eth1")
    assert [(r.hostname, r.interface) for r in by_interface] == [("busy-rx", "eth1")]

    both = bandwidth(db, since_ms=T0, until_ms=NOW, agent=three_hosts["quiet"], interface="eth0")
    assert [(r.hostname, r.interface, r.samples) for r in both] == [("quiet", "eth0", 10)]
    assert bandwidth(db, since_ms=T0, until_ms=NOW, agent=three_hosts["quiet"], interface="eth1") == []


def test_bandwidth_inside_a_callers_transaction_leaves_it_open(db: sqlite3.Connection, web: int) -> None:
    db.execute("BEGIN")
    assert len(bandwidth(db, since_ms=T0, until_ms=NOW)) == 1
    assert db.in_transaction
    db.execute("COMMIT")
    assert not db.in_transaction


def test_bandwidth_on_a_read_only_connection(tmp_path: Path, db: sqlite3.Connection, web: int) -> None:
    readonly = open_database(tmp_path / "zonewatch.db", readonly=True)
    try:
        assert [r.samples for r in bandwidth(readonly, since_ms=T0, until_ms=NOW)] == [20]
        assert resolve_agent(readonly, "gaj-web-01") == web
    finally:
        readonly.close()


# Two, as before the schema change. Each sample in range costs ~1.5 us in Python (fetching
# its values is most of it): 4 interfaces took 57-64 ms on the 2-core dev box.
INTERFACES_PER_HOST = 2


def test_one_agent_over_a_day_is_fast(db: sqlite3.Connection) -> None:
    """DESIGN.md: CLI queries p99 <= 50 ms. A day at 10 s for a host with several
    interfaces, its batches interleaved with other hosts' as the writer stores them."""
    day_start = NOW - 86_400_000
    agents = [add_agent(db, f"perf{n:04d}", f"perf-{n}") for n in range(5)]
    series = {
        agent: [series_of(db, agent, f"eth{i}") for i in range(INTERFACES_PER_HOST)] for agent in agents
    }
    batches: list[tuple[Any, ...]] = []
    samples: list[tuple[Any, ...]] = []
    for k in range(8640):
        time_ms = day_start + k * 10_000
        kb = 1000 + k % 97
        for agent in agents:
            first = len(samples) + 1
            for sid in series[agent]:
                samples.append(
                    (len(samples) + 1, agent, sid, k + 1, time_ms, kb, 500, 1, 1, 0, 0, 0, 0, 10_000,
                     kb * 0.8, 400.0, GBIT, kb * 0.8 / GBIT, 0)
                )  # fmt: skip
            batches.append(
                (agent, k + 1, time_ms, time_ms, INTERFACES_PER_HOST, "stored", time_ms, time_ms,
                 first, len(samples))
            )  # fmt: skip
    db.execute("BEGIN")
    db.executemany("INSERT INTO batches VALUES (" + ", ".join("?" * 10) + ")", batches)
    db.executemany("INSERT INTO interface_samples VALUES (" + ", ".join("?" * 19) + ")", samples)
    db.execute("COMMIT")

    timings = []
    for _ in range(5):
        started = time.perf_counter()
        result = bandwidth(db, since_ms=day_start, until_ms=NOW, agent=agents[2])
        timings.append(time.perf_counter() - started)
    assert [r.samples for r in result] == [8640] * INTERFACES_PER_HOST
    assert min(timings) < 0.050, f"fastest of 5: {min(timings) * 1000:.1f} ms"


# --- output ------------------------------------------------------------------------------------


def bandwidth_row(**changes: Any) -> BandwidthRow:
    row = BandwidthRow(
        hostname="gaj-web-01",
        agent_id="7f3a9c2e-0001",
        department="市公安局",
        county="高新区",
        interface="eth0",
        samples=8640,
        current_rx_bps=12_345_678.0,
        current_tx_bps=2_000.0,
        avg_rx_bps=1_000_000.0,
        avg_tx_bps=200_000.0,
        p95_rx_bps=15_000_000.0,
        p95_tx_bps=3_000_000.0,
        peak_rx_bps=2_000_000_000.0,
        peak_tx_bps=4_000_000.0,
        speed_bps=GBIT,
        utilization_p95=0.125,
        utilization_peak=None,
        total_rx_bytes=1_288_490_189,
        total_tx_bytes=5,
        counter_resets=0,
        last_ms=NOW,
    )
    return row._replace(**changes)


def agent_row(**changes: Any) -> AgentRow:
    row = AgentRow(
        agent_id="7f3a9c2e-0001",
        hostname="gaj-web-01",
        department="市公安局",
        county="高新区",
        site="政务云",
        role="web",
        agent_version="0.1.0",
        policy_version="p-1",
        first_seen_ms=NOW - 86_400_000,
        last_seen_ms=NOW,
        last_seq=42,
        clock_skew_ms=-1200,
        status="online",
    )
    return row._replace(**changes)


def rendered(rows: list[BandwidthRow] | list[AgentRow], fmt: str, **kwargs: Any) -> str:
    stream = io.StringIO()
    columns = BANDWIDTH_COLUMNS if not rows or isinstance(rows[0], BandwidthRow) else AGENT_COLUMNS
    render(rows, fmt, columns, stream, **kwargs)
    return stream.getvalue()


def test_json_round_trips_raw_values_and_keeps_chinese_readable() -> None:
    rows = [bandwidth_row(), bandwidth_row(hostname="jyj-web-01", department="市教育局")]
    text = rendered(rows, "json")
    assert "市公安局" in text and "市教育局" in text
    assert "\\u" not in text
    parsed = json.loads(text)
    assert parsed == [row._asdict() for row in rows]
    assert list(parsed[0]) == list(BandwidthRow._fields)
    assert parsed[0]["utilization_peak"] is None
    assert parsed[0]["last_ms"] == NOW


def test_json_of_agents_carries_every_field() -> None:
    (parsed,) = json.loads(rendered([agent_row()], "json"))
    assert list(parsed) == list(AgentRow._fields)
    assert parsed["first_seen_ms"] == NOW - 86_400_000


def test_csv_has_field_names_as_header_and_raw_values() -> None:
    text = rendered([agent_row(), agent_row(hostname="db-01", status="offline")], "csv")
    header, first, second = list(csv.reader(io.StringIO(text)))
    assert header == [column.field for column in AGENT_COLUMNS]
    assert dict(zip(header, first, strict=True))["department"] == "市公安局"
    assert dict(zip(header, first, strict=True))["last_seen_ms"] == str(NOW)
    assert dict(zip(header, second, strict=True))["status"] == "offline"


def test_csv_writes_none_as_empty_and_floats_unrounded() -> None:
    text = rendered([bandwidth_row(current_rx_bps=1234.5678)], "csv")
    header, values = list(csv.reader(io.StringIO(text)))
    record = dict(zip(header, values, strict=True))
    assert record["utilization_peak"] == ""
    assert record["current_rx_bps"] == "1234.5678"


def test_table_uses_human_units_and_local_time(beijing: None) -> None:
    text = rendered([bandwidth_row()], "table")
    for shown in ("12.3 Mbit/s", "2.0 Gbit/s", "1.0 Gbit/s", "1.2 GiB", "5 B", "12.5 %", "8,640"):
        assert shown in text
    assert "2026-11-28 07:40:01" in text
    assert "市公安局" in text
    assert "rx p95" in text


def test_table_shows_unknown_link_speed_as_a_dash() -> None:
    text = rendered([bandwidth_row(speed_bps=0, utilization_p95=None)], "table")
    assert "0 bit/s" not in text
    (line,) = [line for line in text.splitlines() if "gaj-web-01" in line]
    assert " - " in line


def test_table_shows_agent_status_and_never_folds_wide_rows(beijing: None) -> None:
    text = rendered([agent_row(), agent_row(hostname="db-01", status="offline")], "table")
    lines = text.splitlines()
    assert any("gaj-web-01" in line and "online" in line and "2026-11-28 07:40:01" in line for line in lines)
    assert any("db-01" in line and "offline" in line for line in lines)
    assert "…" not in text


def test_table_colours_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("NO_COLOR", raising=False)
    rows = [agent_row(status="online"), agent_row(status="stale"), agent_row(status="offline")]
    text = rendered(rows, "table")
    assert "\x1b[32monline" in text
    assert "\x1b[33mstale" in text
    assert "\x1b[31moffline" in text


def test_table_does_not_interpret_markup_in_values() -> None:
    text = rendered([agent_row(hostname="host[bold]x[/bold]")], "table")
    assert "host[bold]x[/bold]" in text


def test_empty_outputs() -> None:
    assert rendered([], "table") == "no samples in range\n"
    agents = io.StringIO()
    render([], "table", AGENT_COLUMNS, agents)
    assert agents.getvalue() == "no agents\n"
    custom = io.StringIO()
    render([], "table", AGENT_COLUMNS, custom, empty_message="no offline agents")
    assert custom.getvalue() == "no offline agents\n"
    assert rendered([], "json") == "[]\n"
    assert rendered([], "csv") == ",".join(column.field for column in BANDWIDTH_COLUMNS) + "\n"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(QueryError, match="unknown output format 'yaml'"):
        rendered([agent_row()], "yaml")


def test_render_without_columns_shows_every_field() -> None:
    stream = io.StringIO()
    render([agent_row()], "csv", None, stream)
    assert stream.getvalue().splitlines()[0] == ",".join(AgentRow._fields)


@pytest.mark.parametrize(
    ("bps", "shown"),
    [
        (0, "0 bit/s"),
        (999, "999 bit/s"),
        (999.7, "1.0 kbit/s"),
        (1000, "1.0 kbit/s"),
        (999_970, "1.0 Mbit/s"),
        (2.5e12, "2.5 Tbit/s"),
    ],
)
def test_human_bps(bps: float, shown: str) -> None:
    assert human_bps(bps) == shown


@pytest.mark.parametrize(
    ("count", "shown"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 << 40, "3.0 TiB")]
)
def test_human_bytes(count: int, shown: str) -> None:
    assert human_bytes(count) == shown


# --- parse_time --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        (" NOW ", NOW),
        ("30s", NOW - 30_000),
        ("15m", NOW - 15 * 60_000),
        ("2h", NOW - 2 * 3_600_000),
        ("7d", NOW - 7 * 86_400_000),
        # local (UTC+8) midnight and times
        ("2026-11-28", 1_795_795_200_000),
        ("2026-11-28T07:00", 1_795_820_400_000),
        ("2026-11-28 07:00:00", 1_795_820_400_000),
        ("2026-11-28T07:40:01.250", NOW + 250),
        # an explicit offset wins over local time
        ("2026-11-27T23:00Z", 1_795_820_400_000),
        ("2026-11-28T07:00+08:00", 1_795_820_400_000),
        ("2026-11-28T00:00:00+0100", 1_795_820_400_000),
    ],
)
def test_parse_time_accepted_forms(beijing: None, text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize(
    "text",
    ["xyz", "", "15x", "15", "-5m", "2h30m", "2026-13-01", "2026-11-31", "2026-W48", "20261128", "yesterday"],
)
def test_parse_time_rejects_everything_else(text: str) -> None:
    with pytest.raises(QueryError) as raised:
        parse_time(text, NOW)
    assert str(raised.value) == (f"malformed time {text!r}: use 15m, 2h, 7d, 2026-11-28 or 2026-11-28T07:00")


def test_malformed_time_message_names_the_input() -> None:
    with pytest.raises(QueryError) as raised:
        parse_time("xyz", NOW)
    assert str(raised.value) == "malformed time 'xyz': use 15m, 2h, 7d, 2026-11-28 or 2026-11-28T07:00"


def test_parse_since_returns_a_non_empty_range() -> None:
    assert parse_since("2h", now_ms=NOW) == (NOW - 7_200_000, NOW)
    assert parse_since("2h", "1h", now_ms=NOW) == (NOW - 7_200_000, NOW - 3_600_000)
    with pytest.raises(QueryError, match="empty time range"):
        parse_since("1h", "2h", now_ms=NOW)


def test_check_range() -> None:
    check_range(NOW - 1, NOW)
    with pytest.raises(QueryError, match="empty time range"):
        check_range(NOW, NOW)
    with pytest.raises(QueryError, match="empty time range"):
        check_range(NOW + 1, NOW)

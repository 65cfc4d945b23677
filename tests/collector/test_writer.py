"""The ingest writer and the schema against a real SQLite file: settle, dedupe, gaps, failures."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from collector.errors import StoreError
from collector.model import SAMPLE_COLUMNS, AgentHello, HostLabels, Settled, ValidBatch
from collector.store import open_database
from collector.store.schema import MIGRATIONS, migrate
from collector.store.writer import Rejected, Writer

NOW = 1_700_000_000_000
AGENT = "agent-0001"
LABELS = HostLabels("市公安局", "高新区", "主机房", "server")
# One interface sample in SAMPLE_COLUMNS order: time_ms, interface, eight counters, interval_ms,
# rx_bps, tx_bps, speed_bps, utilization, counter_reset.
Row = tuple[int, str, int, int, int, int, int, int, int, int, int, float, float, int, float, bool]
# Samples as stored, with the interface name read back through its series.
STORED_SAMPLES = (
    "SELECT s.seq, s.time_ms, series.interface, s.rx_bytes, s.tx_bytes, s.rx_packets, s.tx_packets,"
    " s.rx_errors, s.tx_errors, s.rx_drops, s.tx_drops, s.interval_ms, s.rx_bps, s.tx_bps, s.speed_bps,"
    " s.utilization, s.counter_reset"
    " FROM interface_samples AS s JOIN series ON series.id = s.series AND series.agent = s.agent"
    " ORDER BY s.seq, series.interface"
)


def hello(
    agent_id: str = AGENT,
    *,
    hostname: str = "web-01",
    labels: HostLabels = LABELS,
    time_ms: int = NOW,
) -> AgentHello:
    return AgentHello(agent_id, hostname, "0.1.0", labels, "policy-1", time_ms)


def row(time_ms: int = NOW, interface: str = "eth0", rx_bytes: int = 1_000) -> Row:
    return (
        time_ms,
        interface,
        rx_bytes,
        2_000,
        10,
        20,
        0,
        0,
        0,
        0,
        10_000,
        800.0,
        1600.0,
        1_000_000_000,
        0.0016,
        False,
    )


def batch(
    seq: int,
    rows: list[Row] | None = None,
    *,
    agent_id: str = AGENT,
    sent_ms: int = NOW,
    received_ms: int = NOW,
    others: list[tuple[int, str, bytes]] | None = None,
) -> ValidBatch:
    rows = [row()] if rows is None else rows
    others = others or []
    assert all(len(r) == len(SAMPLE_COLUMNS) for r in rows)
    times = [r[0] for r in rows] + [o[0] for o in others]
    return ValidBatch(
        agent_id=agent_id,
        seq=seq,
        sent_ms=sent_ms,
        received_ms=received_ms,
        first_ms=min(times, default=sent_ms),
        last_ms=max(times, default=sent_ms),
        sample_columns=ValidBatch.columns_of(rows),
        other_rows=others,
    )


def rejected(
    seq: int, *, agent_id: str = AGENT, code: str = "INVALID_ARGUMENT", received_ms: int = NOW
) -> Rejected:
    return Rejected(
        agent_id,
        seq,
        received_ms,
        code,
        "batch.facts[0].interface_sample.rx_bps",
        "must be a finite number, got nan",
        "ipv4:10.0.0.7:50000",
    )


@pytest.fixture
def writer(db: sqlite3.Connection) -> Writer:
    w = Writer(db)
    assert w.register(hello(), NOW) == 0
    return w


def peek(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read the file through a connection of its own: what is there is what was committed."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def stored_seqs(path: Path) -> list[tuple[int, str]]:
    return peek(path, "SELECT seq, status FROM batches ORDER BY seq")  # type: ignore[return-value]


def sample_seqs(path: Path) -> list[int]:
    return [seq for (seq,) in peek(path, "SELECT seq FROM interface_samples ORDER BY seq, rowid")]  # type: ignore[misc]


def misplaced_samples(path: Path) -> int:
    """Samples outside their batch's (first_sample, last_sample) range, plus ranges of the wrong size."""
    ((outside,),) = peek(
        path,
        "SELECT count(*) FROM interface_samples AS s"
        " LEFT JOIN batches AS b ON b.agent = s.agent AND b.seq = s.seq"
        " WHERE b.first_sample IS NULL OR s.id NOT BETWEEN b.first_sample AND b.last_sample",
    )
    ((wrong_size,),) = peek(
        path,
        "SELECT count(*) FROM batches AS b WHERE b.first_sample IS NOT NULL"
        " AND b.last_sample - b.first_sample + 1"
        " != (SELECT count(*) FROM interface_samples AS s WHERE s.agent = b.agent AND s.seq = b.seq)",
    )
    return int(outside) + int(wrong_size)  # type: ignore[call-overload]


def agent_last_seq(path: Path, agent_id: str = AGENT) -> int:
    ((last,),) = peek(path, "SELECT last_seq FROM agents WHERE agent_id = ?", (agent_id,))
    return int(last)  # type: ignore[call-overload]


# --- register -------------------------------------------------------------------------------


def test_register_creates_the_agent_and_returns_zero(db: sqlite3.Connection, path: Path) -> None:
    writer = Writer(db)
    assert writer.register(hello(time_ms=NOW + 250), NOW) == 0
    assert writer.last_seq(AGENT) == 0
    assert peek(
        path,
        "SELECT agent_id, hostname, agent_version, department, county, site, role, policy_version,"
        " first_seen_ms, last_seen_ms, last_seq, clock_skew_ms FROM agents",
    ) == [(AGENT, "web-01", "0.1.0", "市公安局", "高新区", "主机房", "server", "policy-1", NOW, NOW, 0, 250)]


def test_register_again_keeps_last_seq_and_takes_the_new_labels(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(2)])
    moved = hello(hostname="web-01b", labels=HostLabels("市公安局", "高新区", "二号机房", "db"))
    assert writer.register(moved, NOW + 5_000) == 2
    assert peek(
        path,
        "SELECT hostname, department, county, site, role, first_seen_ms, last_seen_ms, last_seq FROM agents",
    ) == [("web-01b", "市公安局", "高新区", "二号机房", "db", NOW, NOW + 5_000, 2)]


def test_a_new_writer_on_the_same_file_knows_the_sequences(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(2), batch(3)])
    restarted = open_database(path)
    try:
        again = Writer(restarted)
        assert again.last_seq(AGENT) == 3
        assert again.register(hello(), NOW) == 3
        # After the restart a resent batch is still recognised, and the next one follows on,
        # in the series the first writer created for its interface.
        assert again.commit([batch(3), batch(4, [row(NOW, "eth0"), row(NOW, "eth1")])]) == [
            Settled(3, True, 0, 0),
            Settled(4, False, 0, 0),
        ]
    finally:
        restarted.close()
    assert stored_seqs(path) == [(1, "stored"), (2, "stored"), (3, "stored"), (4, "stored")]
    assert sample_seqs(path) == [1, 2, 3, 4, 4]
    # The restarted writer numbered its samples on from the first one's.
    assert misplaced_samples(path) == 0
    assert [(seq, name) for seq, _, name, *_ in peek(path, STORED_SAMPLES)] == [
        (1, "eth0"),
        (2, "eth0"),
        (3, "eth0"),
        (4, "eth0"),
        (4, "eth1"),
    ]
    assert peek(path, "SELECT interface FROM series ORDER BY interface") == [("eth0",), ("eth1",)]


# --- commit ---------------------------------------------------------------------------------


def test_commit_stores_samples_and_batches_and_advances_last_seq(writer: Writer, path: Path) -> None:
    first = batch(1, [row(NOW, "eth0", 111), row(NOW, "eth1", 222)], sent_ms=NOW - 40, received_ms=NOW)
    second = batch(2, [row(NOW + 10_000, "eth0", 333)], sent_ms=NOW + 10_000, received_ms=NOW + 10_100)
    assert writer.commit([first, second]) == [Settled(1, False, 0, 0), Settled(2, False, 0, 0)]
    assert writer.last_seq(AGENT) == 2

    assert peek(
        path, "SELECT seq, sent_ms, received_ms, facts, status, first_ms, last_ms FROM batches ORDER BY seq"
    ) == [
        (1, NOW - 40, NOW, 2, "stored", NOW, NOW),
        (2, NOW + 10_000, NOW + 10_100, 1, "stored", NOW + 10_000, NOW + 10_000),
    ]
    assert misplaced_samples(path) == 0
    assert peek(path, STORED_SAMPLES) == [
        (1, NOW, "eth0", 111, 2_000, 10, 20, 0, 0, 0, 0, 10_000, 800.0, 1600.0, 1_000_000_000, 0.0016, 0),
        (1, NOW, "eth1", 222, 2_000, 10, 20, 0, 0, 0, 0, 10_000, 800.0, 1600.0, 1_000_000_000, 0.0016, 0),
        (
            2,
            NOW + 10_000,
            "eth0",
            333,
            2_000,
            10,
            20,
            0,
            0,
            0,
            0,
            10_000,
            800.0,
            1600.0,
            1_000_000_000,
            0.0016,
            0,
        ),
    ]
    # One series per (agent, interface), shared by every batch that names it.
    assert peek(path, "SELECT interface FROM series ORDER BY interface") == [("eth0",), ("eth1",)]
    assert peek(path, "SELECT last_seq, last_seen_ms, clock_skew_ms FROM agents") == [(2, NOW + 10_100, -100)]


def test_a_replayed_batch_is_a_duplicate_and_stored_once(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(2)])
    assert writer.commit([batch(1)]) == [Settled(2, True, 0, 0)]
    assert writer.commit([batch(2), batch(3)]) == [Settled(2, True, 0, 0), Settled(3, False, 0, 0)]
    assert stored_seqs(path) == [(1, "stored"), (2, "stored"), (3, "stored")]
    assert sample_seqs(path) == [1, 2, 3]
    assert writer.last_seq(AGENT) == 3


def test_the_same_seq_twice_in_one_group_is_stored_once(writer: Writer, path: Path) -> None:
    assert writer.commit([batch(1), batch(1)]) == [Settled(1, False, 0, 0), Settled(1, True, 0, 0)]
    assert stored_seqs(path) == [(1, "stored")]
    assert sample_seqs(path) == [1]


def test_a_gap_is_recorded_and_reported(writer: Writer, path: Path) -> None:
    assert writer.commit([batch(1)]) == [Settled(1, False, 0, 0)]
    assert writer.commit([batch(4, received_ms=NOW + 7)]) == [Settled(4, False, 2, 3)]
    assert peek(path, "SELECT from_seq, to_seq, detected_ms FROM sequence_gaps") == [(2, 3, NOW + 7)]
    assert writer.last_seq(AGENT) == 4


def test_gaps_raise_one_incident_per_agent_that_counts_them(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(4, received_ms=NOW + 7)])
    writer.commit([batch(10, received_ms=NOW + 9)])
    ((rule, key, severity, status, count, first, last, evidence),) = peek(
        path,
        "SELECT rule, dedup_key, severity, status, count, first_seen_ms, last_seen_ms, evidence"
        " FROM incidents",
    )
    assert (rule, key, severity, status, count) == ("zonewatch.sequence_gap", AGENT, "medium", "open", 2)
    assert (first, last) == (NOW + 7, NOW + 9)
    assert json.loads(evidence) == {"agent_id": AGENT, "from_seq": 5, "to_seq": 9, "missing": 5}


def test_a_sequence_going_backwards_raises_a_clone_incident(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(4)])
    writer.commit([batch(2, received_ms=NOW + 9)])
    rules = peek(path, "SELECT rule, severity, count FROM incidents ORDER BY rule")
    assert rules == [("zonewatch.agent_clone", "high", 1), ("zonewatch.sequence_gap", "medium", 1)]


def test_a_gap_inside_one_group_is_recorded(writer: Writer, path: Path) -> None:
    assert writer.commit([batch(1), batch(5)]) == [Settled(1, False, 0, 0), Settled(5, False, 2, 4)]
    assert peek(path, "SELECT from_seq, to_seq FROM sequence_gaps") == [(2, 4)]


def test_a_seq_back_in_a_hole_it_never_filled_is_refused(writer: Writer, path: Path) -> None:
    writer.commit([batch(1), batch(4)])
    (outcome,) = writer.commit([batch(2, received_ms=NOW + 9)])
    assert isinstance(outcome, Rejected)
    assert (outcome.agent_id, outcome.seq, outcome.code, outcome.field) == (
        AGENT,
        2,
        "FAILED_PRECONDITION",
        "batch.seq",
    )
    assert "went backwards" in outcome.message
    assert stored_seqs(path) == [(1, "stored"), (4, "stored")]
    assert sample_seqs(path) == [1, 4]
    assert writer.last_seq(AGENT) == 4
    assert peek(path, "SELECT agent_id, seq, received_ms, code FROM rejections") == [
        (AGENT, 2, NOW + 9, "FAILED_PRECONDITION")
    ]


def test_an_invalid_batch_is_settled_and_recorded(writer: Writer, path: Path) -> None:
    writer.commit([batch(1)])
    refusal = rejected(2, received_ms=NOW + 3)
    assert writer.commit([refusal]) == [refusal]
    assert writer.last_seq(AGENT) == 2
    assert agent_last_seq(path) == 2
    assert stored_seqs(path) == [(1, "stored"), (2, "rejected")]
    assert peek(path, "SELECT first_ms, last_ms, first_sample FROM batches WHERE seq = 2") == [
        (None, None, None)
    ]
    assert sample_seqs(path) == [1]
    assert peek(path, "SELECT agent_id, seq, received_ms, code, field, message, peer FROM rejections") == [
        tuple(refusal)
    ]
    # The sequence moves on past it: the next batch is no gap, a resend of it no hole.
    assert writer.commit([batch(3)]) == [Settled(3, False, 0, 0)]
    assert writer.commit([batch(2)]) == [Settled(3, True, 0, 0)]
    assert peek(path, "SELECT count(*) FROM sequence_gaps") == [(0,)]


def test_an_invalid_batch_keeps_the_agents_clock_skew(db: sqlite3.Connection, path: Path) -> None:
    writer = Writer(db)
    writer.register(hello(time_ms=NOW + 4_000), NOW)
    writer.commit([rejected(1)])
    assert peek(path, "SELECT clock_skew_ms FROM agents") == [(4_000,)]


def test_a_rejection_that_does_not_settle_leaves_the_sequence_alone(writer: Writer, path: Path) -> None:
    writer.commit([batch(1)])
    refusal = rejected(2, code="FAILED_PRECONDITION")
    assert writer.commit([refusal]) == [refusal]
    assert writer.last_seq(AGENT) == 1
    assert stored_seqs(path) == [(1, "stored")]
    assert peek(path, "SELECT seq, code FROM rejections") == [(2, "FAILED_PRECONDITION")]


def test_a_rejection_for_an_unknown_agent_is_recorded(writer: Writer, path: Path) -> None:
    stranger = rejected(0, agent_id="never-said-hello")
    assert writer.commit([stranger]) == [stranger]
    assert peek(path, "SELECT agent_id, seq, code FROM rejections") == [
        ("never-said-hello", 0, "INVALID_ARGUMENT")
    ]
    assert peek(path, "SELECT agent_id FROM agents") == [(AGENT,)]


def test_a_batch_before_hello_raises_and_stores_nothing(writer: Writer, path: Path) -> None:
    with pytest.raises(StoreError, match="never-said-hello"):
        writer.commit([batch(1), batch(1, agent_id="never-said-hello")])
    assert stored_seqs(path) == []
    assert writer.last_seq(AGENT) == 0


def test_facts_without_a_table_are_kept_verbatim(writer: Writer, path: Path) -> None:
    payload = bytes(range(256)) + "数据丢失".encode()
    others = [(NOW, "data_loss", payload), (NOW + 1, "unknown", b"\x00\xff\x00")]
    assert writer.commit([batch(1, [], others=others)]) == [Settled(1, False, 0, 0)]
    assert peek(path, "SELECT seq, time_ms, kind, payload FROM other_facts ORDER BY time_ms") == [
        (1, NOW, "data_loss", payload),
        (1, NOW + 1, "unknown", b"\x00\xff\x00"),
    ]
    assert peek(path, "SELECT facts FROM batches") == [(2,)]


def test_several_agents_in_one_group(writer: Writer, path: Path) -> None:
    writer.register(hello("agent-0002", hostname="db-01"), NOW)
    outcomes = writer.commit(
        [batch(1), batch(1, agent_id="agent-0002"), batch(2), batch(3, agent_id="agent-0002")]
    )
    assert outcomes == [
        Settled(1, False, 0, 0),
        Settled(1, False, 0, 0),
        Settled(2, False, 0, 0),
        Settled(3, False, 2, 2),
    ]
    assert (writer.last_seq(AGENT), writer.last_seq("agent-0002")) == (2, 3)
    assert peek(path, "SELECT agent_id, last_seq FROM agents ORDER BY agent_id") == [
        (AGENT, 2),
        ("agent-0002", 3),
    ]


def test_a_failed_commit_changes_nothing_and_a_retry_is_stored(writer: Writer, path: Path) -> None:
    writer.commit([batch(1)])
    # Batch 3 names an interface seen for the first time: its new series must roll back too.
    retried: list[ValidBatch | Rejected] = [batch(2), batch(3, [row(NOW, "eth0"), row(NOW, "wlan0")])]
    # Another connection takes the samples table away, so the INSERT fails after the batches row went in.
    saboteur = sqlite3.connect(path, isolation_level=None)
    try:
        saboteur.execute("ALTER TABLE interface_samples RENAME TO interface_samples_away")
        with pytest.raises(StoreError, match="cannot store"):
            writer.commit(retried)
        assert writer.last_seq(AGENT) == 1
        assert agent_last_seq(path) == 1
        assert stored_seqs(path) == [(1, "stored")]
        assert peek(path, "SELECT interface FROM series") == [("eth0",)]
        saboteur.execute("ALTER TABLE interface_samples_away RENAME TO interface_samples")
    finally:
        saboteur.close()

    assert writer.commit(retried) == [Settled(2, False, 0, 0), Settled(3, False, 0, 0)]
    assert stored_seqs(path) == [(1, "stored"), (2, "stored"), (3, "stored")]
    assert agent_last_seq(path) == 3
    # Sample ids handed out to the failed commit were taken back with it.
    assert misplaced_samples(path) == 0
    assert [(seq, name) for seq, _, name, *_ in peek(path, STORED_SAMPLES)] == [
        (1, "eth0"),
        (2, "eth0"),
        (3, "eth0"),
        (3, "wlan0"),
    ]


# --- schema ---------------------------------------------------------------------------------


def test_migrate_is_idempotent(db: sqlite3.Connection, path: Path) -> None:
    assert migrate(db) == len(MIGRATIONS)
    assert migrate(db) == len(MIGRATIONS)
    open_database(path).close()
    assert peek(path, "SELECT version, name FROM schema_migrations ORDER BY version") == [
        (version, name) for version, (name, _) in enumerate(MIGRATIONS, start=1)
    ]
    tables = {name for (name,) in peek(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {
        "agents",
        "batches",
        "series",
        "interface_samples",
        "other_facts",
        "rejections",
        "sequence_gaps",
    } <= tables


def test_a_database_from_a_newer_collector_is_refused(db: sqlite3.Connection, path: Path) -> None:
    newer = len(MIGRATIONS) + 1
    db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (newer,))
    with pytest.raises(StoreError, match=f"version {newer} is newer"):
        migrate(db)
    with pytest.raises(StoreError, match="upgrade zonewatch"):
        open_database(path)

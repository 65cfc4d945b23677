"""The story an admin tells: an agent reports, the collector stores, the operator queries;
the collector goes down and comes back, and nothing is lost or counted twice."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Collector, Process, cli_json, run_cli, start_agent

from agent.spool import Spool
from collector.policy import AgentPolicy


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stored_batches(db: Path) -> list[tuple[int, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT seq, facts FROM batches WHERE status = 'stored' ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def policy_version(db: Path) -> str:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT policy_version FROM agents").fetchone()
        return row[0] if row else ""
    finally:
        con.close()


def test_report_arrives_and_is_queryable(collector: Collector, tmp_path: Path) -> None:
    agent = start_agent(collector.target, tmp_path / "agent")
    try:
        wait_until(lambda: len(stored_batches(collector.db)) >= 2, what="two batches stored")
        wait_until(lambda: policy_version(collector.db) != "", what="the agent confirming its policy")
    finally:
        assert agent.stop() == 0, agent.log()

    agents = cli_json("zonewatch-collector", "agents", "--db", str(collector.db))
    assert len(agents) == 1
    (row,) = agents
    assert row["hostname"] == "web-01"
    assert (row["department"], row["county"], row["site"], row["role"]) == (
        "市公安局",
        "高新区",
        "主机房",
        "server",
    )
    assert row["status"] == "online"
    # The policy the collector serves (interval 1 s, interface lo) is the one the agent runs.
    assert row["policy_version"] == AgentPolicy(sample_interval_s=1, interfaces=("lo",)).version

    bandwidth = cli_json("zonewatch-collector", "bandwidth", "--db", str(collector.db), "--since", "10m")
    assert [r["interface"] for r in bandwidth] == ["lo"]
    assert bandwidth[0]["samples"] >= 2
    # The table view is what people read: it must show the labels as written.
    table = run_cli("zonewatch-collector", "agents", "--db", str(collector.db)).stdout
    assert "市公安局" in table and "web-01" in table
    # Bandwidth fits a terminal by default; --wide and the machine formats carry every field.
    db = str(collector.db)
    narrow = run_cli("zonewatch-collector", "bandwidth", "--db", db, "--since", "10m").stdout
    wide = run_cli("zonewatch-collector", "bandwidth", "--db", db, "--since", "10m", "--wide").stdout
    csv_header = run_cli(
        "zonewatch-collector", "bandwidth", "--db", db, "--format", "csv"
    ).stdout.splitlines()[0]
    assert "rx p95" in narrow and "rx avg" not in narrow
    assert "rx avg" in wide and "resets" in wide
    assert "avg_rx_bps" in csv_header.split(",")
    assert max(map(len, narrow.splitlines())) <= 140


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "kill-9"])
def test_collector_restart_loses_and_duplicates_nothing(tmp_path: Path, how: int) -> None:
    db = tmp_path / "collector.db"
    first = Collector(db)
    port = first.port
    agent = start_agent(first.target, tmp_path / "agent")
    second: Collector | None = None
    try:
        wait_until(lambda: len(stored_batches(db)) >= 2, what="batches before the restart")
        first.stop(how)
        time.sleep(2.5)  # the agent keeps sampling into its spool meanwhile
        second = Collector(db, port)
        before = len(stored_batches(db))
        wait_until(lambda: len(stored_batches(db)) >= before + 3, what="batches after the restart")
    finally:
        assert agent.stop() == 0, agent.log()
        if second is not None:
            second.stop()

    with Spool(tmp_path / "agent" / "spool.db") as spool:
        stats = spool.stats()
        unacked = {b.seq for b in spool.pending(limit=10_000)}
    produced = set(range(1, stats.next_seq))
    batches = stored_batches(db)
    seqs = [seq for seq, _ in batches]
    assert len(seqs) == len(set(seqs)), "a batch was stored twice"
    # Every batch the agent made is either in the database or still spooled for the next run.
    assert set(seqs) | unacked == produced
    assert not set(seqs) & unacked or stats.batches == len(unacked)
    con = sqlite3.connect(db)
    (samples,) = con.execute(
        "SELECT (SELECT count(*) FROM interface_samples) + (SELECT count(*) FROM other_facts)"
        " + (SELECT count(*) FROM zone_traffic)"
    ).fetchone()
    (health,) = con.execute("SELECT count(*) FROM other_facts WHERE kind = 'agent_health'").fetchone()
    (gaps,) = con.execute("SELECT count(*) FROM sequence_gaps").fetchone()
    con.close()
    assert samples == sum(facts for _, facts in batches), "every fact of every stored batch is stored once"
    assert health == len(batches), "every batch reports the agent's health"
    assert gaps == 0


def test_agent_restart_resends_its_spool(tmp_path: Path) -> None:
    """Reports made while no collector exists are delivered once it appears, after an agent restart."""
    db = tmp_path / "collector.db"
    probe = Collector(db)
    port = probe.port
    probe.stop()
    agent = start_agent(f"127.0.0.1:{port}", tmp_path / "agent")
    time.sleep(3.5)
    assert agent.stop() == 0, agent.log()
    with Spool(tmp_path / "agent" / "spool.db") as spool:
        spooled = spool.stats().batches
    assert spooled >= 2, "the agent should have spooled reports while the collector was away"

    collector = Collector(db, port)
    agent2: Process = start_agent(collector.target, tmp_path / "agent")
    try:
        wait_until(lambda: len(stored_batches(db)) >= spooled, what="spooled batches delivered")
    finally:
        agent2.stop()
        collector.stop()
    seqs = [seq for seq, _ in stored_batches(db)]
    assert seqs[:spooled] == list(range(1, spooled + 1))

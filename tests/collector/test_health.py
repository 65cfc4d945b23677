"""`zonewatch-collector health`: a real collector (with its writer process) on port 0, real batches over
its Report stream, and the figures the command prints from the database it wrote."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Stream, now_ms, run_cli, sample

from agent.wire import batch_request
from collector.store import open_database
from collector.store.health import low_disk_warning
from protos.zonewatch.v1 import facts_pb2

GIB = 1 << 30


def health(db: Path, *args: str) -> dict[str, Any]:
    result = run_cli("zonewatch-collector", "health", "--db", str(db), *args, "--format", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def table(db: Path, *args: str) -> str:
    return run_cli("zonewatch-collector", "health", "--db", str(db), *args).stdout


def health_batch(seq: int, time_ms: int | None = None, **figures: Any) -> bytes:
    t = time_ms if time_ms is not None else now_ms()
    msg = batch_request(seq, t, t, [sample()])
    msg.batch.facts.append(facts_pb2.Fact(time_ms=t, agent_health=facts_pb2.AgentHealth(**figures)))
    return msg.SerializeToString()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A collector of the test's own: health counts every batch in the database."""
    c = Collector(tmp_path / "collector.db")
    yield c
    c.stop()


def test_ingest_rates_and_lag_from_the_agents_send_times(collector: Collector) -> None:
    lags = [1000, 2000, 3000, 4000, 5000, 6000]  # ms between the agent building a batch and sending it
    first = Stream(collector.target, "lag-01")
    sent_at = []
    for seq, lag in enumerate(lags, start=1):
        t = now_ms() - lag
        sent_at.append(t)
        assert first.batch(seq, sample(), sample(interface="eth1"), sample(interface="eth2"), sent_ms=t).ack
    first.close()
    second = Stream(collector.target, "lag-02")
    assert second.batch(1, sent_ms=now_ms()).ack.acked_seq == 1
    second.close()

    report = health(collector.db, "--since", "5m")
    assert report["window_ms"] == 300_000
    ingest = report["ingest"]
    assert (ingest["batches"], ingest["facts"], ingest["agents"]) == (7, 6 * 3 + 1, 2)
    assert ingest["facts_per_s"] == pytest.approx(19 / 300)
    assert ingest["batches_per_s"] == pytest.approx(7 / 300)

    con = sqlite3.connect(collector.db)
    stored = sorted(r - s for r, s in con.execute("SELECT received_ms, sent_ms FROM batches"))
    skews = sorted(k for (k,) in con.execute("SELECT clock_skew_ms FROM agents"))
    con.close()
    # received_ms is the collector's clock, a few ms after each send: the lag is what we chose, plus that.
    by_lag = sorted(stored)[1:]  # lag-02's batch went straight through
    for chosen, measured in zip(lags, by_lag, strict=True):
        assert chosen <= measured < chosen + 2000
    lag = report["lag_ms"]
    assert lag["batches"] == 7
    assert lag["p50"] == stored[3]  # nearest rank: the 4th of 7
    assert lag["p99"] == lag["max"] == stored[-1]
    assert 6000 <= lag["max"] < 8000
    # Each agent's skew is sent - received of its latest batch: the median of two is the lower one.
    assert lag["clock_skew_median"] == skews[0]
    assert -8000 < skews[0] <= -6000

    text = table(collector.db)
    assert "7 batches, 19 facts from 2 agents" in text
    assert "p50" in text and "clock skew" in text

    # A window that starts after the last batch: nothing in it.
    time.sleep(1.2)
    later = health(collector.db, "--since", "1s")
    assert later["ingest"]["batches"] == later["ingest"]["facts"] == 0
    assert later["lag_ms"] == {"batches": 0, "p50": None, "p99": None, "max": None, "clock_skew_median": None}


def test_rejections_grouped_by_code_and_field_with_the_newest_message(collector: Collector) -> None:
    stream = Stream(collector.target, "bad-01")
    for seq, rate in ((1, math.nan), (2, math.nan), (3, -5.0)):
        reply = stream.batch(seq, sample(rx_bps=rate))
        assert reply.rejection.field == "batch.facts[0].interface_sample.rx_bps"
    assert stream.batch(4, sample(interval_ms=0)).WhichOneof("body") == "rejection"
    assert stream.batch(5).ack.acked_seq == 5
    assert stream.batch(5).rejection.code != 0  # not greater than the previous one on this stream
    stream.close()

    report = health(collector.db)
    rejected = {(r["code"], r["field"]): r for r in report["rejected"]}
    rates = rejected[("INVALID_ARGUMENT", "batch.facts[0].interface_sample.rx_bps")]
    assert rates["times"] == 3
    assert rates["example"] == "must be in [0, 1e+13], got -5.0"
    assert rates["last_agent_id"] == "bad-01"
    assert rejected[("INVALID_ARGUMENT", "batch.facts[0].interface_sample.interval_ms")]["times"] == 1
    assert rejected[("FAILED_PRECONDITION", "batch.seq")]["times"] == 1
    assert len(report["rejected"]) == 3
    assert report["rejected"][0] == rates, "most frequent first"
    # Only the valid batch counts as stored.
    assert report["ingest"]["batches"] == 1

    text = table(collector.db)
    assert "5 (3 reasons, below)" in text
    assert "Rejected in the window, by reason" in text
    assert "batch.facts[0].interface_sample.rx_bps" in text and "got -5.0" in text


def test_sequence_gaps_counted(collector: Collector) -> None:
    stream = Stream(collector.target, "gappy-01")
    for seq in (1, 2, 5, 9):  # 3-4 and 6-8 never came (evicted from a full spool)
        assert stream.batch(seq).ack.acked_seq == seq
    stream.close()
    other = Stream(collector.target, "steady-01")
    assert other.batch(1).ack.acked_seq == 1
    assert other.batch(2).ack.acked_seq == 2
    other.close()

    gaps = health(collector.db)["gaps"]
    assert (gaps["gaps"], gaps["missing_batches"], gaps["agents"]) == (2, 5, 1)
    assert isinstance(gaps["open_incidents"], int) and gaps["open_incidents"] >= 0
    assert "2 sequence gaps from 1 agent, 5 batches missing" in table(collector.db)


def test_agent_health_spool_and_capture_worst_first(collector: Collector) -> None:
    quiet = Stream(collector.target, "quiet-01")  # goes silent: offline with a 2 s threshold
    assert quiet.batch(1).ack.acked_seq == 1
    quiet.close()
    time.sleep(2.5)

    small = Stream(collector.target, "small-01")
    status = {"interfaces": "on", "flows": "off: no CAP_NET_RAW"}
    t = now_ms()
    reply = small.send(
        health_batch(
            1, t, cpu_percent=1.5, rss_bytes=40 * 2**20, spool_bytes=5 * 2**20, spool_batches=12,
            capture_packets=10_000, capture_drops=250, policy_version="p1", sensor_status=status,
        )
    )  # fmt: skip
    assert reply.ack.acked_seq == 1
    # A replayed older report (earlier fact time, later batch) does not replace the newer one.
    reply = small.send(health_batch(2, t - 60_000, spool_bytes=1, spool_batches=1, capture_packets=1))
    assert reply.ack.acked_seq == 2
    small.close()
    big = Stream(collector.target, "big-01")
    assert big.send(health_batch(1, spool_bytes=50 * 2**20, spool_batches=400)).ack.acked_seq == 1
    big.close()
    silent = Stream(collector.target, "nohealth-01")  # reports, but never its own health
    assert silent.batch(1).ack.acked_seq == 1
    silent.close()

    thresholds = ("--stale-after", "2s", "--offline-after", "2s")
    report = health(collector.db, *thresholds)
    assert report["agents"] == {"total": 4, "online": 3, "stale": 0, "offline": 1}
    rows = report["agent_health"]
    assert [r["agent_id"] for r in rows] == ["quiet-01", "big-01", "small-01", "nohealth-01"]
    assert rows[0]["status"] == "offline"
    mine = rows[2]
    assert mine["health_ms"] == t
    assert mine["cpu_percent"] == pytest.approx(1.5)
    assert (mine["rss_bytes"], mine["spool_bytes"], mine["spool_batches"]) == (40 * 2**20, 5 * 2**20, 12)
    assert (mine["capture_packets"], mine["capture_drops"]) == (10_000, 250)
    assert mine["drop_fraction"] == pytest.approx(0.025)
    assert mine["sensors"] == "flows: off: no CAP_NET_RAW"
    assert rows[1]["spool_bytes"] == 50 * 2**20 and rows[1]["drop_fraction"] is None
    never = rows[3]
    assert never["health_ms"] is None and never["spool_bytes"] is None and never["cpu_percent"] is None

    text = table(collector.db, *thresholds)
    assert "4 agents: 3 online, 0 stale, 1 offline" in text
    assert "Agents, worst first" in text
    for shown in ("small-01", "5.0 MiB", "50.0 MiB", "10,000", "250", "2.5 %", "1.5 %", "no CAP_NET_RAW"):
        assert shown in text, shown
    agents_part = text[text.index("Agents, worst first") :]
    assert agents_part.index("quiet-01") < agents_part.index("big-01") < agents_part.index("small-01")

    lines = list(
        csv.DictReader(
            io.StringIO(
                run_cli("zonewatch-collector", "health", "--db", str(collector.db), "--format", "csv").stdout
            )
        )
    )
    # Default thresholds: every agent online, so the biggest spool backlog comes first.
    assert [line["agent_id"] for line in lines][:2] == ["big-01", "small-01"]
    assert lines[1]["spool_batches"] == "12" and lines[1]["capture_drops"] == "250"


@pytest.mark.parametrize("field", ["spool_bytes", "spool_batches", "capture_packets", "capture_drops"])
def test_spool_and_capture_figures_beyond_int64_are_rejected(collector: Collector, field: str) -> None:
    stream = Stream(collector.target, "huge-01")
    reply = stream.send(health_batch(1, **{field: 2**63}))
    assert reply.WhichOneof("body") == "rejection"
    assert reply.rejection.field == f"batch.facts[1].agent_health.{field}"
    assert reply.rejection.message == f"{2**63} is out of range (at most {2**63 - 1})"
    assert stream.send(health_batch(2, **{field: 2**63 - 1})).ack.acked_seq == 2
    stream.close()
    (row,) = health(collector.db)["agent_health"]
    assert row[field] == 2**63 - 1
    (rejected,) = health(collector.db)["rejected"]
    assert (rejected["field"], rejected["times"]) == (f"batch.facts[1].agent_health.{field}", 1)


def test_storage_figures(collector: Collector) -> None:
    stream = Stream(collector.target, "disk-01")
    assert stream.batch(1).ack.acked_seq == 1
    stream.close()
    disk = health(collector.db)["storage"]
    usage = shutil.disk_usage(collector.db.parent)
    assert disk["path"] == str(collector.db)
    assert 4096 <= disk["db_bytes"] <= collector.db.stat().st_size * 2
    assert disk["wal_bytes"] > 0, "a running collector has a WAL"
    assert disk["disk_total_bytes"] == usage.total
    assert 0 < disk["disk_free_bytes"] <= usage.total
    assert disk["disk_free_fraction"] == pytest.approx(disk["disk_free_bytes"] / disk["disk_total_bytes"])
    assert (disk["warning"] is None) == (
        disk["disk_free_fraction"] >= 0.10 and disk["disk_free_bytes"] >= GIB
    )
    text = table(collector.db)
    assert "database" in text and "free of" in text


@pytest.mark.parametrize(
    ("free", "total", "warned"),
    [
        (50 * GIB, 100 * GIB, False),
        (9 * GIB, 100 * GIB, True),  # under 10 %
        (GIB // 2, 2 * GIB, True),  # 25 %, but under 1 GiB
        (GIB, 10 * GIB, False),  # exactly at both limits
    ],
)
def test_low_disk_warning_thresholds(free: int, total: int, warned: bool) -> None:
    warning = low_disk_warning("/var/lib/zonewatch/collector.db", free, total)
    assert (warning is not None) == warned
    if warning:
        assert warning.startswith("low disk space:") and "/var/lib/zonewatch/collector.db" in warning


def test_empty_database_says_no_agents_yet(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    open_database(db).close()
    text = table(db)
    assert "no agents yet" in text and "nothing stored in the window" in text
    assert "Traceback" not in text
    report = health(db)
    assert report["agents"] == {"total": 0, "online": 0, "stale": 0, "offline": 0}
    assert report["agent_health"] == [] and report["rejected"] == []
    assert report["ingest"]["batches"] == 0 and report["lag_ms"]["p50"] is None
    out = run_cli("zonewatch-collector", "health", "--db", str(db), "--format", "csv").stdout
    assert out.splitlines() == [
        "hostname,agent_id,status,last_seen_ms,health_ms,cpu_percent,rss_bytes,spool_bytes,spool_batches,"
        "capture_packets,capture_drops,drop_fraction,policy_version,sensors"
    ]


def test_database_not_yet_upgraded_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    open_database(db).close()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    con.commit()
    con.close()
    result = run_cli("zonewatch-collector", "health", "--db", str(db), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "schema version" in line and "zonewatch-collector serve" in line


def test_bad_window_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    open_database(db).close()
    result = run_cli("zonewatch-collector", "health", "--db", str(db), "--since", "soon", check=False)
    assert result.returncode == 2 and "malformed time" in result.stderr


def test_help() -> None:
    out = run_cli("zonewatch-collector", "health", "--help").stdout
    assert "--since" in out and "per-agent rows only" in out and "clock skew" in out

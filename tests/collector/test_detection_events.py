"""What the detector adds to the facts before rules see them (collector/detection.py), on a real
database: labels, zone judgments, outbound baselines, saturation, capture loss, migration
transitions and silence. The engine is replaced by a recorder so each event can be read back."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from collector.detection import BASELINE_WARMUP, Detector
from collector.model import (
    SAMPLE_COLUMNS,
    AccessRow,
    AgentHello,
    DetectionConfig,
    HealthRow,
    HostLabels,
    Settled,
    ValidBatch,
    ZoneInfo,
    ZoneTrafficRow,
)
from collector.store.writer import Writer

T0 = 1_800_000_000_000
ZONES = {
    "运维区": ZoneInfo("extranet", "horizontal", True),
    "横向": ZoneInfo("extranet", "horizontal", False),
    "互联网": ZoneInfo("internet", "", False),
    "涉密网": ZoneInfo("classified", "", False),
}


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def process(self, events: list[dict[str, Any]]) -> list[Any]:
        self.events.extend(events)
        return []

    def reload(self, rules: Any) -> None:
        pass


@pytest.fixture
def setup(db: sqlite3.Connection) -> tuple[Detector, Writer, Recorder]:
    writer = Writer(db)
    writer.register(
        AgentHello("a1", "ga-ws-01", "t", HostLabels("市公安局", "高新区", "", "office"), "", T0), T0
    )
    detector = Detector(db)
    detector.config = DetectionConfig("", ZONES, {"office": ("extranet",)}, 10.0)
    recorder = Recorder()
    detector.engine = recorder  # type: ignore[assignment]
    detector._wanted = frozenset(  # every category, as if rules asked for all of them
        ("access", "listener", "flow", "zone_traffic", "interface", "agent_health", "migration", "heartbeat")
    )
    return detector, writer, recorder


def batch(seq: int, t: int, **rows: Any) -> ValidBatch:
    return ValidBatch("a1", seq, t, t, t, t, rows.pop("samples", ()), [], **rows)


def observe(detector: Detector, writer: Writer, *batches: ValidBatch, duplicate: bool = False) -> None:
    detector.observe(batches, [Settled(b.seq, duplicate, 0, 0) for b in batches], writer.agent_key)


def access(peer: str, zone: str, *, local_zone: str = "横向", inbound: bool = True) -> AccessRow:
    return AccessRow(
        T0, inbound, peer, zone, local_zone, 3, 1, 1, 1, 1, 0, 100, 200, 10_000, (22,), "ssh", 22
    )


def test_access_events_carry_labels_and_the_catalogs_judgments(
    setup: tuple[Detector, Writer, Recorder],
) -> None:
    detector, writer, recorder = setup
    rows = [
        access("10.9.0.5", "运维区"),
        access("10.1.0.5", "横向"),
        access("198.51.100.7", "互联网", inbound=False),
        access("192.168.200.9", "涉密网", inbound=False),
    ]
    observe(detector, writer, batch(1, T0, access_rows=rows))
    admin, same, internet, secret = recorder.events
    assert admin["department"] == "市公安局" and admin["hostname"] == "ga-ws-01" and admin["role"] == "office"
    assert admin["peer_zone_admin"] and not same["peer_zone_admin"]
    assert same["peer_same_zone"] and not admin["peer_same_zone"]
    assert admin["failed"] == 2 and admin["service"] == "ssh" and admin["ports"] == [22]
    assert internet["direction"] == "outbound" and not internet["zone_allowed"]  # office: extranet only
    assert secret["peer_zone_kind"] == "classified" and not secret["zone_allowed"]
    assert same["zone_allowed"]


def test_a_duplicate_batch_is_not_judged_again(setup: tuple[Detector, Writer, Recorder]) -> None:
    detector, writer, recorder = setup
    observe(detector, writer, batch(1, T0, access_rows=[access("10.1.0.5", "横向")]), duplicate=True)
    assert recorder.events == []


def zone_row(t: int, bytes_out: int) -> ZoneTrafficRow:
    return ZoneTrafficRow(t, "互联网", "", 0, bytes_out, 0, 10, 10_000, "nftables", 1.0)


def test_the_outbound_baseline_is_trusted_after_its_warmup(setup: tuple[Detector, Writer, Recorder]) -> None:
    detector, writer, recorder = setup
    for n in range(BASELINE_WARMUP):
        observe(
            detector, writer, batch(n + 1, T0 + n * 10_000, zone_rows=[zone_row(T0 + n * 10_000, 125_000)])
        )
    assert {e["baseline_ratio"] for e in recorder.events} == {-1.0}  # 100 kbit/s, but not trusted yet
    t = T0 + BASELINE_WARMUP * 10_000
    observe(detector, writer, batch(99, t, zone_rows=[zone_row(t, 2_500_000)]))  # 2 Mbit/s
    spike = recorder.events[-1]
    assert spike["bps_out"] == pytest.approx(2e6)
    assert spike["baseline_bps_out"] == pytest.approx(1e5)
    assert spike["baseline_ratio"] == pytest.approx(20.0)


def samples(t: int, utilization: float) -> list[list[Any]]:
    row = dict.fromkeys(SAMPLE_COLUMNS, 0)
    row.update(time_ms=t, interface="eth0", interval_ms=10_000, rx_bps=9e8, tx_bps=1e6, speed_bps=10**9)
    row["utilization"] = utilization
    return [[row[c]] for c in SAMPLE_COLUMNS]


def test_saturation_is_timed_and_a_dip_starts_it_again(setup: tuple[Detector, Writer, Recorder]) -> None:
    detector, writer, recorder = setup
    loads = [0.9] * 31 + [0.5] + [0.85] * 2
    for n, load in enumerate(loads):
        t = T0 + n * 10_000
        observe(detector, writer, batch(n + 1, t, samples=samples(t, load)))
    # Only saturated samples become events; each covers its 10 s interval, and the dip starts it again.
    saturated = [e["saturated_s"] for e in recorder.events]
    assert saturated == [10.0 * n for n in range(1, 32)] + [10.0, 20.0]


def health(t: int, packets: int, drops: int) -> HealthRow:
    return HealthRow(t, 0.3, 40 << 20, 0, 0, packets, drops, "{}")


def test_capture_loss_is_per_interval_and_survives_an_agent_restart(
    setup: tuple[Detector, Writer, Recorder],
) -> None:
    detector, writer, recorder = setup
    counters = [(1000, 0), (2000, 0), (3000, 50), (400, 8)]  # the last: a restarted agent counts afresh
    for n, (packets, drops) in enumerate(counters):
        observe(detector, writer, batch(n + 1, T0 + n, health_rows=[health(T0 + n, packets, drops)]))
    assert [round(e["capture_loss_pct"], 2) for e in recorder.events] == [0.0, 0.0, 5.0, 2.0]


def test_migration_transitions_become_events_once(
    setup: tuple[Detector, Writer, Recorder], db: sqlite3.Connection
) -> None:
    detector, writer, recorder = setup
    evidence = {
        "dedicated": {"bytes": 4096},
        "blockers": [{"process": "java", "pid": 812, "remote_addr": "172.20.1.9"}],
    }
    db.execute(
        "INSERT INTO migration_transitions (agent, network, from_state, to_state, time_ms, evidence)"
        " VALUES (?, '公安专网', 'migrated', 'regressed', ?, ?)",
        (writer.agent_key("a1"), T0, json.dumps(evidence)),
    )
    detector.migration_events()
    detector.migration_events()
    (event,) = recorder.events
    assert event["category"] == "migration" and event["to_state"] == "regressed"
    assert event["bytes_dedicated"] == 4096 and event["blockers"] == ["java (812) -> 172.20.1.9"]


def test_silence_is_measured_in_the_agents_own_intervals(setup: tuple[Detector, Writer, Recorder]) -> None:
    detector, writer, recorder = setup
    detector.silence(T0)  # the collector starts
    for n in range(5):  # a batch every 2 s, by the collector's clock (received_ms)
        observe(detector, writer, batch(n + 1, T0 + n * 2000))
    last = T0 + 4 * 2000
    detector.silence(last + 2000)  # one interval: not silent yet
    assert recorder.events == []
    detector.silence(last + 7000)
    (event,) = recorder.events
    assert event["category"] == "heartbeat" and event["interval_s"] == 2.0
    assert event["intervals_missed"] == pytest.approx(3.5) and event["hostname"] == "ga-ws-01"


def test_silence_the_collector_caused_is_excused(setup: tuple[Detector, Writer, Recorder]) -> None:
    detector, writer, recorder = setup
    detector.silence(T0)
    for n in range(5):
        observe(detector, writer, batch(n + 1, T0 + n * 2000))
    down_until = T0 + 60_000  # the collector was down, or its disk full, until here
    detector.excuse(down_until)
    detector.silence(down_until + 2000)  # 62 s after the last batch, but only 2 s of it were the agent's
    assert recorder.events == []
    detector.silence(down_until + 7000)
    assert [e["silent_s"] for e in recorder.events] == [7.0]


def test_a_revoked_agent_is_gone_not_silent(
    setup: tuple[Detector, Writer, Recorder], db: sqlite3.Connection
) -> None:
    detector, writer, recorder = setup
    for n in range(5):
        observe(detector, writer, batch(n + 1, T0 + n * 2000))
    db.execute("UPDATE agents SET revoked_ms = ? WHERE agent_id = 'a1'", (T0,))
    detector.silence(T0 + 60_000)
    assert recorder.events == []


def test_a_long_silence_is_told_at_each_interval_then_ever_more_rarely(
    setup: tuple[Detector, Writer, Recorder],
) -> None:
    detector, writer, recorder = setup
    detector.silence(T0)
    for n in range(5):
        observe(detector, writer, batch(n + 1, T0 + n * 2000))
    last = T0 + 4 * 2000
    for second in range(1, 200):
        detector.silence(last + second * 1000)
    told = [int(e["intervals_missed"]) for e in recorder.events]
    assert told == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 40, 80]

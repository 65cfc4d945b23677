"""The link-load view: traffic per zone, department, county and agent, bucketed over the fleet."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.errors import QueryError
from collector.model import AgentHello, HostLabels, ValidBatch, ZoneTrafficRow
from collector.store import open_database
from collector.store.traffic import traffic
from collector.store.writer import Writer

T0 = 1_795_000_000_000  # a minute boundary
MINUTE = 60_000
VERTICAL = "省电子政务外网（纵向）"


def zone_row(time_ms: int, zone: str, bytes_in: int, bytes_out: int, rate: float = 1.0) -> ZoneTrafficRow:
    return ZoneTrafficRow(time_ms, zone, "", bytes_in, bytes_out, 1, 1, 10_000, "nftables", rate)


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.db"
    writer = Writer(open_database(path))
    hosts = {"a1": ("市公安局", "高新区"), "a2": ("市公安局", "经开区"), "a3": ("市人社局", "高新区")}
    for agent_id, (department, county) in hosts.items():
        writer.register(
            AgentHello(agent_id, f"host-{agent_id}", "t", HostLabels(department, county), "", T0), T0
        )
    writer.store_catalog(
        [("省电子政务外网（纵向）", "extranet", "vertical", "", "10.10.0.0/16", 1_000_000),
         ("公安专网", "dedicated", "", "市公安局", "172.20.0.0/16", 0)],
        "v1", T0,
    )  # fmt: skip
    seq = {"a1": 0, "a2": 0, "a3": 0}

    def send(agent_id: str, *rows: ZoneTrafficRow) -> None:
        seq[agent_id] += 1
        t = rows[0].time_ms
        writer.commit([ValidBatch(agent_id, seq[agent_id], t, t, t, t, (), [], list(rows))])

    # Minute 0: a1 and a2 both send to the vertical link; minute 1: nothing; minute 2: a3 only.
    send(
        "a1",
        zone_row(T0 + 1000, "省电子政务外网（纵向）", 60_000, 30_000),
        zone_row(T0 + 1000, "公安专网", 600, 0),
    )
    send("a2", zone_row(T0 + 2000, "省电子政务外网（纵向）", 15_000, 7_500))
    # Sampled capture accounting saw a tenth of the packets: its counts scale back up.
    send("a3", zone_row(T0 + 2 * MINUTE, "省电子政务外网（纵向）", 750, 375, rate=0.1))
    return open_database(path, readonly=True)


def test_by_zone_sums_the_fleet_per_bucket_and_loads_the_link(db) -> None:  # type: ignore[no-untyped-def]
    rows = {
        r.group: r for r in traffic(db, by="zone", since_ms=T0, until_ms=T0 + 3 * MINUTE, bucket_ms=MINUTE)
    }
    vertical = rows["省电子政务外网（纵向）"]
    assert (vertical.kind, vertical.direction, vertical.agents) == ("extranet", "vertical", 3)
    assert (vertical.bytes_in, vertical.bytes_out) == (60_000 + 15_000 + 7_500, 30_000 + 7_500 + 3_750)
    # Buckets: minute 0 = 75,000 B in, minute 1 = 0 (idle, still counted), minute 2 = 7,500 B.
    assert vertical.peak_in_bps == pytest.approx(75_000 * 8 / 60)
    assert vertical.p95_in_bps == pytest.approx(75_000 * 8 / 60)  # nearest rank of 3 buckets: the largest
    assert vertical.avg_in_bps == pytest.approx(82_500 * 8 / 180)
    assert vertical.capacity_bps == 1_000_000
    assert vertical.utilization_peak == pytest.approx(75_000 * 8 / 60 / 1_000_000)
    police = rows["公安专网"]
    assert police.capacity_bps == 0 and police.utilization_p95 is None
    # Busiest first.
    assert next(iter(rows)) == "省电子政务外网（纵向）"


def test_by_department_county_and_agent(db) -> None:  # type: ignore[no-untyped-def]
    def totals(by: str) -> dict[str, int]:
        found = traffic(db, by=by, since_ms=T0, until_ms=T0 + 3 * MINUTE, bucket_ms=MINUTE)
        return {r.group: r.bytes_in for r in found}

    assert totals("department") == {"市公安局": 60_600 + 15_000, "市人社局": 7_500}
    assert totals("county") == {"高新区": 60_600 + 7_500, "经开区": 15_000}
    assert set(totals("agent")) == {"host-a1 (a1)", "host-a2 (a2)", "host-a3 (a3)"}


def test_zone_filter_and_time_bounds(db) -> None:  # type: ignore[no-untyped-def]
    only = traffic(db, by="department", since_ms=T0, until_ms=T0 + MINUTE, bucket_ms=MINUTE, zone="公安专网")
    assert [(r.group, r.bytes_in) for r in only] == [("市公安局", 600)]
    assert traffic(db, by="zone", since_ms=T0 + 3 * MINUTE, until_ms=T0 + 4 * MINUTE, bucket_ms=MINUTE) == []
    # until is exclusive: the sample at T0 + 2 min is out of [T0, T0 + 2 min).
    rows = traffic(db, by="zone", since_ms=T0, until_ms=T0 + 2 * MINUTE, bucket_ms=MINUTE)
    assert {r.group: r.bytes_in for r in rows}["省电子政务外网（纵向）"] == 75_000


def test_bad_grouping_and_bucket(db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(QueryError, match="group"):
        traffic(db, by="planet", since_ms=T0, until_ms=T0 + MINUTE, bucket_ms=MINUTE)
    with pytest.raises(QueryError, match="bucket"):
        traffic(db, by="zone", since_ms=T0, until_ms=T0 + MINUTE, bucket_ms=10)

"""The agent's tick: every sensor once, one batch, and a health fact that says which sensor is off and why."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.aggregate.flowwatch import FlowMonitor
from agent.config import AgentConfig
from agent.errors import SensorError
from agent.policy import PolicyUpdate
from agent.runner import Agent
from agent.sensors.accounting import ZoneCounters, ZoneRanges
from agent.sensors.capture import CaptureStats, PacketSummary
from agent.sensors.interfaces import InterfaceSampler, RawCounters
from agent.zonemap import ZoneMap
from protos.zonewatch.v1 import agent_pb2

ZONES = (ZoneRanges("公安专网", [(0x0AFA0200, 0x0AFA02FF)], []),)


class FakeAccountant:
    def __init__(self, available: tuple[bool, str] = (True, ""), fail_apply: bool = False) -> None:
        self._available = available
        self._fail_apply = fail_apply
        self.applied: list[Any] = []
        self.counts = {"公安专网": ZoneCounters(0, 0, 0, 0)}
        self.removed = False

    def available(self) -> tuple[bool, str]:
        return self._available

    def apply(self, zones: Any) -> None:
        if self._fail_apply:
            raise SensorError("nft -f -: Error: Could not process rule: No such file or directory")
        self.applied.append(zones)

    def read(self) -> dict[str, ZoneCounters]:
        return dict(self.counts)

    def remove(self) -> None:
        self.removed = True


class FakeEngine:
    """A capture engine with nothing to read: the tests put packets into the flow tables."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._read_end, self._write_end = os.pipe()
        self.sampling_rate = 1
        self.closed = False

    def fileno(self) -> int:
        return self._read_end

    def read(self, timeout_ms: int) -> list[PacketSummary]:
        return []

    def stats(self) -> CaptureStats:
        return CaptureStats(0, 0, 0, self.sampling_rate, 0, 0, 0, 0)

    def close(self) -> None:
        if not self.closed:
            os.close(self._read_end)
            os.close(self._write_end)
            self.closed = True


class Capture:
    """The agent's capture, with fake engines on the interfaces in ``present``."""

    def __init__(self) -> None:
        self.present = {"eth0"}
        self.engines: dict[str, FakeEngine] = {}
        self.monitors: list[FlowMonitor] = []

    def open(self, name: str) -> FakeEngine:
        self.engines[name] = FakeEngine(name)
        return self.engines[name]

    def check(self, name: str) -> tuple[bool, str]:
        return (True, "") if name in self.present else (False, f"{name}: no such device")

    def __call__(self, interfaces: Sequence[str], zones: ZoneMap, **kwargs: Any) -> FlowMonitor:
        monitor = FlowMonitor(interfaces, zones, open_engine=self.open, check=self.check, **kwargs)  # type: ignore[arg-type]
        self.monitors.append(monitor)
        return monitor


@pytest.fixture
def capture() -> Iterator[Capture]:
    fake = Capture()
    yield fake
    for monitor in fake.monitors:
        monitor.close()


def make_agent(tmp_path: Path, accountant: Any, capture: Capture | None = None, **config: Any) -> Agent:
    clock = iter(range(0, 10**12, 10**9))
    raw = {"eth0": RawCounters(0, 0, 0, 0, 0, 0, 0, 0, 1000, True)}
    sampler = InterfaceSampler(read=lambda: dict(raw), monotonic_ns=lambda: next(clock))
    sampler.sample()
    config.setdefault("interfaces", ("eth0",))
    cfg = AgentConfig(collector="127.0.0.1:1", state_dir=tmp_path / "state", **config)
    # Never the real capture: a unit test must not open packet sockets on this machine's interfaces.
    return Agent(
        cfg,
        sampler=sampler,
        accountant=accountant,
        flow_monitor=capture or Capture(),
        clock_ms=lambda: 1_795_000_000_000,
    )


def update(zones: tuple[ZoneRanges, ...] = ZONES) -> PolicyUpdate:
    return PolicyUpdate("p1", 10, (), 500, 60, "zones-v1", zones)


def last_batch(agent: Agent) -> agent_pb2.Batch:
    (spooled,) = agent.spool.pending()[-1:]
    return agent_pb2.ReportRequest.FromString(spooled.payload).batch


def kinds(batch: agent_pb2.Batch) -> list[str | None]:
    return [f.WhichOneof("kind") for f in batch.facts]


def health(batch: agent_pb2.Batch) -> dict[str, str]:
    (fact,) = [f for f in batch.facts if f.WhichOneof("kind") == "agent_health"]
    return dict(fact.agent_health.sensor_status)


def test_without_nft_the_agent_reports_everything_else_and_says_why(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path, FakeAccountant(available=(False, "nft: not installed")), zone_accounting="nftables"
    )
    agent.apply_policy(update())
    agent.tick()
    batch = last_batch(agent)
    assert kinds(batch) == ["interface_sample", "agent_health"]
    assert health(batch)["zone_accounting"] == "off: nft: not installed"
    assert health(batch)["interfaces"] == "on"


def test_a_failing_apply_turns_zone_accounting_off_with_the_reason(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeAccountant(fail_apply=True), zone_accounting="nftables")
    agent.apply_policy(update())
    agent.tick()
    assert health(last_batch(agent))["zone_accounting"].startswith("off: nft -f -: Error")


def test_zone_traffic_is_reported_per_tick_as_deltas(tmp_path: Path) -> None:
    accountant = FakeAccountant()
    agent = make_agent(tmp_path, accountant)
    agent.apply_policy(update())
    assert accountant.applied == [ZONES]
    assert health_after_tick(agent)["zone_accounting"].startswith("on: nftables, 1 zones")
    accountant.counts = {"公安专网": ZoneCounters(5_000, 1_000, 5, 2)}
    agent.tick()
    (zt,) = [f.zone_traffic for f in last_batch(agent).facts if f.WhichOneof("kind") == "zone_traffic"]
    assert (zt.zone, zt.bytes_in, zt.bytes_out, zt.packets_in, zt.packets_out) == (
        "公安专网",
        5_000,
        1_000,
        5,
        2,
    )
    assert zt.method == "nftables" and zt.sampling_rate == 1.0
    # The same catalog version again is not re-applied.
    agent.apply_policy(update())
    assert len(accountant.applied) == 1


def health_after_tick(agent: Agent) -> dict[str, str]:
    agent.tick()
    return health(last_batch(agent))


def test_zone_accounting_can_be_disabled(tmp_path: Path) -> None:
    accountant = FakeAccountant()
    agent = make_agent(tmp_path, accountant, zone_accounting="off")
    agent.apply_policy(update())
    assert accountant.applied == []
    assert health_after_tick(agent)["zone_accounting"] == "off: disabled in the agent's configuration"


def test_a_policy_without_zones_waits(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeAccountant())
    agent.apply_policy(update(zones=()))
    assert health_after_tick(agent)["zone_accounting"] == "waiting for a zone catalog from the collector"


PEER = 0x0AFA0214  # 10.250.2.20, in 公安专网
LOCAL = 0x0AFA010A  # 10.250.1.10, no zone


def packet(outgoing: bool, length: int, sampling_rate: int = 1, sport: int = 40000) -> PacketSummary:
    src, dst = (LOCAL, PEER) if outgoing else (PEER, LOCAL)
    ports = (sport, 443) if outgoing else (443, sport)
    return PacketSummary(1, 4, src, dst, 6, *ports, 0x10, length, outgoing, sampling_rate)


def zone_traffic(agent: Agent) -> list[Any]:
    agent.tick()
    return [f.zone_traffic for f in last_batch(agent).facts if f.WhichOneof("kind") == "zone_traffic"]


def test_without_nft_zone_accounting_falls_back_to_the_capture_and_says_so(
    tmp_path: Path, capture: Capture
) -> None:
    agent = make_agent(
        tmp_path, FakeAccountant(available=(False, "nft: not installed")), capture, flows=False
    )
    agent.apply_policy(update())
    status = health_after_tick(agent)["zone_accounting"]
    assert (
        status
        == "fallback: capture on eth0 (nftables unavailable: nft: not installed), 1 zones, catalog zones-v1"
    )
    (monitor,) = capture.monitors
    with monitor._lock:
        monitor.tables["eth0"].add([packet(True, 1500), packet(True, 1500), packet(False, 60)])
    (zt,) = zone_traffic(agent)
    assert (zt.zone, zt.bytes_out, zt.packets_out, zt.bytes_in, zt.packets_in) == ("公安专网", 3000, 2, 60, 1)
    assert zt.method == "capture" and zt.sampling_rate == 1.0
    # Flows are off in this agent's config: the capture counts zones but reports no flow.
    assert health(last_batch(agent))["flows"] == "off: disabled in the agent's configuration"
    assert "flow" not in kinds(last_batch(agent))


def test_sampled_capture_reports_the_fraction_seen_and_says_counts_are_estimates(
    tmp_path: Path, capture: Capture
) -> None:
    agent = make_agent(tmp_path, FakeAccountant(available=(False, "no CAP_NET_ADMIN")), capture)
    agent.apply_policy(update())
    (monitor,) = capture.monitors
    capture.engines["eth0"].sampling_rate = 4
    with monitor._lock:  # overload: each summary stands for 4 packets
        monitor.tables["eth0"].add([packet(True, 1000, sampling_rate=4), packet(False, 100, sampling_rate=4)])
    (zt,) = zone_traffic(agent)
    # What was seen, and the fraction it was of everything: the collector scales it back up.
    assert (zt.bytes_out, zt.packets_out, zt.bytes_in, zt.packets_in) == (1000, 1, 100, 1)
    assert zt.sampling_rate == 0.25
    assert health(last_batch(agent))["zone_accounting"].endswith(
        "; sampling 1 in 4 under overload: counts are estimates"
    )


def test_capture_only_mode_never_touches_nftables(tmp_path: Path, capture: Capture) -> None:
    accountant = FakeAccountant()
    agent = make_agent(tmp_path, accountant, capture, zone_accounting="capture")
    agent.apply_policy(update())
    assert accountant.applied == []
    assert health_after_tick(agent)["zone_accounting"] == "on: capture on eth0, 1 zones, catalog zones-v1"


def test_no_nft_and_no_capture_says_both_reasons(tmp_path: Path, capture: Capture) -> None:
    capture.present = set()
    agent = make_agent(tmp_path, FakeAccountant(available=(False, "nft: not installed")), capture)
    agent.apply_policy(update())
    assert health_after_tick(agent)["zone_accounting"] == (
        "off: no capture either: eth0 off: eth0: no such device (nftables unavailable: nft: not installed)"
    )


def test_a_catalog_change_moves_open_flows_to_their_new_zone(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, FakeAccountant(available=(False, "nft: not installed")), capture)
    agent.apply_policy(update())
    (monitor,) = capture.monitors
    with monitor._lock:
        monitor.tables["eth0"].add([packet(True, 500)])
    assert [(z.zone, z.bytes_out) for z in zone_traffic(agent)] == [("公安专网", 500)]
    data_centre = ZoneRanges("公安数据中心", [(PEER, PEER)], [])
    agent.apply_policy(PolicyUpdate("p2", 10, (), 500, 60, "zones-v2", (*ZONES, data_centre)))
    with monitor._lock:  # the same open flow, now in the narrower zone
        monitor.tables["eth0"].add([packet(True, 700)])
    assert [(z.zone, z.bytes_out) for z in zone_traffic(agent)] == [("公安数据中心", 700)]


def test_an_interface_that_comes_up_later_is_captured_from_the_next_tick(
    tmp_path: Path, capture: Capture
) -> None:
    capture.present = {"eth0"}
    agent = make_agent(tmp_path, FakeAccountant(), capture, interfaces=("eth0", "vlan20"))
    agent.start_flows()
    (monitor,) = capture.monitors
    assert set(monitor.engines) == {"eth0"}
    assert (
        health_after_tick(agent)["flows"]
        == "on: eth0: 0 packets, 0 dropped; vlan20 off: vlan20: no such device"
    )
    capture.present.add("vlan20")
    assert health_after_tick(agent)["flows"] == "on: eth0: 0 packets, 0 dropped; vlan20: 0 packets, 0 dropped"
    # It goes away again: its engine is closed, what its table counted stays.
    with monitor._lock:
        monitor.tables["vlan20"].add([packet(True, 300)])
        monitor._failed.add("vlan20")  # what the reader does when the interface vanishes
    capture.present.discard("vlan20")
    agent.tick()
    assert capture.engines["vlan20"].closed and "vlan20" not in monitor.engines
    assert monitor.zone_counters()["unknown"].bytes_out == 300  # no catalog yet: zone unknown

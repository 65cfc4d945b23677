"""The agent's tick: every sensor once, one batch, and a health fact that says which sensor is off and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import SensorError
from agent.policy import PolicyUpdate
from agent.runner import Agent
from agent.sensors.accounting import ZoneCounters, ZoneRanges
from agent.sensors.interfaces import InterfaceSampler, RawCounters
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


def make_agent(tmp_path: Path, accountant: Any, **config: Any) -> Agent:
    clock = iter(range(0, 10**12, 10**9))
    raw = {"eth0": RawCounters(0, 0, 0, 0, 0, 0, 0, 0, 1000, True)}
    sampler = InterfaceSampler(read=lambda: dict(raw), monotonic_ns=lambda: next(clock))
    sampler.sample()
    cfg = AgentConfig(collector="127.0.0.1:1", state_dir=tmp_path / "state", **config)
    return Agent(cfg, sampler=sampler, accountant=accountant, clock_ms=lambda: 1_795_000_000_000)


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
    agent = make_agent(tmp_path, FakeAccountant(available=(False, "nft: not installed")))
    agent.apply_policy(update())
    agent.tick()
    batch = last_batch(agent)
    assert kinds(batch) == ["interface_sample", "agent_health"]
    assert health(batch)["zone_accounting"] == "off: nft: not installed"
    assert health(batch)["interfaces"] == "on"


def test_a_failing_apply_turns_zone_accounting_off_with_the_reason(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeAccountant(fail_apply=True))
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
    agent = make_agent(tmp_path, accountant, zone_accounting=False)
    agent.apply_policy(update())
    assert accountant.applied == []
    assert health_after_tick(agent)["zone_accounting"] == "off: disabled in the agent's configuration"


def test_a_policy_without_zones_waits(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeAccountant())
    agent.apply_policy(update(zones=()))
    assert health_after_tick(agent)["zone_accounting"] == "waiting for a zone catalog from the collector"

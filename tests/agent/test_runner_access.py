"""The agent's tick with access summaries and listeners: what the capture saw of connection attempts
and which sockets listen go into the spooled batch, on their own schedules, and say when they are off;
the settings that control them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_runner import Capture, FakeAccountant, health, kinds, last_batch, update

import agent.config
from agent.aggregate.flows import ProcessRef
from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, SensorError
from agent.runner import Agent
from agent.sensors.capture import PacketSummary
from agent.sensors.interfaces import InterfaceSampler, RawCounters
from agent.sensors.listeners import ListenerEvent
from protos.zonewatch.v1 import agent_pb2, facts_pb2

NOW_MS = 1_795_000_000_000
SCANNER = 0x0AFA0214  # 10.250.2.20, in 公安专网
LOCAL = 0x0AFA010A  # 10.250.1.10
SSHD = ProcessRef(812, "sshd", "root", "sshd: /usr/sbin/sshd -D")


class FakeListeners:
    """A listener sensor with scripted answers, one per poll."""

    def __init__(self, answers: list[list[ListenerEvent] | SensorError]) -> None:
        self.answers = answers
        self.polls = 0

    def poll(self) -> list[ListenerEvent]:
        answer = self.answers[self.polls]
        self.polls += 1
        if isinstance(answer, SensorError):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def capture() -> Iterator[Capture]:
    fake = Capture()
    yield fake
    for monitor in fake.monitors:
        monitor.close()


def make_agent(
    tmp_path: Path,
    capture: Capture,
    sensor: FakeListeners | None = None,
    clock: Clock | None = None,
    **config: Any,
) -> Agent:
    clock_ns = iter(range(0, 10**12, 10**9))
    raw = {"eth0": RawCounters(0, 0, 0, 0, 0, 0, 0, 0, 1000, True)}
    sampler = InterfaceSampler(read=lambda: dict(raw), monotonic_ns=lambda: next(clock_ns))
    sampler.sample()
    cfg = AgentConfig(collector="127.0.0.1:1", state_dir=tmp_path / "state", interfaces=("eth0",), **config)
    return Agent(
        cfg,
        sampler=sampler,
        accountant=FakeAccountant(),  # type: ignore[arg-type]
        flow_monitor=capture,
        listeners=lambda: sensor or FakeListeners([]),  # type: ignore[return-value]
        clock_ms=lambda: NOW_MS,
        monotonic=clock or Clock(),
    )


def facts(batch: agent_pb2.Batch, kind: str) -> list[Any]:
    return [getattr(f, kind) for f in batch.facts if f.WhichOneof("kind") == kind]


def scan(port_from: int, ports: int) -> list[PacketSummary]:
    """A SYN scan from SCANNER: closed ports refused with RST-ACK, the last three bytes."""
    ts = (NOW_MS - 5_000) * 1_000_000
    packets = []
    for port in range(port_from, port_from + ports):
        packets.append(PacketSummary(ts, 4, SCANNER, LOCAL, 6, 40000, port, 0x02, 60, False, 1))
        packets.append(PacketSummary(ts, 4, LOCAL, SCANNER, 6, port, 40000, 0x14, 40, True, 1))
    return packets


def test_the_tick_reports_access_summaries_from_the_capture(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, capture, admin_ports={22: "ssh"})
    agent.apply_policy(update())
    agent.start_flows()
    (monitor,) = capture.monitors
    assert monitor.access is not None
    with monitor._lock:
        monitor.access.add(scan(20, 5))  # 20..24: ssh among them
    agent.tick()
    batch = last_batch(agent)
    summaries = {s.service: s for s in facts(batch, "access_summary")}
    assert set(summaries) == {"", "ssh"}
    general, ssh = summaries[""], summaries["ssh"]
    assert (general.peer_addr, general.peer_zone, general.inbound) == ("10.250.2.20", "公安专网", True)
    assert (general.attempts, general.resets, general.distinct_ports, list(general.ports)) == (
        4,
        4,
        4,
        [20, 21, 23, 24],
    )
    assert (general.bytes_in, general.bytes_out) == (5 * 60, 5 * 40)
    assert (ssh.service_port, ssh.attempts, ssh.resets, list(ssh.ports)) == (22, 1, 1, [22])
    assert general.window_ms == 0  # the window started at start_flows, on the same (frozen) clock
    assert health(batch)["access"].startswith("on: eth0")
    # The window closed: the next tick has nothing to say about it.
    agent.tick()
    assert facts(last_batch(agent), "access_summary") == []


def test_access_needs_the_capture_even_with_flows_off(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, capture, flows=False)
    assert agent.needs_capture
    agent.apply_policy(update())  # nftables counts zones: the capture runs for access alone
    agent.start_flows()
    (monitor,) = capture.monitors
    assert monitor.access is not None
    with monitor._lock:
        monitor.access.add(scan(1000, 3))
    agent.tick()
    batch = last_batch(agent)
    assert [s.attempts for s in facts(batch, "access_summary")] == [3]
    assert "flow" not in kinds(batch)
    assert health(batch)["flows"] == "off: disabled in the agent's configuration"


def test_access_can_be_disabled(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, capture, flows=False, access=False)
    assert not agent.needs_capture
    agent.start_flows()
    (monitor,) = capture.monitors
    assert monitor.access is None  # no packet is fed to an access table
    agent.tick()
    assert facts(last_batch(agent), "access_summary") == []
    assert health(last_batch(agent))["access"] == "off: disabled in the agent's configuration"


def test_listeners_at_the_first_tick_then_every_interval(tmp_path: Path, capture: Capture) -> None:
    present = ListenerEvent("present", "tcp", "0.0.0.0", 22, 1001, SSHD)
    opened = ListenerEvent("opened", "udp", "::", 4444, 1002, None)
    sensor = FakeListeners([[present], [opened], SensorError("cannot read /proc/net/tcp: EACCES"), []])
    clock = Clock()
    agent = make_agent(tmp_path, capture, sensor, clock, listener_interval_s=30.0)
    agent.start_listeners()
    agent.tick()
    (change,) = facts(last_batch(agent), "listener_change")
    assert change.change == facts_pb2.ListenerChange.PRESENT
    assert (change.ip_protocol, change.local_addr, change.local_port) == (6, "0.0.0.0", 22)
    assert (change.process.pid, change.process.name, change.process.user) == (812, "sshd", "root")
    assert health(last_batch(agent))["listeners"] == "on: every 30 s"
    clock.now += 10  # a tick before the interval is up: no poll
    agent.tick()
    assert sensor.polls == 1 and facts(last_batch(agent), "listener_change") == []
    clock.now += 20
    agent.tick()
    (change,) = facts(last_batch(agent), "listener_change")
    assert change.change == facts_pb2.ListenerChange.OPENED
    assert (change.ip_protocol, change.local_addr, change.local_port, change.process.pid) == (
        17,
        "::",
        4444,
        0,
    )
    clock.now += 30
    agent.tick()
    assert facts(last_batch(agent), "listener_change") == []
    assert health(last_batch(agent))["listeners"] == "off: cannot read /proc/net/tcp: EACCES"


def test_listeners_can_be_disabled(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, capture, listeners=False)
    agent.tick()
    assert health(last_batch(agent))["listeners"] == "off: disabled in the agent's configuration"


def test_the_settings_from_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    defaults = load_config(None, {})
    assert (defaults.access, defaults.listeners, defaults.listener_interval_s) == (True, True, 10.0)
    assert defaults.admin_ports[22] == "ssh" and defaults.admin_ports[5901] == "vnc"
    path = tmp_path / "agent.toml"
    path.write_text('access = false\nadmin_ports = "ssh=22, SSH=2222,rdp=3389"\nlistener_interval = 60\n')
    config = load_config(path, {})
    assert (config.access, config.listener_interval_s) == (False, 60.0)
    assert config.admin_ports == {22: "ssh", 2222: "ssh", 3389: "rdp"}
    path.write_text('admin_ports = "ssh=22,rdp"\n')
    with pytest.raises(ConfigError, match=r"agent.toml: admin_ports: 'rdp' is not NAME=PORT"):
        load_config(path, {})
    path.write_text('admin_ports = "ssh=22,telnet=22"\n')
    with pytest.raises(ConfigError, match="port 22 is named both ssh and telnet"):
        load_config(path, {})
    path.write_text("listener_interval = 0\n")
    with pytest.raises(ConfigError, match="listener_interval must be > 0"):
        load_config(path, {})

"""The agent's own budget: the state machine on a fake clock, the ledger, and a real agent over budget."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Collector, Process, cli_json
from test_runner import Capture, FakeAccountant, FakeEngine, health, last_batch, make_agent, update
from testnet import TestNetwork, require_root_netns

from agent.aggregate.flows import FlowTable
from agent.aggregate.flowwatch import FlowMonitor
from agent.config import load_config
from agent.errors import ConfigError
from agent.runner import Agent
from agent.selfwatch import (
    CAPTURE_OFF_STEP,
    MB,
    Budget,
    CpuLedger,
    Reading,
    SelfWatch,
    clip_status,
    read_process,
    step,
)
from agent.sensors.capture import PacketSummary, SamplingPolicy
from agent.sensors.sockets import attribution_note
from agent.zonemap import ZoneMap


class FakeProcess:
    """Readings a test writes: every ``advance`` spends CPU at a rate, split among sensors."""

    def __init__(self, rss_mb: float = 30.0) -> None:
        self.at = 1000.0
        self.cpu = 0.0
        self.rss = int(rss_mb * MB)
        self.sensors: dict[str, float] = {}

    def read(self) -> Reading:
        return Reading(self.at, self.cpu, self.rss, dict(self.sensors))

    def advance(self, seconds: float, cpu_percent: float, **shares: float) -> None:
        """``shares``: sensor -> fraction of this CPU it spent (the rest is transport)."""
        spent = seconds * cpu_percent / 100
        self.at += seconds
        self.cpu += spent
        for name, share in shares.items():
            self.sensors[name] = self.sensors.get(name, 0.0) + spent * share


def watch(
    process: FakeProcess, *, capture: bool = True, cpu: float = 1.0, rss: float = 40.0, **kw: object
) -> tuple[SelfWatch, list[int]]:
    released: list[int] = []
    budget = Budget(cpu_percent=cpu, rss_mb=rss, window_s=30.0, recover_windows=3)
    w = SelfWatch(
        budget,
        process.read,
        has_capture=lambda: capture,
        release=lambda: released.append(1),
        **kw,  # type: ignore[arg-type]
    )
    return w, released


def run(w: SelfWatch, p: FakeProcess, seconds: float, cpu_percent: float, **shares: float) -> list[int]:
    """Tick every 10 s for ``seconds``; the levels at which the state changed."""
    changes = []
    for _ in range(int(seconds // 10)):
        p.advance(10, cpu_percent, **shares)
        if w.observe():
            changes.append(w.level)
    return changes


def test_within_budget_says_ok_and_changes_nothing() -> None:
    p = FakeProcess()
    w, released = watch(p)
    w.observe()
    assert w.status() == "on: ok, measuring (first 30 s window)"
    assert run(w, p, 120, 0.4, capture=0.5) == []
    assert w.level == 0 and not released
    assert w.status() == "on: ok, cpu 0.40% of 1% (capture 0.20%), rss 30.0 of 40 MB"


def test_over_cpu_degrades_in_the_stated_order_one_window_at_a_time() -> None:
    p = FakeProcess()
    w, _ = watch(p)
    w.observe()
    # Too busy whatever it gives up: every step is taken, one per 30 s window, then it stays.
    changes = run(w, p, 400, 1.6, capture=0.75)
    assert changes == list(range(1, CAPTURE_OFF_STEP + 1))
    assert [
        (s.sampling, s.interval_factor, s.capture_off) for s in map(lambda n: step(n, True), changes)
    ] == [
        (2, 1, False),
        (4, 1, False),
        (8, 1, False),
        (16, 1, False),
        (32, 1, False),
        (64, 1, False),
        (64, 2, False),
        (64, 4, False),
        (64, 4, True),
    ]
    assert w.status() == "over: cpu 1.60% > 1% (capture 1.20%); step 9: capture off, intervals x4"


def test_the_status_names_the_sensor_that_spent_most() -> None:
    p = FakeProcess()
    w, _ = watch(p)
    w.observe()
    run(w, p, 30, 2.0, capture=0.2, inventory=0.6)
    assert w.level == 1
    assert w.status() == "over: cpu 2.00% > 1% (inventory 1.20%); step 1: capture sampled 1/2"
    # What no sensor accounts for is transport (the gRPC threads, the event loop).
    run(w, p, 30, 2.0, capture=0.1)
    assert "(transport 1.80%)" in w.status()


def test_without_a_capture_the_first_step_is_longer_intervals() -> None:
    p = FakeProcess()
    w, _ = watch(p, capture=False)
    w.observe()
    assert run(w, p, 200, 5.0) == [7, 8]  # no capture to sample or turn off
    assert w.step.interval_factor == 4 and w.step.sampling == 1 and not w.step.capture_off
    assert w.status().endswith("step 8: intervals x4")


def test_recovery_is_one_step_at_a_time_after_whole_windows_well_within_budget() -> None:
    p = FakeProcess()
    w, _ = watch(p)
    w.observe()
    run(w, p, 60, 3.0, capture=0.9)
    assert w.level == 2
    # Under the budget but above 70 % of it: no way back (no flapping around the line).
    assert run(w, p, 300, 0.8, capture=0.5) == []
    assert w.status().startswith(
        "degraded: cpu 0.80% of 1% (capture 0.40%), rss 30.0 of 40 MB; step 2: capture sampled 1/4"
    )
    # Well within it: one step back after 3 whole windows (counted from the first calm window's
    # start), then the next after 3 more windows of the new state.
    steps = [(t, w.level) for t in range(10, 400, 10) if run(w, p, 10, 0.3)]
    assert [level for _, level in steps] == [1, 0]
    (first, _), (second, _) = steps
    assert 60 <= first <= 120 and 90 <= second - first <= 120
    assert w.status().startswith("on: ok")


def test_a_step_back_that_does_not_hold_doubles_the_wait_for_the_next() -> None:
    p = FakeProcess()
    w, _ = watch(p)
    w.observe()
    run(w, p, 30, 3.0, capture=0.9)
    assert w.level == 1

    def flap() -> int:
        """Calm until the step back, then over at once; how long the calm lasted."""
        calm = 0
        while not run(w, p, 10, 0.3):
            calm += 10
        assert w.level == 0
        assert run(w, p, 30, 3.0, capture=0.9) == [1]
        return calm + 10

    first, second, third = flap(), flap(), flap()
    assert (first, second, third) == (90, 180, 360)
    # Calm now for good: the next step back waits 720 s, and says so.
    run(w, p, 40, 0.3)
    assert w.status().endswith("one step back after 720 s well within budget")


def test_over_rss_gives_memory_back_then_shrinks_tables_then_stops_capture_only_if_that_helps() -> None:
    p = FakeProcess(rss_mb=41)
    held = {"bytes": 3 * MB}
    w, released = watch(p, capture_memory=lambda: held["bytes"], table_memory=lambda: 2 * MB)
    w.observe()
    assert run(w, p, 30, 0.2) == [0] and released == [1] and not w.tables_shrunk
    assert run(w, p, 30, 0.2) == [0] and w.tables_shrunk
    # CPU is fine: sampling and longer intervals would free nothing; the capture's 3 MB would.
    assert run(w, p, 30, 0.2) == [CAPTURE_OFF_STEP]
    assert w.status() == "over: rss 41.0 MB > 40 MB; step 9: capture off, intervals x4; capture tables shrunk"
    # Without the capture RSS is 38 MB: under the budget, but 38 + 3 is not under 90 % of it: it stays off.
    p.rss = 38 * MB
    assert run(w, p, 200, 0.2) == []
    p.rss = 30 * MB
    # Straight back to where it was (full rate), not through CPU steps memory never asked for.
    assert run(w, p, 100, 0.2) == [0]
    assert not w.step.capture_off and w.step.sampling == 1 and w.step.interval_factor == 1


def test_over_rss_that_the_capture_cannot_explain_is_reported_not_chased() -> None:
    p = FakeProcess(rss_mb=46)
    w, released = watch(p, capture_memory=lambda: 2 * MB, table_memory=lambda: 100 * 500)
    w.observe()
    # Given back; then nothing more: the near-empty tables of an idle host are not worth shrinking.
    assert run(w, p, 150, 0.2) == [0]
    assert w.level == 0 and released == [1] and not w.tables_shrunk
    assert (
        w.status() == "over: rss 46.0 MB > 40 MB; nothing left that would bring it under; memory given back"
    )


def test_a_budget_of_zero_watches_nothing() -> None:
    p = FakeProcess(rss_mb=500)
    w, released = watch(p, cpu=0, rss=0)
    assert run(w, p, 200, 90) == [] and not released
    assert w.status().startswith("off:")
    # CPU alone: the RSS figure is left out of the status.
    w, _ = watch(p, rss=0)
    w.observe()
    run(w, p, 30, 0.1)
    assert w.status() == "on: ok, cpu 0.10% of 1% (transport 0.10%)"


def test_statuses_fit_what_the_collector_takes() -> None:
    assert len(clip_status("x" * 2000)) <= 512
    assert clip_status("短") == "短"


def test_the_ledger_times_sections_and_threads() -> None:
    clocks = {"thread": 0.0, "children": 0.0}
    threads: dict[int, float | None] = {42: 0.5}
    ledger = CpuLedger(lambda: clocks["thread"], lambda: clocks["children"], threads.get)
    with ledger.measure("inventory"):
        clocks["thread"] += 0.01
        clocks["children"] += 0.02  # the `ip` it ran
    ledger.track_thread("capture", 42)
    assert ledger.totals() == pytest.approx({"inventory": 0.03, "capture": 0.5})
    threads[42] = None  # the thread ended: what it spent stays counted
    assert ledger.totals()["capture"] == 0.5
    # A real reading of this process: CPU with children, RSS, and the ledger's attribution.
    reading = read_process(CpuLedger())
    assert reading.cpu_s > 0 and reading.rss_bytes > 10 * MB


def test_the_capture_never_samples_below_the_floor_the_budget_sets() -> None:
    policy = SamplingPolicy(window_ns=10)
    policy.update(0, 0, 0)
    assert policy.update(10, 0, 0) == 1
    policy.min_rate = 8
    assert policy.update(20, 0, 0) == 8
    policy.min_rate = 1000
    assert policy.update(30, 0, 0) == policy.max_rate


def test_shrinking_a_flow_table_closes_its_oldest_flows_and_reports_them() -> None:
    from agent.sensors.capture import PacketSummary

    table = FlowTable(ZoneMap(), "lo")
    table.add(PacketSummary(i, 4, 1, 2, 17, 1000 + i, 53, 0, 100, True, 1) for i in range(10))
    table.set_max_flows(4)
    assert table.stats().active == 4 and table.stats().evicted == 6
    assert len(table.expire(0)) == 6


def test_budget_settings_from_flags_and_file(tmp_path: Path) -> None:
    config = load_config(None, {"cpu_budget_percent": 2.5, "rss_budget_mb": 0.0})
    assert (config.cpu_budget_percent, config.rss_budget_mb, config.budget_window_s) == (2.5, 0.0, 30.0)
    path = tmp_path / "agent.toml"
    path.write_text("cpu_budget = 0.5\nrss_budget_mb = 60\nbudget_window = 60\n", encoding="utf-8")
    config = load_config(path, {})
    assert (config.cpu_budget_percent, config.rss_budget_mb, config.budget_window_s) == (0.5, 60.0, 60.0)
    with pytest.raises(ConfigError, match="cpu_budget and rss_budget_mb must be >= 0"):
        load_config(None, {"cpu_budget_percent": -1.0})


def test_the_agent_applies_each_step_and_each_sensor_says_what_it_gave_up(tmp_path: Path) -> None:
    capture = Capture()  # fake engines: no packet socket on this machine's interfaces
    try:
        check_steps_applied(tmp_path, capture)
    finally:
        for monitor in capture.monitors:
            monitor.close()


def check_steps_applied(tmp_path: Path, capture: Capture) -> None:
    agent = make_agent(tmp_path, FakeAccountant(), capture)
    agent.start_flows()
    p = FakeProcess()
    agent.selfwatch = SelfWatch(Budget(1.0, 0.0), p.read, has_capture=lambda: agent.flows is not None)

    def tick(cpu_percent: float) -> dict[str, str]:
        p.advance(10, cpu_percent, capture=0.8)
        agent.tick()
        return health(last_batch(agent))

    assert tick(0.2)["budget"] == "on: ok, measuring (first 30 s window)"
    sensors = [tick(5.0) for _ in range(6)]
    assert agent.selfwatch.level == 2
    assert sensors[-1]["capture"] == (
        "on: sampled 1 in 4 by the agent's CPU budget: figures are scaled estimates"
    )
    assert sensors[-1]["flows"].endswith(
        "; sampled 1 in 4 by the agent's CPU budget: figures are scaled estimates"
    )
    while agent.selfwatch.level < CAPTURE_OFF_STEP:
        sensors.append(tick(5.0))
    last = sensors[-1]
    assert last["budget"] == "over: cpu 5.00% > 1% (capture 4.00%); step 9: capture off, intervals x4"
    assert last["capture"] == "off: stopped by the agent's budget (its last step)"
    assert last["flows"] == last["access"] == "off: capture stopped by the agent's budget (its last step)"
    assert last["interfaces"] == "on: every 40 s (x4 by the agent's CPU budget)"
    assert agent.flows is None and capture.engines["eth0"].closed
    # Still over with nothing left: the agent keeps running as it is and keeps saying so.
    assert tick(5.0)["budget"].startswith("over: cpu 5.00%")
    # Well within budget again: the capture comes back first (one step), sampled 1 in 64.
    while agent.selfwatch.level == CAPTURE_OFF_STEP:
        back = tick(0.1)
    assert agent.flows is not None and len(capture.monitors) == 2
    assert back["capture"].startswith("on: sampled 1 in 64")
    assert back["budget"] == (
        "degraded: cpu 0.10% of 1% (capture 0.08%); step 8: capture sampled 1/64, intervals x4;"
        " one step back after 90 s well within budget"
    )


def budget_agent(tmp_path: Path, capture: Capture) -> tuple[Agent, FakeProcess]:
    """An agent with its own budget logic (the runner's has_capture) reading a fake process; nftables
    unavailable, so zone accounting would count from the capture."""
    agent = make_agent(tmp_path, FakeAccountant(available=(False, "nft: not installed")), capture)
    agent.start_flows()
    p = FakeProcess()
    agent.selfwatch = SelfWatch(Budget(1.0, 0.0), p.read, has_capture=agent.selfwatch._has_capture)
    return agent, p


def test_a_zone_catalog_while_the_budget_stopped_the_capture_does_not_restart_it(tmp_path: Path) -> None:
    capture = Capture()
    try:
        agent, p = budget_agent(tmp_path, capture)
        while agent.selfwatch.level < CAPTURE_OFF_STEP:
            p.advance(10, 5.0, capture=0.8)
            agent.tick()
        assert agent.flows is None
        # nftables cannot count: the capture would be the way, but the budget has it off.
        agent.apply_policy(update())
        assert agent.flows is None and len(capture.monitors) == 1
        p.advance(10, 5.0, capture=0.8)
        agent.tick()
        assert health(last_batch(agent))["zone_accounting"] == "off: capture stopped by the agent's budget"
        while agent.selfwatch.level == CAPTURE_OFF_STEP:
            p.advance(10, 0.1, capture=0.8)
            agent.tick()
        # One capture again (not two, the first left running), and zone accounting counts with it.
        assert len(capture.monitors) == 2 and agent.flows is capture.monitors[1]
        assert health(last_batch(agent))["zone_accounting"].startswith("fallback: capture on eth0")
    finally:
        for monitor in capture.monitors:
            monitor.close()


def test_a_capture_without_engines_is_not_sampled_by_the_budget(tmp_path: Path) -> None:
    capture = Capture()
    capture.present = set()  # no interface can be captured (as without CAP_NET_RAW)
    try:
        agent, p = budget_agent(tmp_path, capture)
        assert agent.flows is not None and not agent.flows.engines
        levels = []
        for _ in range(7):
            p.advance(10, 5.0, capture=0.8)
            agent.tick()
            levels.append(agent.selfwatch.level)
        # The first step is longer intervals: no windows spent on sampling nothing.
        assert levels[-1] >= 7 and agent.selfwatch.step.sampling == 1
        assert "capture" not in health(last_batch(agent))
    finally:
        for monitor in capture.monitors:
            monitor.close()


def test_without_cap_sys_ptrace_the_flows_say_other_users_programs_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython3\nCapEff:\t0000000000003000\n")  # CAP_NET_ADMIN, CAP_NET_RAW: the unit's
    note = "programs of other users' sockets unknown (no CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH)"
    assert attribution_note(str(status)) == note
    status.write_text("CapEff:\t0000000000080004\n")  # both granted (AmbientCapabilities=)
    assert attribution_note(str(status)) == ""
    monkeypatch.setattr("agent.runner.attribution_note", lambda: note)
    capture = Capture()
    try:
        agent = make_agent(tmp_path, FakeAccountant(), capture)
        agent.start_flows()
        agent.tick()
        assert health(last_batch(agent))["flows"] == f"on: eth0: 0 packets, 0 dropped; {note}"
    finally:
        for monitor in capture.monitors:
            monitor.close()


class StuckEngine(FakeEngine):
    """A ring read that outlasts close()'s wait; unmapping it under the reader raises, as mmap does."""

    def __init__(self, interface: str) -> None:
        super().__init__(interface)
        self.reading, self.release = threading.Event(), threading.Event()
        os.write(self._write_end, b"x")  # readable: the capture thread reads at once

    def read(self, timeout_ms: int) -> list[PacketSummary]:
        self.reading.set()
        self.release.wait(10)
        return []

    def close(self) -> None:
        if self.reading.is_set() and not self.release.is_set():
            raise BufferError("cannot close exported pointers exist")
        super().close()


def test_closing_a_capture_whose_thread_still_reads_leaves_the_engines_to_the_thread() -> None:
    engines: list[StuckEngine] = []

    def open_engine(name: str) -> StuckEngine:
        engines.append(StuckEngine(name))
        return engines[-1]

    monitor = FlowMonitor(["eth0"], ZoneMap(), open_engine=open_engine, check=lambda n: (True, ""))  # type: ignore[arg-type]
    (engine,) = engines
    assert engine.reading.wait(5)
    assert monitor.close() == []  # no BufferError into the agent's tick
    assert not engine.closed
    engine.release.set()
    monitor._thread.join(5)
    assert engine.closed  # by the thread, on its way out


# --- a real agent against a real collector ------------------------------------------------------


def agent_process(target: str, state_dir: Path, *extra: str) -> Process:
    """As deployed (python -m agent, the entry point that keeps OpenSSL's bindings out)."""
    return Process(
        [sys.executable, "-m", "agent", "run", "--insecure", "--collector", target, "--state-dir",
         str(state_dir), "--interval", "1", "--interface", "lo", "--hostname", "web-01", *extra]
    )  # fmt: skip


def stored_sensors(db: Path) -> dict[str, str]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return {}  # not created yet
    try:
        row = con.execute("SELECT sensors FROM agents").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        con.close()
    return json.loads(row[0]) if row else {}


def wait_for_sensors(db: Path, predicate, timeout: float = 30.0) -> dict[str, str]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    sensors: dict[str, str] = {}
    while time.monotonic() < deadline:
        sensors = stored_sensors(db)
        if predicate(sensors):
            return sensors
        time.sleep(0.3)
    raise AssertionError(f"budget state not reached; last stored sensors: {sensors}")


def test_a_real_agent_over_a_tiny_budget_degrades_and_says_which_sensor(
    collector: Collector, tmp_path: Path
) -> None:
    agent = agent_process(
        collector.target,
        tmp_path / "agent",
        "--cpu-budget",
        "0.001",
        "--rss-budget",
        "0",
        "--budget-window",
        "2",
    )
    try:
        sensors = wait_for_sensors(
            collector.db,
            lambda s: s.get("budget", "").startswith("over:") and "capture sampled 1/4" in s["budget"],
        )
    finally:
        assert agent.stop() == 0, agent.log()
    budget = sensors["budget"]
    assert budget.startswith("over: cpu ") and "> 0.001%" in budget
    culprit = budget.split("(", 1)[1].split(" ", 1)[0]
    assert culprit in {"capture", "interfaces", "zone_accounting", "inventory", "listeners", "transport"}
    assert sensors["capture"].startswith("on: sampled 1 in ")
    assert "sampled 1 in" in sensors["flows"] and "scaled estimates" in sensors["flows"]
    assert "over the agent's budget: cpu" in agent.log()  # each step logged, with its figures
    # The operator sees it in the agents view (every sensor not plainly "on").
    (row,) = cli_json("zonewatch-collector", "agents", "--db", str(collector.db))
    assert "budget: over: cpu" in str(row["sensors"])


@pytest.mark.netns
def test_a_real_agent_on_an_idle_host_reports_ok(tmp_path: Path) -> None:
    # An idle host: a test host of its own (the shared loopback of a test machine is anything but
    # idle), with the collector on its loopback and the agent capturing on its quiet eth0. The
    # default CPU budget (1 %), judged over a short window to keep the test quick; RSS has a budget
    # of its own here (see README: steady RSS is over the 40 MB default on this build).
    require_root_netns(iperf3=False)
    db = tmp_path / "collector.db"
    with TestNetwork() as net, (tmp_path / "agent.log").open("w") as log_file:
        host = net.add_host("idle", "extranet")
        host.popen(
            sys.executable, "-m", "collector.cli", "serve", "--db", db, "--listen", "127.0.0.1:7390",
            "--insecure", "--sample-interval", "2", "--interface", "eth0",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        agent = host.popen(
            sys.executable, "-m", "agent", "run", "--insecure", "--collector", "127.0.0.1:7390",
            "--state-dir", tmp_path / "agent", "--interval", "2", "--interface", "eth0", "--rss-budget", "80",
            "--budget-window", "6", stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        try:
            sensors = wait_for_sensors(db, lambda s: s.get("budget", "").startswith(("on: ok, cpu", "over")))
        finally:
            host.stop(agent)
    log = (tmp_path / "agent.log").read_text(encoding="utf-8")
    assert sensors["budget"].startswith("on: ok, cpu"), (sensors, log[-3000:])
    assert "of 1%" in sensors["budget"] and "of 80 MB" in sensors["budget"], sensors["budget"]
    assert "capture" not in sensors and "over the agent's budget" not in log

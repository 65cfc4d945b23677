"""The agent's main loop: sample on a drift-free schedule, spool, deliver, follow policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent import __version__
from agent.aggregate.access import AccessTable
from agent.aggregate.flows import NS_PER_MS
from agent.aggregate.flowwatch import FlowMonitor
from agent.config import DEFAULT_COLLECTOR, AgentConfig
from agent.credentials import Credentials
from agent.errors import AgentError, SensorError, TransportError
from agent.health import Health, SelfMonitor
from agent.identity import load_or_create_agent_id
from agent.policy import PolicyUpdate
from agent.renewal import Renewal
from agent.selfwatch import (
    Budget,
    CpuLedger,
    SelfWatch,
    clip_status,
    read_process,
    release_memory,
    report_degradation,
)
from agent.sensors.accounting import NftAccountant, ZoneDelta, ZoneTrafficSampler
from agent.sensors.interfaces import InterfaceSample, InterfaceSampler
from agent.sensors.inventory import InventorySensor
from agent.sensors.listeners import ListenerSensor
from agent.sensors.sockets import attribution_note
from agent.spool import Spool
from agent.transport import Transport
from agent.wire import (
    access_fact,
    batch_request,
    flow_fact,
    health_fact,
    hello_request,
    inventory_fact,
    listener_fact,
    zone_traffic_fact,
)
from agent.zonemap import ZoneMap

log = logging.getLogger(__name__)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Agent:
    """One agent. With ``credentials`` (enrolled) it reports over mTLS as the agent its certificate
    names, with the enrolled labels, and keeps the certificate renewed; without, it runs insecure:
    plaintext, a random id kept in the state directory, the configured labels."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        credentials: Credentials | None = None,
        sampler: InterfaceSampler | None = None,
        accountant: NftAccountant | None = None,
        flow_monitor: Callable[..., FlowMonitor] = FlowMonitor,
        inventory: Callable[[], InventorySensor] = InventorySensor,
        listeners: Callable[[], ListenerSensor] = ListenerSensor,
        clock_ms: Callable[[], int] = wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        if credentials is None:
            self.agent_id = load_or_create_agent_id(config.state_dir)
            self.labels = config.labels
        else:
            self.agent_id = credentials.agent_id
            # The collector takes labels from the enrollment, whatever the hello says: send those.
            self.labels = {name: credentials.labels.get(name, "") for name in config.labels}
        self.spool = Spool(config.spool_path, max_bytes=config.spool_max_bytes, clock_ms=clock_ms)
        self._sampler = sampler or InterfaceSampler(include=config.interfaces)
        self._clock_ms = clock_ms
        self.interval_s = config.interval_s
        self._policy_refresh_s = 60.0
        self._monitor = SelfMonitor()
        # The agent's own budget: sensors' CPU is timed into the ledger; the watch judges it each tick.
        self.ledger = CpuLedger()
        budget = Budget(config.cpu_budget_percent, config.rss_budget_mb, config.budget_window_s)
        self.selfwatch = SelfWatch(
            budget,
            lambda: read_process(self.ledger, monotonic),
            # A capture with no engines (no CAP_NET_RAW) has nothing to sample: budget steps skip it.
            has_capture=lambda: self.flows is not None and bool(self.flows.engines),
            capture_memory=lambda: self.flows.memory_bytes() if self.flows is not None else 0,
            table_memory=lambda: self.flows.table_bytes() if self.flows is not None else 0,
        )
        self._capture_stopped = False  # by the budget, as its last step
        self._settled = False  # start-up's garbage given back to the kernel (after the first tick)
        # What each sensor is doing, reported with every batch: nothing is off silently.
        self.sensors: dict[str, str] = {"interfaces": "on"}
        self._zones_version = ""
        self._zones_update: PolicyUpdate | None = None
        self._zone_sampler: ZoneTrafficSampler | None = None
        self._zone_method = ""  # "nftables" or "capture" once counting
        self.accountant: NftAccountant | None = None
        if config.zone_accounting in ("auto", "nftables"):
            self.accountant = accountant or NftAccountant()
        if config.zone_accounting == "off":
            self.sensors["zone_accounting"] = "off: disabled in the agent's configuration"
        else:
            self.sensors["zone_accounting"] = "waiting for a zone catalog from the collector"
        self.flows: FlowMonitor | None = None
        self._flow_monitor = flow_monitor
        self._zone_map = ZoneMap()
        self.sensors["flows"] = "starting" if config.flows else "off: disabled in the agent's configuration"
        self.inventory: InventorySensor | None = None
        self._inventory_sensor = inventory
        self.sensors["inventory"] = (
            "starting" if config.inventory else "off: disabled in the agent's configuration"
        )
        self.sensors["access"] = "starting" if config.access else "off: disabled in the agent's configuration"
        self.listeners: ListenerSensor | None = None
        self._listener_sensor = listeners
        self._monotonic = monotonic
        self._listeners_polled_at: float | None = None
        self.sensors["listeners"] = (
            "starting" if config.listeners else "off: disabled in the agent's configuration"
        )
        # Without CAP_SYS_PTRACE (the unit grants only NET_RAW, NET_ADMIN) other users' sockets stay
        # unattributed: said in the flows' and listeners' status rather than left silently blank.
        self._attribution_note = attribution_note() if config.flows or config.listeners else ""
        self.transport = Transport(
            config.collector or DEFAULT_COLLECTOR,
            self.spool,
            self._hello,
            window=config.window,
            ack_timeout_s=config.ack_timeout_s,
            tls=credentials.tls if credentials is not None else None,
        )
        self.renewal: Renewal | None = None
        if credentials is not None:
            self.renewal = Renewal(
                config.state_dir,
                credentials,
                self.transport,
                hostname=config.hostname,
                clock_ms=clock_ms,
                rand=rand,
            )
            self.sensors["certificate"] = self.renewal.status()

    @property
    def policy_version(self) -> str:
        """The policy this agent runs: kept by the transport, which compares it with every ack."""
        return self.transport.policy_version

    @property
    def needs_capture(self) -> bool:
        """Whether the capture runs from the start: flows and access summaries come only from it (zone
        accounting in "auto" starts it later, and only when nftables cannot count)."""
        c = self.config
        return c.flows or c.access or c.zone_accounting == "capture"

    def _hello(self) -> bytes:
        c = self.config
        request = hello_request(
            self.agent_id, c.hostname, __version__, self.labels, self.policy_version, self._clock_ms()
        )
        return request.SerializeToString()

    def tick(self) -> int:
        """Sample every sensor once and spool what they saw as one batch; return its seq."""
        with self.ledger.measure("interfaces"):
            samples = self._sampler.sample()
        time_ms = self._clock_ms()
        with self.ledger.measure("zone_accounting"):
            extra = [zone_traffic_fact(delta, time_ms, self._zone_method) for delta in self._zone_deltas()]
        if self.flows is not None:
            with self.ledger.measure("capture"):
                extra += self._capture_facts(time_ms)
        with self.ledger.measure("inventory"):
            extra += self._inventory_facts(time_ms)
        with self.ledger.measure("listeners"):
            extra += self._listener_facts(time_ms)
        self._check_budget()
        extra.append(health_fact(self._health(), time_ms))
        return self.spool_batch(samples, extra, time_ms)

    def _capture_facts(self, time_ms: int) -> list[Any]:
        assert self.flows is not None
        self.flows.watch(self._capture_interfaces())
        # Expired flows leave the tables either way; they are reported only when flows are on.
        closed = self.flows.collect(attribute=self.config.flows)
        extra: list[Any] = []
        if self.config.flows:
            extra += [flow_fact(flow, time_ms) for flow in closed]
            self.sensors["flows"] = self._attributed(self.flows.status())
        if self.config.access:
            extra += [access_fact(r, time_ms) for r in self.flows.collect_access(time_ms * NS_PER_MS)]
            self.sensors["access"] = self._access_status()
        return extra

    def _check_budget(self) -> None:
        """Judge this interval against the budget, change what runs if it says so, and say what runs."""
        if self.flows is not None:
            self.ledger.track_thread("capture", self.flows.thread_id)
        if not self._settled:
            # Imports, the first full inventory and the first batch leave freed heap behind: give it
            # back once, so steady RSS is what running costs.
            self._settled = True
            release_memory()
        if self.selfwatch.observe():
            self._apply_budget()
        step = self.selfwatch.step
        if self.flows is not None:  # every tick: a capture may have started since (zone accounting)
            self.flows.set_min_sampling(step.sampling)
            self.flows.limit_tables(4 if self.selfwatch.tables_shrunk else 1)
        self.sensors["budget"] = self.selfwatch.status()
        capturing = self.flows is not None and bool(self.flows.engines)
        report_degradation(self.sensors, step, self.interval_s, capturing, self._capture_stopped)

    def _apply_budget(self) -> None:
        step = self.selfwatch.step
        if step.capture_off and self.flows is not None:
            self._stop_capture()
        elif not step.capture_off and self._capture_stopped:
            self._capture_stopped = False
            if self.flows is None:  # a second start would leak the running capture's thread and ring
                self.start_flows()
            update = self._zones_update
            if update is not None and not self._zone_method and self.config.zone_accounting != "off":
                self._apply_zones(update)  # zone accounting by capture resumes

    def _stop_capture(self) -> None:
        """The budget's last step: flows still open and the access window are reported, then no capture."""
        assert self.flows is not None
        remaining, now = self.flows.close(), self._clock_ms()
        last = [flow_fact(f, now) for f in remaining] if self.config.flows else []
        if self.config.access:
            last += [access_fact(r, now) for r in self.flows.collect_access(now * NS_PER_MS)]
        self.flows, self._capture_stopped = None, True
        why = "off: capture stopped by the agent's budget (its last step)"
        for name in ("flows", "access"):
            if self.sensors.get(name, "").startswith("on"):
                self.sensors[name] = why
        if self._zone_method == "capture":
            self._zone_sampler, self._zone_method = None, ""
            self.sensors["zone_accounting"] = why
        if last:
            try:
                self.spool_batch([], last, now)
            except AgentError as exc:
                log.error("could not spool the flows open when the capture stopped: %s", exc)

    def _attributed(self, status: str) -> str:
        note = self._attribution_note
        return clip_status(f"{status}; {note}") if note and status.startswith("on") else status

    def _inventory_facts(self, time_ms: int) -> list[Any]:
        if self.inventory is None:
            return []
        try:
            report = self.inventory.report()
        except SensorError as exc:
            # Nothing is sent (a partial inventory would read as addresses gone); tried again next tick.
            self.sensors["inventory"] = f"off: {exc}"
            return []
        self.sensors["inventory"] = self.inventory.status()
        return [inventory_fact(report, time_ms)] if report is not None else []

    def _access_status(self) -> str:
        assert self.flows is not None
        status = self.flows.status()
        stats = self.flows.access_stats()
        if stats is not None and stats.untracked:
            # Flood beyond the pending bound: those handshakes were counted half-open unseen.
            status += f"; {stats.untracked} handshakes not tracked (pending table full), counted half-open"
        return status

    def _listener_facts(self, time_ms: int) -> list[Any]:
        """Listening sockets at the first tick, then what opened and closed, every listener_interval_s."""
        if self.listeners is None:
            return []
        now = self._monotonic()
        # Half a tick of tolerance: ticks fire with jitter, and a poll due at 10 s must not wait for 20.
        due = self._listeners_polled_at is None or (
            now - self._listeners_polled_at >= self.config.listener_interval_s - self.config.interval_s / 2
        )
        if not due:
            return []
        self._listeners_polled_at = now
        try:
            events = self.listeners.poll()
        except SensorError as exc:
            # Nothing is sent (a failed read would read as every listener closed); tried again when due.
            self.sensors["listeners"] = f"off: {exc}"
            return []
        self.sensors["listeners"] = self._attributed(f"on: every {self.config.listener_interval_s:g} s")
        return [listener_fact(event, time_ms) for event in events]

    def _zone_deltas(self) -> list[ZoneDelta]:
        if self._zone_sampler is None:
            return []
        try:
            deltas = self._zone_sampler.sample()
        except SensorError as exc:
            self.sensors["zone_accounting"] = f"off: {exc}"
            return []
        if self._zone_method == "capture" and self.flows is not None:
            rate = self.flows.sampling()
            status = self.sensors["zone_accounting"].split("; sampling")[0]
            self.sensors["zone_accounting"] = status + (
                f"; sampling 1 in {rate} under overload: counts are estimates" if rate > 1 else ""
            )
        return deltas

    def _health(self) -> Health:
        if self.renewal is not None:
            self.sensors["certificate"] = self.renewal.status()
        cpu, rss = self._monitor.cpu_and_rss()
        spool = self.spool.stats()
        packets, drops = self.flows.capture_totals() if self.flows is not None else (0, 0)
        return Health(
            cpu, rss, spool.bytes, spool.batches, self.policy_version, dict(self.sensors), packets, drops
        )

    def spool_batch(self, samples: list[InterfaceSample], extra: list[Any], time_ms: int) -> int:
        """Put one batch (and any unreported spool loss) into the spool; return its seq."""
        dropped = self.spool.take_drop_report()

        def build(seq: int) -> tuple[bytes, int, int, int]:
            request = batch_request(seq, time_ms, time_ms, samples, dropped, extra)
            return request.SerializeToString(), len(request.batch.facts), time_ms, time_ms

        seq = self.spool.append(build)
        if dropped is not None:
            self.spool.clear_drop_report(dropped)
        self.transport.notify()
        return seq

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "agent %s reporting to %s (%s) every %.1f s",
            self.agent_id,
            self.config.collector or DEFAULT_COLLECTOR,
            "mTLS" if self.transport.secure else "insecure: plaintext, identity not verified",
            self.interval_s,
        )
        if self.needs_capture:
            self.start_flows()
        if self.config.inventory:
            self.start_inventory()
        if self.config.listeners:
            self.start_listeners()
        tasks = [
            asyncio.create_task(self._sample_loop(stop), name="sample"),
            asyncio.create_task(self.transport.run(stop), name="transport"),
            asyncio.create_task(self._policy_loop(stop), name="policy"),
        ]
        if self.renewal is not None:
            tasks.append(asyncio.create_task(self._renewal_loop(self.renewal), name="renewal"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.flows is not None:
                # Flows still open and the access window are reported now, not lost: one last batch
                # for the next run to send.
                remaining = self.flows.close()
                now = self._clock_ms()
                last = [flow_fact(f, now) for f in remaining]
                if self.config.access:
                    last += [access_fact(r, now) for r in self.flows.collect_access(now * NS_PER_MS)]
                if last:
                    try:
                        self.spool_batch([], last, now)
                    except AgentError as exc:
                        log.error("could not spool the last flows and access summaries: %s", exc)
            await self.transport.close()
            self.spool.close()
            if self.inventory is not None:
                self.inventory.close()
            if self.accountant is not None and self._zone_method == "nftables":
                try:
                    self.accountant.remove()  # leave the host's ruleset as we found it
                except SensorError as exc:
                    log.error("could not remove the zone accounting table: %s", exc)

    async def _sample_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._sampler.sample()  # prime the counters
        self._zone_deltas()
        next_at = loop.time() + self.interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if stop.is_set():
                return
            # Schedule from the plan, not from now: no drift, and a late tick does not shift the next.
            # Over the CPU budget, per-interval sensors run every 2x or 4x the interval (agent.selfwatch).
            interval = self.interval_s * self.selfwatch.step.interval_factor
            next_at += interval
            if next_at < loop.time():
                next_at = loop.time() + interval
            try:
                self.tick()
            except AgentError as exc:
                log.error("cannot spool this interval's facts: %s", exc)

    async def _policy_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                update = await self.transport.get_policy(self.policy_version, self.agent_id)
                if update is not None:
                    self.apply_policy(update)
                    continue  # ask again at once: that confirms to the collector what we now run
            except TransportError as exc:
                log.debug("policy not refreshed: %s", exc)
            # Poll slowly, but wake at once when an ack says the collector's policy changed.
            self.transport.policy_changed.clear()
            with contextlib.suppress(TimeoutError):
                # (stop needs no watching here: run() cancels this task when it is set)
                await asyncio.wait_for(self.transport.policy_changed.wait(), self._policy_refresh_s)

    async def _renewal_loop(self, renewal: Renewal) -> None:
        # (run() cancels this task when stop is set)
        while True:
            try:
                await renewal.check()
            except Exception:
                # check() reports its own failures; anything else must not end renewal for good.
                log.exception("certificate check failed; trying again at the next check")
            self.sensors["certificate"] = renewal.status()
            await asyncio.sleep(renewal.next_check_s())

    def apply_policy(self, update: PolicyUpdate) -> None:
        """Take a new policy without restart; the next hello reports its version."""
        if update.sample_interval_s > 0:
            self.interval_s = float(update.sample_interval_s)
        if update.policy_refresh_s > 0:
            self._policy_refresh_s = float(update.policy_refresh_s)
        self._sampler.set_interfaces(update.interfaces)
        if update.zones_version != self._zones_version:
            self._apply_zones(update)
        self.transport.policy_version = update.version
        log.info("policy %s applied: interval %.0f s", update.version, self.interval_s)

    def _capture_interfaces(self) -> list[str]:
        """The configured interfaces, or every interface that is up but loopback (read each tick:
        an interface that comes up later is captured from the next tick on)."""
        if self.config.interfaces:
            return list(self.config.interfaces)
        return sorted(name for name, st in psutil.net_if_stats().items() if st.isup and name != "lo")

    def start_inventory(self) -> None:
        """Report the host's addresses, routes, resolvers and OS: in full at the next tick, then as diffs."""
        self.inventory = self._inventory_sensor()

    def start_listeners(self) -> None:
        """Report the listening sockets: all of them at the next tick, then what opens and closes."""
        self.listeners = self._listener_sensor()

    def start_flows(self) -> None:
        """Capture on the watched interfaces, for flows, access summaries and (as a fallback) zone
        accounting."""
        access = None
        if self.config.access:
            access = AccessTable(
                self._zone_map, self.config.admin_ports, start_ns=self._clock_ms() * NS_PER_MS
            )
        self.flows = self._flow_monitor(
            self._capture_interfaces(),
            self._zone_map,
            idle_timeout_s=self.config.flow_idle_timeout_s,
            active_timeout_s=self.config.flow_active_timeout_s,
            access=access,
        )
        if self.config.flows:
            self.sensors["flows"] = self._attributed(self.flows.status())
            if not self.flows.engines:
                log.warning("flows %s", self.sensors["flows"])
        if self.config.access:
            self.sensors["access"] = self._access_status()

    def _apply_zones(self, update: PolicyUpdate) -> None:
        self._zones_version = update.zones_version
        self._zones_update = update
        self._zone_map = ZoneMap(update.zones)
        if self.flows is not None:
            self.flows.set_zones(self._zone_map)
        mode = self.config.zone_accounting
        if mode == "off":
            return
        if not update.zones:
            self.sensors["zone_accounting"] = "waiting for a zone catalog from the collector"
            return
        why_not_nft = ""
        if self.accountant is not None and self._zone_method != "capture":
            why_not_nft = self._apply_nftables(update)
            if not why_not_nft:
                return
        if mode == "nftables":
            self.sensors["zone_accounting"] = f"off: {why_not_nft}"
            log.error("zone accounting off: %s", why_not_nft)
            return
        self._count_by_capture(update, why_not_nft)

    def _apply_nftables(self, update: PolicyUpdate) -> str:
        """Count with kernel counters; "" when they count, else why not."""
        assert self.accountant is not None
        if self._zone_method != "nftables":
            available, why = self.accountant.available()
            if not available:
                return why
        try:
            self.accountant.apply(update.zones)
        except SensorError as exc:
            return str(exc)
        if self._zone_sampler is None:
            self._zone_sampler = ZoneTrafficSampler(self.accountant.read)
            self._zone_sampler.sample()  # prime: counting starts now
        self._zone_method = "nftables"
        self.sensors["zone_accounting"] = (
            f"on: nftables, {len(update.zones)} zones, catalog {update.zones_version}"
        )
        return ""

    def _count_by_capture(self, update: PolicyUpdate, why_not_nft: str) -> None:
        """Count from the packet capture: the flow tables tally bytes per remote zone."""
        fallback = f" (nftables unavailable: {why_not_nft})" if why_not_nft else ""
        if self._capture_stopped:
            # The budget stopped the capture: it stays off; _zones_update resumes counting when it steps back.
            self.sensors["zone_accounting"] = "off: capture stopped by the agent's budget"
            return
        if self.flows is None:
            # Flows are off in the config, but the capture is the only way left to count.
            self.start_flows()
        assert self.flows is not None
        if not self.flows.engines:
            why = self.flows.status().removeprefix("off: ")
            self.sensors["zone_accounting"] = f"off: no capture either: {why}{fallback}"
            log.error("zone accounting %s", self.sensors["zone_accounting"])
            return
        if self._zone_method != "capture":
            self._zone_sampler = ZoneTrafficSampler(self.flows.zone_counters)
            self._zone_sampler.sample()  # prime: counting starts now
            self._zone_method = "capture"
        interfaces = ", ".join(self.flows.engines)
        zones = f"{len(update.zones)} zones, catalog {update.zones_version}"
        # A fallback is worth an operator's look (the agents view lists every sensor not "on").
        state = "fallback" if why_not_nft else "on"
        self.sensors["zone_accounting"] = f"{state}: capture on {interfaces}{fallback}, {zones}"
        log.warning("zone accounting %s", self.sensors["zone_accounting"])

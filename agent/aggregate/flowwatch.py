"""Flow monitoring: capture engines on the watched interfaces feed flow tables from one thread.

The capture rings must be drained continuously (a 4 MiB ring holds a fraction of a second
at 100 kpps), so a background thread waits on all engines with select() and folds what
they deliver into one FlowTable per interface. The agent's tick collects the flows that
closed, attributes them to processes outside the lock, and reports them. Capture problems
never stop the agent: an interface that cannot be captured is reported with the reason.

Interfaces come and go (a VPN tunnel, a VLAN added for the migration, a NIC that was down at
boot): ``watch`` takes the interfaces that should be captured now, opens engines on new
ones, and closes the engines of interfaces that went away, keeping their flow tables (and
zone tallies) so nothing counted is lost and a returning interface carries on where it was.

With an AccessTable (access summaries on), the same thread feeds it every packet of every
interface too, under the same lock: one table for the host, since a scan that comes in on
two interfaces is still one peer at one host.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Sequence

from agent.aggregate.access import AccessRecord, AccessStats, AccessTable
from agent.aggregate.flows import FlowRecord, FlowTable, SocketOwners
from agent.errors import SensorError
from agent.sensors import capture
from agent.sensors.accounting import ZoneCounters
from agent.zonemap import ZoneMap

log = logging.getLogger(__name__)


class FlowMonitor:
    def __init__(
        self,
        interfaces: Sequence[str],
        zones: ZoneMap,
        *,
        open_engine: Callable[[str], capture.CaptureEngine] = capture.CaptureEngine,
        check: Callable[[str], tuple[bool, str]] = capture.available,
        owners: SocketOwners | None = None,
        idle_timeout_s: float = 30.0,
        active_timeout_s: float = 120.0,
        access: AccessTable | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.access = access
        self._stop = threading.Event()
        self._owners = owners or SocketOwners()
        self._open_engine, self._check = open_engine, check
        self._zones = zones
        self._timeouts = (idle_timeout_s, active_timeout_s)
        self.engines: dict[str, capture.CaptureEngine] = {}
        self.tables: dict[str, FlowTable] = {}
        self.problems: dict[str, str] = {}
        # Engines whose reader failed (the interface went away): closed by the next watch().
        self._failed: set[str] = set()
        self._thread = threading.Thread(target=self._drain, name="zonewatch-capture", daemon=True)
        self._started = False
        # close() while the thread still reads a ring (join timed out) leaves the engines to the thread:
        # unmapping a ring under a reader raises BufferError, which would escape into the agent's tick.
        self._drained = False
        self._close_on_exit = False
        self._min_sampling = 1  # the agent's CPU budget may ask for 1 in N at least (agent.selfwatch)
        self._table_divisor = 1  # and its RSS budget for smaller tables
        self.watch(interfaces)

    def watch(self, interfaces: Sequence[str]) -> None:
        """Capture on exactly these interfaces from now on (engines already open stay as they are)."""
        wanted = set(interfaces)
        with self._lock:
            gone = [n for n in self.engines if n not in wanted or n in self._failed]
            stale = [n for n in self.problems if n not in wanted]
        for name in stale:
            with self._lock:
                self.problems.pop(name, None)
        for name in gone:
            with self._lock:
                engine = self.engines.pop(name)
                self._failed.discard(name)
            try:
                engine.close()
            except SensorError as exc:
                log.warning("closing capture on %s: %s", name, exc)
        for name in interfaces:
            if name in self.engines or (name in gone and name in self.problems):
                continue  # open already, or failed just now: try again at the next watch
            ok, why = self._check(name)
            if not ok:
                with self._lock:
                    self.problems[name] = why
                continue
            try:
                engine = self._open_engine(name)
            except SensorError as exc:
                with self._lock:
                    self.problems[name] = str(exc)
                continue
            _set_floor(engine, self._min_sampling)
            with self._lock:
                self.problems.pop(name, None)
                self.engines[name] = engine
                if name not in self.tables:
                    idle, active = self._timeouts
                    self.tables[name] = FlowTable(
                        self._zones,
                        name,
                        idle_timeout_s=idle,
                        active_timeout_s=active,
                        max_flows=FlowTable.MAX_FLOWS // self._table_divisor,
                    )
            log.info("capturing on %s", name)
        if self.engines and not self._started:
            self._started = True
            self._thread.start()

    def _drain(self) -> None:
        try:
            self._drain_until_stopped()
        finally:
            with self._lock:
                self._drained, close = True, self._close_on_exit
            if close:
                self._close_engines()

    def _drain_until_stopped(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                by_fd = {e.fileno(): (n, e) for n, e in self.engines.items() if n not in self._failed}
            try:
                ready, _, _ = select.select(list(by_fd), [], [], 0.2)
            except (OSError, ValueError):
                continue  # an engine closed under us by watch(): take the new set
            for fd in ready:
                name, engine = by_fd[fd]
                try:
                    packets = engine.read(0)
                except (SensorError, ValueError, OSError) as exc:
                    with self._lock:
                        if self.engines.get(name) is engine:
                            self.problems[name] = str(exc)
                            self._failed.add(name)
                    continue
                with self._lock:
                    self.tables[name].add(packets)
                    if self.access is not None:
                        self.access.add(packets)

    def set_zones(self, zones: ZoneMap) -> None:
        with self._lock:
            self._zones = zones
            for table in self.tables.values():
                table.set_zones(zones)
            if self.access is not None:
                self.access.set_zones(zones)

    def zone_counters(self) -> dict[str, ZoneCounters]:
        """Bytes and packets seen per remote zone on every captured interface, cumulative."""
        totals: dict[str, list[int]] = {}
        with self._lock:
            for table in self.tables.values():
                for zone, counts in table.zone_counters().items():
                    into = totals.setdefault(zone, [0, 0, 0, 0, 0])
                    for i, value in enumerate(counts):
                        into[i] += value
        return {zone: ZoneCounters(*values) for zone, values in totals.items()}

    def capture_totals(self) -> tuple[int, int]:
        """(packets received, dropped) over every engine open now; the kernel's counts, read now."""
        with self._lock:
            engines = list(self.engines.values())
        stats = [e.stats() for e in engines]
        return sum(s.received for s in stats), sum(s.dropped for s in stats)

    @property
    def thread_id(self) -> int | None:
        """The reading thread's native id (None until it runs): the agent's budget reads its CPU."""
        return self._thread.native_id

    def set_min_sampling(self, rate: int) -> None:
        """Summarize at most 1 packet in ``rate`` from the next sampling window on (the agent's CPU
        budget); every packet is still counted, and summaries carry their rate for scaling."""
        with self._lock:
            self._min_sampling = rate
            engines = list(self.engines.values())
        for engine in engines:
            _set_floor(engine, rate)

    def limit_tables(self, divisor: int) -> None:
        """Track at most 1/``divisor`` of the flows, peers and handshakes the tables hold by default
        (the agent's RSS budget); flows beyond the bound are closed early and reported."""
        with self._lock:
            self._table_divisor = divisor
            for table in self.tables.values():
                table.set_max_flows(FlowTable.MAX_FLOWS // divisor)
            if self.access is not None:
                self.access.set_limits(AccessTable.MAX_PEERS // divisor, AccessTable.MAX_PENDING // divisor)

    def memory_bytes(self) -> int:
        """About what the capture holds: its rings and ~500 bytes a tracked flow (the RSS budget's guess
        of what turning it off would free)."""
        with self._lock:
            rings = sum(getattr(e, "ring_bytes", 0) for e in self.engines.values())
        return rings + self.table_bytes()

    def table_bytes(self) -> int:
        """About what the flow tables hold (~500 bytes a tracked flow): what shrinking them can free."""
        with self._lock:
            return sum(t.stats().active for t in self.tables.values()) * 500

    def sampling(self) -> int:
        """The highest sampling rate N (1 in N) any engine runs at now; 1 when all see everything."""
        with self._lock:
            engines = list(self.engines.values())
        return max((e.stats().sampling_rate for e in engines), default=1)

    def collect(
        self, now_ns: int | None = None, *, flush: bool = False, attribute: bool = True
    ) -> list[FlowRecord]:
        """Flows closed since the last call (all of them with flush), attributed to processes
        unless ``attribute`` is False (flows not reported: the capture runs for zone accounting)."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            closed = [r for t in self.tables.values() for r in (t.flush() if flush else t.expire(now))]
        if closed and attribute:
            self._owners.refresh()  # the socket table is read here, outside the lock, once per tick at most
            closed = [r._replace(process=self._owners.owner(r)) for r in closed]
        return closed

    def collect_access(self, now_ns: int | None = None) -> list[AccessRecord]:
        """Close the access window at ``now_ns``: one record per direction, peer and admin service."""
        if self.access is None:
            return []
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            return self.access.collect(now)

    def access_stats(self) -> AccessStats | None:
        if self.access is None:
            return None
        with self._lock:
            return self.access.stats()

    def status(self) -> str:
        """One line for the health fact: what is captured, what it cost, what is off and why."""
        parts = []
        with self._lock:
            engines = dict(self.engines)
            problems = dict(self.problems)
        for name, engine in engines.items():
            s = engine.stats()
            sampled = f", sampling 1 in {s.sampling_rate}" if s.sampling_rate > 1 else ""
            parts.append(f"{name}: {s.received} packets, {s.dropped} dropped{sampled}")
        parts += [f"{name} off: {why}" for name, why in problems.items() if name not in engines]
        parts += [f"{name} stopped: {why}" for name, why in problems.items() if name in engines]
        if not engines:
            return "off: " + ("; ".join(parts) if parts else "no interface to capture")
        return "on: " + "; ".join(parts)

    def close(self) -> list[FlowRecord]:
        """Stop capturing; return every flow still open."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        remaining = self.collect(flush=True)
        with self._lock:
            running = self._started and not self._drained
            self._close_on_exit = running
        if running:
            log.warning("capture thread still reading after 2 s: it closes the engines when it ends")
        else:
            self._close_engines()
        return remaining

    def _close_engines(self) -> None:
        for engine in list(self.engines.values()):
            try:
                engine.close()
            except Exception as exc:  # closing must never take the agent down
                log.warning("closing capture: %s", exc)


def _set_floor(engine: capture.CaptureEngine, rate: int) -> None:
    # An engine without a sampling policy (a stand-in that reads no ring) has nothing to sample.
    policy = getattr(engine, "policy", None)
    if policy is not None:
        policy.min_rate = rate

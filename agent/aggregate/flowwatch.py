"""Flow monitoring: capture engines on the watched interfaces feed flow tables from one thread.

The capture rings must be drained continuously (a 4 MiB ring holds a fraction of a second
at 100 kpps), so a background thread waits on all engines with select() and folds what
they deliver into one FlowTable per interface. The agent's tick collects the flows that
closed, attributes them to processes outside the lock, and reports them. Capture problems
never stop the agent: an interface that cannot be captured is reported with the reason.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Sequence

from agent.aggregate.flows import FlowRecord, FlowTable, SocketOwners
from agent.errors import SensorError
from agent.sensors import capture
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
    ) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owners = owners or SocketOwners()
        self.engines: dict[str, capture.CaptureEngine] = {}
        self.tables: dict[str, FlowTable] = {}
        self.problems: dict[str, str] = {}
        for name in interfaces:
            ok, why = check(name)
            if not ok:
                self.problems[name] = why
                continue
            try:
                self.engines[name] = open_engine(name)
            except SensorError as exc:
                self.problems[name] = str(exc)
                continue
            self.tables[name] = FlowTable(
                zones, name, idle_timeout_s=idle_timeout_s, active_timeout_s=active_timeout_s
            )
        self._thread = threading.Thread(target=self._drain, name="zonewatch-capture", daemon=True)
        if self.engines:
            self._thread.start()

    def _drain(self) -> None:
        by_fd = {engine.fileno(): name for name, engine in self.engines.items()}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(by_fd), [], [], 0.2)
            except (OSError, ValueError):
                return  # engines closed under us: stopping
            for fd in ready:
                name = by_fd[fd]
                try:
                    packets = self.engines[name].read(0)
                except SensorError as exc:
                    with self._lock:
                        self.problems[name] = str(exc)
                    del by_fd[fd]
                    continue
                with self._lock:
                    self.tables[name].add(packets)

    def set_zones(self, zones: ZoneMap) -> None:
        with self._lock:
            for table in self.tables.values():
                table.zones = zones

    def collect(self, now_ns: int | None = None, *, flush: bool = False) -> list[FlowRecord]:
        """Flows closed since the last call (all of them with flush), attributed to processes."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            closed = [r for t in self.tables.values() for r in (t.flush() if flush else t.expire(now))]
        if closed:
            self._owners.refresh()  # the socket table is read here, outside the lock, once per tick at most
            closed = [r._replace(process=self._owners.owner(r)) for r in closed]
        return closed

    def status(self) -> str:
        """One line for the health fact: what is captured, what it cost, what is off and why."""
        parts = []
        for name, engine in self.engines.items():
            s = engine.stats()
            sampled = f", sampling 1 in {s.sampling_rate}" if s.sampling_rate > 1 else ""
            parts.append(f"{name}: {s.received} packets, {s.dropped} dropped{sampled}")
        with self._lock:
            parts += [f"{name} off: {why}" for name, why in self.problems.items() if name not in self.engines]
            parts += [f"{name} stopped: {why}" for name, why in self.problems.items() if name in self.engines]
        if not self.engines:
            return "off: " + ("; ".join(parts) if parts else "no interface to capture")
        return "on: " + "; ".join(parts)

    def close(self) -> list[FlowRecord]:
        """Stop capturing; return every flow still open."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        remaining = self.collect(flush=True)
        for engine in self.engines.values():
            try:
                engine.close()
            except SensorError as exc:
                log.warning("closing capture: %s", exc)
        return remaining

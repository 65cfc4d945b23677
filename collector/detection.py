"""Detection: stored facts become events, the rule engine judges them, matches become incidents.

It runs in the writer process (store/process.py), right after a group commit has been acknowledged:
the facts it judges are the facts that were stored, each exactly once (a duplicate batch is not
judged again), and the agents' acks never wait for the rules. The engine keeps its windows in
memory; a restarted collector starts them empty.

Events are flat dicts whose fields rules/README.md documents. Besides what the agent sent, they
carry what only the collector knows: the host's labels, the kind of the peer's zone and whether
the host's role may reach it, a per-host baseline of outbound volume per zone, how long an
interface has stayed saturated, the capture loss since the previous health report, and, from the
collector's own clock, how long an agent has been silent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from collector.model import SAMPLE_COLUMNS, DetectionConfig, Settled, ValidBatch
from collector.rules.engine import Engine, Match
from collector.rules.load import Rule
from collector.store import detection as reads
from collector.store.exceptions import ExceptionSet
from collector.store.incidents import Raise, raise_incidents
from collector.store.sql import transaction, translated
from collector.tiers_policy import TierConflict, load_tiered_rules

log = logging.getLogger(__name__)

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
SATURATED = 0.8  # utilization above which an interface counts as saturated (the saturated_s field)
BASELINE_ALPHA = 0.05  # weight of each new window in the outbound-volume baseline (about 20 windows)
BASELINE_WARMUP = 30  # windows seen before a baseline is trusted
SILENT_AFTER_INTERVALS = 1.5  # heartbeat events start here; the rule decides how many make an incident
SILENCE_LOOKBACK_MS = 24 * 3600 * 1000  # agents last seen before this are retired, not silent
EVIDENCE_WINDOW_MS = 5 * 60 * 1000
_COL = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}


class _Cadence:
    """When an agent's batches arrive (collector clock), and at what interval, for the silence check."""

    __slots__ = ("gaps", "last_ms", "said")

    def __init__(self, last_ms: int) -> None:
        self.last_ms = last_ms
        self.gaps: deque[int] = deque(maxlen=9)
        self.said = 0  # intervals missed when its last heartbeat event was emitted

    def due(self, missed: float) -> bool:
        """Emit a heartbeat at each whole interval missed up to 10, then each time the count doubles:
        a host switched off overnight is one incident whose count grows slowly, not an update every tick."""
        whole = int(missed)
        if whole <= self.said or (whole > 10 and whole < 2 * self.said):
            return False
        self.said = whole
        return True

    def arrived(self, received_ms: int) -> None:
        self.said = 0
        if received_ms > self.last_ms:
            # Batches drained from a spool arrive back to back: those gaps say nothing of the interval.
            if received_ms - self.last_ms >= 200:
                self.gaps.append(received_ms - self.last_ms)
            self.last_ms = received_ms

    def interval_s(self, default_s: float) -> float:
        return statistics.median(self.gaps) / 1000 if len(self.gaps) >= 3 else default_s


class Detector:
    def __init__(self, db: sqlite3.Connection, config: DetectionConfig | None = None) -> None:
        self._db = db
        self.config = config or DetectionConfig("")
        self._rules: dict[str, Rule] = {}
        self.engine = Engine([])
        self._wanted: frozenset[str] = frozenset()
        self._hosts: dict[int, reads.HostFields | None] = {}
        self._keys: dict[str, int] = {}  # agent_id -> agents.id, of the hosts in _hosts
        self._baselines: dict[tuple[int, str], list[float]] = {}  # (agent, zone) -> [ewma bps, windows]
        self._saturated_since: dict[tuple[int, str], int] = {}
        self._capture: dict[int, tuple[int, int]] = {}  # agent -> (packets, drops) at the last health
        self._cadence: dict[int, _Cadence] = {}
        self._silence_loaded = False
        self._transition_id = reads.last_transition_id(db)
        self.raised = 0

    # -- configuration and rules ---------------------------------------------------------------------

    def configure(self, config: DetectionConfig) -> tuple[int, list[str]]:
        self.config = config
        return self.reload()

    def reload(self) -> tuple[int, list[str]]:
        """Load the rules again. A file that no longer loads keeps its previous version active; the
        errors are returned (``file:line: message``) for the caller to report."""
        if not self.config.rules_dir and not self.config.upstream_rules_dir:
            return 0, []
        # On a lower tier: the upstream's rules, then the local ones that replace none of them.
        loaded, errors = load_tiered_rules(
            Path(self.config.rules_dir) if self.config.rules_dir else None,
            Path(self.config.upstream_rules_dir) if self.config.upstream_rules_dir else None,
        )
        rules = {str(r.path): r for r in loaded}
        ids, names = {r.id for r in loaded}, {r.name for r in loaded}
        for error in errors:
            previous = self._rules.get(str(error.path))
            # A file that no longer loads keeps its previous version, unless a loaded file now claims that
            # rule's id or name (a copy renamed: load_rules refused the duplicate on purpose), or it is a
            # local rule an upstream rule now overrides (TierConflict).
            if (
                previous is not None
                and not isinstance(error, TierConflict)
                and str(error.path) not in rules
                and previous.id not in ids
                and previous.name not in names
            ):
                rules[str(error.path)] = previous
        self.engine.reload(list(rules.values()))  # first: if it refuses, what was in force stays
        self._rules = rules
        self._wanted = frozenset(c for r in rules.values() for c in r.categories)
        return len(rules), [str(e) for e in errors]

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules.values())

    def forget_host(self, key: int) -> None:
        """This agent's labels may have changed (it registered or enrolled): read them again when needed."""
        host = self._hosts.pop(key, None)
        if host is not None:
            self._keys.pop(host.agent_id, None)

    # -- the three sources of events -----------------------------------------------------------------

    def observe(
        self, items: Iterable[Any], outcomes: Iterable[Any], key_of: Callable[[str], int | None]
    ) -> int:
        """Judge the batches of one group commit that were stored now (not duplicates, not refused)."""
        events: list[dict[str, Any]] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if not isinstance(item, ValidBatch) or not isinstance(outcome, Settled) or outcome.duplicate:
                continue
            key = key_of(item.agent_id)
            if key is None:
                continue
            cadence = self._cadence.get(key)
            if cadence is None:
                self._cadence[key] = _Cadence(item.received_ms)
            else:
                cadence.arrived(item.received_ms)
            if self._wanted:
                events.extend(self._batch_events(key, item))
        return self.judge(events)

    def migration_events(self) -> int:
        """Transitions the migration step recorded since the last call."""
        rows = reads.transitions_after(self._db, self._transition_id)
        if not rows:
            return 0
        self._transition_id = rows[-1].id
        if "migration" not in self._wanted:
            return 0
        events = []
        for t in rows:
            host = self._host(t.agent)
            if host is None:
                continue
            dedicated = t.evidence.get("dedicated") or {}
            blockers = [_blocker(b) for b in t.evidence.get("blockers") or [] if isinstance(b, dict)]
            events.append(
                {
                    **_host_dict(host), "category": "migration", "time_ms": t.time_ms, "network": t.network,
                    "from_state": t.from_state, "to_state": t.to_state,
                    "bytes_dedicated": _int(dedicated.get("bytes")) if isinstance(dedicated, dict) else 0,
                    "blockers": blockers, "reason": str(t.evidence.get("reason", "")),
                }
            )  # fmt: skip
        return self.judge(events)

    def silence(self, now_ms: int) -> int:
        """Heartbeat events for agents that stopped reporting, by the collector's clock."""
        if not self._silence_loaded:
            # After a restart: agents that reported lately and do not come back are silent too, counted
            # from now: while the collector was down, no agent could report.
            self._silence_loaded = True
            for c in reads.silence_candidates(self._db, now_ms - SILENCE_LOOKBACK_MS):
                self._cadence.setdefault(c.key, _Cadence(c.last_seen_ms))
            self.excuse(now_ms)
        if "heartbeat" not in self._wanted:
            return 0
        for key in reads.revoked_agents(self._db):
            self._cadence.pop(key, None)  # a revoked agent is not silent: it is gone
        events = []
        for key, cadence in list(self._cadence.items()):
            interval = max(cadence.interval_s(self.config.default_interval_s), 0.5)
            silent_s = (now_ms - cadence.last_ms) / 1000
            if silent_s > SILENCE_LOOKBACK_MS / 1000:
                del self._cadence[key]  # retired; it comes back with its next batch
                continue
            if silent_s < interval * SILENT_AFTER_INTERVALS or not cadence.due(silent_s / interval):
                continue
            host = self._host(key)
            if host is None:
                continue
            events.append(
                {
                    **_host_dict(host), "category": "heartbeat", "time_ms": now_ms,
                    "last_seen_ms": cadence.last_ms, "silent_s": silent_s, "interval_s": interval,
                    "intervals_missed": silent_s / interval,
                }
            )  # fmt: skip
        return self.judge(events)

    def excuse(self, now_ms: int) -> None:
        """Silence up to now is the collector's doing (it was down, or could not store): count from now."""
        for cadence in self._cadence.values():
            cadence.last_ms = max(cadence.last_ms, now_ms)

    # -- judging -------------------------------------------------------------------------------------

    def judge(self, events: list[dict[str, Any]]) -> int:
        """Run events through the rules; store the matches as incidents (one transaction)."""
        if not events:
            return 0
        matches = self.engine.process(events)
        if not matches:
            return 0
        now = max(m.time_ms for m in matches)
        exceptions = ExceptionSet.load(self._db, now)
        raises = []
        for match in matches:
            last = match.events[-1] if match.events else {}
            fields = {**last, **match.group}
            if exceptions.covering(match.rule.name, match.rule.id, fields) is not None:
                continue
            raises.append(self._raise(match, last))
        if not raises:
            return 0
        with translated("store incidents"), transaction(self._db):
            raise_incidents(self._db, raises)
        self.raised += len(raises)
        return len(raises)

    def _raise(self, match: Match, last: dict[str, Any]) -> Raise:
        rule = match.rule
        agent_ids = {e.get("agent_id") for e in match.events}
        key = self._key_of(last.get("agent_id")) if len(agent_ids) == 1 else None
        shown = ", ".join(f"{k}={_short(v)}" for k, v in match.group.items() if k != "agent_id")
        where = last.get("hostname") if len(agent_ids) == 1 else f"{len(agent_ids)} hosts"
        title = f"{rule.title}" + (f": {shown}" if shown else "") + (f" on {where}" if where else "")
        processes = self._processes(key, match, last)
        evidence = {"events": list(match.events), "processes": processes}
        return Raise(
            rule.name,
            match.dedup_key,
            key,
            rule.level,
            title[:300],
            evidence,
            match.time_ms,
            rule_id=rule.id,
            rule_title=rule.title,
            dedup_fields=dict(match.group),
        )

    def _processes(self, key: int | None, match: Match, last: dict[str, Any]) -> list[dict[str, Any]]:
        """A snapshot of the processes involved: the event's own, and those whose flows met the peer."""
        found: list[dict[str, Any]] = []
        for event in match.events:
            if event.get("pid"):
                entry = {k: event.get(k, "") for k in ("pid", "process", "user", "cmdline")}
                if entry not in found:
                    found.append(entry)
        peer = last.get("peer_addr") or last.get("remote_addr")
        if key is not None and isinstance(peer, str) and peer != "*":
            found.extend(
                reads.processes_talking_to(
                    self._db, key, peer, match.time_ms - EVIDENCE_WINDOW_MS, match.time_ms + 60_000
                )
            )
        return found[:20]

    def _key_of(self, agent_id: Any) -> int | None:
        return self._keys.get(agent_id) if isinstance(agent_id, str) else None

    def _host(self, key: int) -> reads.HostFields | None:
        if key not in self._hosts:
            host = self._hosts[key] = reads.host_fields(self._db, key)
            if host is not None:
                self._keys[host.agent_id] = key
        return self._hosts[key]

    # -- events from a batch -------------------------------------------------------------------------

    def _batch_events(self, key: int, item: ValidBatch) -> Iterator[dict[str, Any]]:
        host = self._host(key)
        if host is None:
            return
        base = _host_dict(host)
        wanted = self._wanted
        config = self.config
        if item.access_rows and "access" in wanted:
            for a in item.access_rows:
                zone = config.zones.get(a.peer_zone)
                failed = a.half_open + a.resets + a.icmp_unreachable
                yield {
                    **base, "category": "access", "time_ms": a.time_ms,
                    "direction": "inbound" if a.inbound else "outbound", "peer_addr": a.peer_addr,
                    "peer_zone": a.peer_zone, "peer_zone_kind": zone.kind if zone else "unknown",
                    "peer_zone_admin": bool(zone and zone.admin), "local_zone": a.local_zone,
                    "peer_same_zone": a.peer_zone == a.local_zone and a.peer_zone != "unknown",
                    "zone_allowed": config.allows(host.role, a.peer_zone), "attempts": a.attempts,
                    "half_open": a.half_open, "resets": a.resets, "icmp_unreachable": a.icmp_unreachable,
                    "failed": failed, "distinct_ports": a.distinct_ports, "distinct_hosts": a.distinct_hosts,
                    "ports": list(a.ports), "service": a.service, "service_port": a.service_port,
                    "bytes_in": a.bytes_in, "bytes_out": a.bytes_out, "window_ms": a.window_ms,
                }  # fmt: skip
        if item.listener_rows and "listener" in wanted:
            for li in item.listener_rows:
                yield {
                    **base, "category": "listener", "time_ms": li.time_ms, "change": li.change,
                    "protocol": PROTOCOLS.get(li.ip_protocol, str(li.ip_protocol)),
                    "local_addr": li.local_addr, "local_port": li.local_port, "pid": li.pid,
                    "process": li.process, "user": li.user, "cmdline": li.cmdline,
                }  # fmt: skip
        if item.flow_rows and "flow" in wanted:
            for f in item.flow_rows:
                zone = config.zones.get(f.remote_zone)
                yield {
                    **base, "category": "flow", "time_ms": f.time_ms,
                    "protocol": PROTOCOLS.get(f.ip_protocol, str(f.ip_protocol)),
                    "local_addr": f.local_addr, "local_port": f.local_port, "remote_addr": f.remote_addr,
                    "remote_port": f.remote_port, "interface": f.interface, "bytes_in": f.bytes_in,
                    "bytes_out": f.bytes_out, "packets_in": f.packets_in, "packets_out": f.packets_out,
                    "start_ms": f.start_ms, "end_ms": f.end_ms, "remote_zone": f.remote_zone,
                    "remote_zone_kind": zone.kind if zone else "unknown",
                    "zone_allowed": config.allows(host.role, f.remote_zone),
                    "direction": "outbound" if f.initiated_locally else "inbound", "pid": f.pid,
                    "process": f.process, "user": f.user, "cmdline": f.cmdline,
                }  # fmt: skip
        if item.zone_rows:
            yield from self._zone_events(key, base, item, "zone_traffic" in wanted)
        if item.sample_columns and "interface" in wanted:
            yield from self._interface_events(key, base, item)
        if item.health_rows:
            yield from self._health_events(key, base, item, "agent_health" in wanted)

    def _zone_events(
        self, key: int, base: dict[str, Any], item: ValidBatch, wanted: bool
    ) -> Iterator[dict[str, Any]]:
        # The baseline learns from every window, judged or not, so a rule added later finds it ready.
        for z in item.zone_rows:
            if z.interface:
                continue  # per-interface rows repeat the host's total (interface "")
            seconds = max(z.window_ms, 1) / 1000
            scale = 1 / z.sampling_rate if 0 < z.sampling_rate < 1 else 1.0
            bps_in = z.bytes_in * 8 * scale / seconds
            bps_out = z.bytes_out * 8 * scale / seconds
            state = self._baselines.get((key, z.zone))
            if state is None:
                state = self._baselines[(key, z.zone)] = [bps_out, 0.0]
            baseline = state[0] if state[1] >= BASELINE_WARMUP else -1.0
            # A zero baseline (nothing ever sent there) counts as 1 bit/s: the first upload stands out.
            ratio = bps_out / max(baseline, 1.0) if baseline >= 0 else -1.0
            state[0] += BASELINE_ALPHA * (bps_out - state[0])
            state[1] += 1
            if wanted:
                zone = self.config.zones.get(z.zone)
                yield {
                    **base, "category": "zone_traffic", "time_ms": z.time_ms, "zone": z.zone,
                    "zone_kind": zone.kind if zone else "unknown",
                    "zone_direction": zone.direction if zone else "", "bytes_in": z.bytes_in,
                    "bytes_out": z.bytes_out, "window_ms": z.window_ms, "bps_in": bps_in, "bps_out": bps_out,
                    "baseline_bps_out": baseline, "baseline_ratio": ratio,
                }  # fmt: skip

    def _interface_events(self, key: int, base: dict[str, Any], item: ValidBatch) -> Iterator[dict[str, Any]]:
        cols = item.sample_columns
        since = self._saturated_since
        for time_ms, name, interval_ms, rx, tx, speed, util in zip(
            cols[_COL["time_ms"]], cols[_COL["interface"]], cols[_COL["interval_ms"]], cols[_COL["rx_bps"]],
            cols[_COL["tx_bps"]], cols[_COL["speed_bps"]], cols[_COL["utilization"]], strict=True,
        ):  # fmt: skip
            if util <= SATURATED:
                # Only samples above the saturation threshold become events: every sample of every
                # interface would cost the writer ~2 us each (a quarter of a core at 250k samples/s),
                # and a rule about an interface's load has nothing to say below it.
                since.pop((key, name), None)
                continue
            start = since.setdefault((key, name), time_ms - interval_ms)
            saturated_s = (time_ms - start) / 1000
            yield {
                **base, "category": "interface", "time_ms": time_ms, "interface": name, "rx_bps": rx,
                "tx_bps": tx, "speed_bps": speed, "utilization": util, "saturated_s": saturated_s,
            }  # fmt: skip

    def _health_events(
        self, key: int, base: dict[str, Any], item: ValidBatch, wanted: bool
    ) -> Iterator[dict[str, Any]]:
        for h in sorted(item.health_rows, key=lambda h: h.time_ms):
            before = self._capture.get(key)
            packets, drops = h.capture_packets, h.capture_drops
            if before is not None and packets >= before[0] and drops >= before[1]:
                packets, drops = packets - before[0], drops - before[1]  # else the agent restarted
            self._capture[key] = (h.capture_packets, h.capture_drops)
            if wanted:
                yield {
                    **base, "category": "agent_health", "time_ms": h.time_ms, "cpu_percent": h.cpu_percent,
                    "rss_bytes": h.rss_bytes, "spool_bytes": h.spool_bytes, "spool_batches": h.spool_batches,
                    "capture_packets": h.capture_packets, "capture_drops": h.capture_drops,
                    "capture_loss_pct": 100.0 * drops / packets if packets else 0.0,
                }  # fmt: skip


def _host_dict(host: reads.HostFields) -> dict[str, Any]:
    return host._asdict()


def _blocker(b: dict[str, Any]) -> str:
    name = b.get("process") or b.get("name") or "?"
    pid = b.get("pid")
    peer = b.get("remote_addr") or b.get("peer") or ""
    return f"{name} ({pid})" + (f" -> {peer}" if peer else "") if pid else str(name)


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 48 else text[:45] + "..."

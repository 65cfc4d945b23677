"""The forwarder: a lower collector reports to its upstream as an agent does.

Every ``interval_s`` it reads what changed since its durable cursors (store/tiers.py, on a read
connection, in a thread): its own incidents and migration states, the tier facts its own lower
tiers sent (relayed with origin "<their name>/<their origin>"), and the hourly zone rollups of the
hours still filling. It turns them into tier facts, appends them to the agent's durable spool in
bounded batches and only then moves the cursors. The agent's transport delivers the spool over
mTLS on the agents' Report stream; the upstream acknowledges after its commit and stores once per
(sender, seq). So an upstream that is down for a while loses nothing: the spool holds the backlog.

After an ack or welcome announces a policy version other than the one in force, GetPolicy fetches
it; the upstream's rule pack and zone catalog go to collector/tiers_policy.py, and when they
changed the running collector reloads its zones and rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import LABELS
from agent.credentials import Credentials, load_credentials
from agent.errors import AgentError, TransportError
from agent.health import Health, SelfMonitor
from agent.renewal import Renewal
from agent.spool import Spool
from agent.transport import Transport
from agent.wire import batch_request, health_fact, hello_request
from collector.errors import CollectorError
from collector.store.database import open_database
from collector.store.tiers import (
    HOUR_MS,
    local_incidents,
    local_migrations,
    local_rollups,
    relayed_incidents,
    relayed_migrations,
    relayed_rollups,
)
from collector.upstream.state import Cursors, ForwarderStatus, TierState
from collector.upstream.wire import incident_fact, migration_fact, rollup_fact
from protos.zonewatch.v1 import facts_pb2

log = logging.getLogger(__name__)

# A health fact at least this often, even with nothing else to say: the upstream's view of this
# tier's backlog stays fresh, and its silence rules see a live tier.
HEALTH_EVERY_MS = 30_000
POLICY_REFRESH_S = 60.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ForwarderConfig:
    state_dir: Path
    # HOST:PORT of the upstream's mTLS port; None: the one enrolled with (tier.json).
    upstream: str | None = None
    interval_s: float = 5.0
    # Facts per batch at most (the upstream's Policy.batch_max_facts replaces it once fetched), and
    # serialized bytes per batch at most (incident documents can be large; the wire takes 4 MiB).
    batch_max_facts: int = 500
    batch_max_bytes: int = 1024 * 1024
    # Rows read per source per cycle at most; a backlog is read over several back-to-back cycles.
    read_max_rows: int = 5_000
    # At the first start, rollups are sent from this many hours back.
    rollup_lookback_h: int = 24
    # The hourly rollups are computed from the raw zone traffic of the hours still filling: a scan
    # worth doing once a minute, not every cycle (at 10,000 agents an hour holds millions of rows).
    rollup_interval_s: float = 60.0
    spool_max_bytes: int = 256 * 1024 * 1024


class Forwarder:
    def __init__(
        self,
        config: ForwarderConfig,
        db_path: Path,
        *,
        on_policy_changed: Callable[[], Awaitable[None]] | None = None,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self._db_path = db_path
        self._on_policy_changed = on_policy_changed
        self._clock_ms = clock_ms
        self.state = TierState(config.state_dir)
        identity = self.state.identity()
        self.name = identity.name
        self.upstream = config.upstream or identity.upstream
        try:
            credentials: Credentials = load_credentials(config.state_dir)
            self.spool = Spool(self.state.spool_path, max_bytes=config.spool_max_bytes, clock_ms=clock_ms)
        except AgentError as exc:
            raise CollectorError(f"the forwarder cannot start: {exc}") from exc
        self.credentials = credentials
        self.agent_id = credentials.agent_id
        self.labels = {name: credentials.labels.get(name, "") for name in LABELS}
        self.transport = Transport(self.upstream, self.spool, self._hello, tls=credentials.tls)
        self.renewal = Renewal(
            config.state_dir, credentials, self.transport, hostname=self.name, clock_ms=clock_ms
        )
        self.cursors = self.state.cursors()
        self.batch_max_facts = config.batch_max_facts
        self._monitor = SelfMonitor()
        self._last_health_ms = 0
        self._last_rollups_ms = 0
        self._last_ack_seen = 0
        self._backpressure = False  # the spool is too full to read more into (cycle())
        self.status = ForwarderStatus(
            upstream=self.upstream, name=self.name, interval_s=config.interval_s, pid=os.getpid()
        )

    def _hello(self) -> bytes:
        request = hello_request(
            self.agent_id,
            self.name,
            __version__,
            self.labels,
            self.transport.policy_version,
            self._clock_ms(),
        )
        return request.SerializeToString()

    # --- reading and spooling (a worker thread) -----------------------------------------------

    def cycle(self, db: sqlite3.Connection) -> tuple[int, bool]:
        """Spool what changed since the cursors; (facts spooled, caught up)."""
        now = self._clock_ms()
        limit = self.config.read_max_rows
        new = replace(self.cursors, rollups_sent=dict(self.cursors.rollups_sent))
        facts: list[facts_pb2.Fact] = []
        full = False
        for read, build, attribute in (
            (local_incidents, incident_fact, "incidents"),
            (local_migrations, migration_fact, "migrations"),
            (relayed_incidents, incident_fact, "relayed_incidents"),
            (relayed_migrations, migration_fact, "relayed_migrations"),
        ):
            # An incident carries its evidence document (up to 60 KiB): read fewer at a time.
            rows = limit // 10 if build is incident_fact else limit
            changes: list[Any] = read(db, getattr(new, attribute), max(1, rows))
            full |= len(changes) >= max(1, rows)
            facts += [build(change, now) for change in changes]
            if changes:
                setattr(new, attribute, changes[-1].tier_seq)
        relayed = relayed_rollups(db, new.relayed_rollups, limit)
        full |= len(relayed) >= limit
        facts += [rollup_fact(rollup, now) for _, rollup in relayed]
        if relayed:
            new.relayed_rollups = relayed[-1][0]
        rollups_due = now - self._last_rollups_ms >= self.config.rollup_interval_s * 1000
        if rollups_due:
            facts += self._rollups(db, new, now)
        if self._spool_full(facts):
            # The spool evicts its oldest batches when full, and the cursors have moved past them:
            # so while the upstream is away this long, read nothing more (the cursors stay, the
            # store keeps the rows) and send only the health fact, if it fits without evicting.
            self._spool_health(now)
            return 0, True
        if rollups_due:
            self._last_rollups_ms = now
        if facts or now - self._last_health_ms >= HEALTH_EVERY_MS:
            facts.append(health_fact(self._health(), now))
            self._last_health_ms = now
        self._spool(facts, now)
        # Only now, with every fact durably in the spool: a crash before this sends them again.
        self.state.save_cursors(new)
        self.cursors = new
        return len(facts), not full

    def _spool_margin(self) -> int:
        # Room kept free for batch envelopes and the health facts of a long outage.
        return min(self.spool.max_bytes // 8, 1024 * 1024)

    def _spool_full(self, facts: list[facts_pb2.Fact]) -> bool:
        if not facts:
            return False
        stored = self.spool.stats().bytes
        estimate = sum(fact.ByteSize() + 8 for fact in facts)
        # An empty spool takes the cycle as it is: holding back would never send it.
        full = stored > 0 and stored + estimate > self.spool.max_bytes - self._spool_margin()
        if full != self._backpressure:
            self._backpressure = full
            if full:
                log.warning(
                    "forwarder spool %s is full (is upstream %s away?): reading nothing more until it drains",
                    self.state.spool_path,
                    self.upstream,
                )
            else:
                log.info("forwarder spool drained: reading again")
        return full

    def _spool_health(self, now: int) -> None:
        if now - self._last_health_ms < HEALTH_EVERY_MS:
            return
        fact = health_fact(self._health(), now)
        if self.spool.stats().bytes + fact.ByteSize() + 256 <= self.spool.max_bytes:
            self._spool([fact], now)
            self._last_health_ms = now

    def _rollups(self, db: sqlite3.Connection, new: Cursors, now: int) -> list[facts_pb2.Fact]:
        """The hours from the cursor on, each zone's sent again only when its figures changed."""
        start = new.rollup_from_ms or now - self.config.rollup_lookback_h * HOUR_MS
        facts = []
        for rollup in local_rollups(db, start, now):
            key = f"{rollup.zone}\t{rollup.hour_ms}"
            figures = [rollup.rx_bytes, rollup.tx_bytes, rollup.peak_bps, rollup.capacity_bps, rollup.hosts]
            if new.rollups_sent.get(key) != figures:
                facts.append(rollup_fact(rollup, now))
                new.rollups_sent[key] = figures
        # The previous hour stays open: its last minutes arrive after the hour turned.
        new.rollup_from_ms = now - now % HOUR_MS - HOUR_MS
        new.rollups_sent = {
            k: v for k, v in new.rollups_sent.items() if int(k.rsplit("\t", 1)[1]) >= new.rollup_from_ms
        }
        return facts

    def _health(self) -> Health:
        cpu, rss = self._monitor.cpu_and_rss()
        spool = self.spool.stats()
        sensors = {
            "forwarder": f"on: every {self.config.interval_s:g} s to {self.upstream}",
            "certificate": self.renewal.status(),
        }
        return Health(cpu, rss, spool.bytes, spool.batches, self.transport.policy_version, sensors)

    def _spool(self, facts: list[facts_pb2.Fact], now: int) -> None:
        batch: list[facts_pb2.Fact] = []
        size = 0
        for fact in facts:
            fact_size = fact.ByteSize()
            if batch and (
                len(batch) >= self.batch_max_facts or size + fact_size > self.config.batch_max_bytes
            ):
                self._append(batch, now)
                batch, size = [], 0
            batch.append(fact)
            size += fact_size
        if batch:
            self._append(batch, now)

    def _append(self, facts: list[facts_pb2.Fact], now: int) -> None:
        dropped = self.spool.take_drop_report()

        def build(seq: int) -> tuple[bytes, int, int, int]:
            request = batch_request(seq, now, now, [], dropped, facts)
            return request.SerializeToString(), len(request.batch.facts), now, now

        self.spool.append(build)
        if dropped is not None:
            self.spool.clear_drop_report(dropped)
        self.status.facts_sent += len(facts)

    # --- running ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "forwarding to %s as tier %r every %g s (spool %s)",
            self.upstream,
            self.name,
            self.config.interval_s,
            self.state.spool_path,
        )
        db = await asyncio.to_thread(open_database, self._db_path, readonly=True)
        tasks = [
            asyncio.create_task(self._collect_loop(db, stop), name="tier-collect"),
            asyncio.create_task(self.transport.run(stop), name="tier-transport"),
            asyncio.create_task(self._policy_loop(), name="tier-policy"),
            asyncio.create_task(self._renewal_loop(), name="tier-renewal"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.transport.close()
            self._save_status()
            self.spool.close()
            db.close()

    async def _collect_loop(self, db: sqlite3.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            caught_up = True
            try:
                facts, caught_up = await asyncio.to_thread(self.cycle, db)
                if facts:
                    self.transport.notify()
                if not caught_up:
                    log.info("forwarder catching up: %d facts spooled, more to read", facts)
                self.status.last_error = self.transport.stats.last_error
                if self._backpressure:
                    self.status.last_error = "spool full: reading paused until the upstream takes the backlog"
            except (CollectorError, AgentError) as exc:
                log.error("forwarder cycle failed (tried again next cycle): %s", exc)
                self.status.last_error = str(exc)
            except Exception as exc:
                # A bug or an unforeseen OSError must not end forwarding for good: the next cycle
                # tries again from the same cursors.
                log.exception("forwarder cycle failed unexpectedly (tried again next cycle)")
                self.status.last_error = f"{type(exc).__name__}: {exc}"
            self._save_status()
            if caught_up:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.interval_s)

    def _save_status(self) -> None:
        stats = self.transport.stats
        now = self._clock_ms()
        if stats.acked_seq != self._last_ack_seen:
            self._last_ack_seen = stats.acked_seq
            self.status.last_ack_ms = now
        self.status.connected = stats.connected
        self.status.acked_seq = stats.acked_seq
        self.status.last_cycle_ms = now
        self.status.policy_version = self.transport.policy_version
        try:
            self.state.save_status(self.status)
        except CollectorError as exc:
            log.warning("%s", exc)

    async def _renewal_loop(self) -> None:
        while True:
            try:
                await self.renewal.check()
            except Exception:
                # check() reports its own failures; anything else must not end renewal for good.
                log.exception("certificate check failed; trying again at the next check")
            await asyncio.sleep(self.renewal.next_check_s())

    async def _policy_loop(self) -> None:
        while True:
            wait_s = POLICY_REFRESH_S
            try:
                if await self.fetch_policy():
                    continue  # ask again at once: that confirms to the upstream what we now run
            except (TransportError, CollectorError) as exc:
                log.warning("upstream policy not applied: %s", exc)
            except Exception:
                # Anything else (a rule file the loader chokes on, ...) must not end policy updates.
                log.exception("upstream policy not applied; asking again in %g s", wait_s)
            self.transport.policy_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.transport.policy_changed.wait(), wait_s)

    async def fetch_policy(self, timeout_s: float = 10.0) -> bool:
        """GetPolicy from the upstream; True when a new version was taken."""
        # Over the stream's own channel, which follows certificate renewals.
        response = await self.transport.get_policy_response(
            self.transport.policy_version, self.agent_id, timeout_s
        )
        if response.unchanged:
            return False
        policy = response.policy
        if policy.batch_max_facts:
            self.batch_max_facts = max(1, policy.batch_max_facts)
        rule_files = [(f.name, f.text) for f in policy.rule_pack]
        from collector import tiers_policy  # the downward path's own module

        changed = await asyncio.to_thread(
            tiers_policy.store_upstream_policy, self.config.state_dir, rule_files, policy.catalog_yaml
        )
        if changed:
            log.info(
                "upstream policy %s: %d rule files and the zone catalog stored; reloading",
                response.version,
                len(rule_files),
            )
            if self._on_policy_changed is not None:
                await self._on_policy_changed()
        self.transport.policy_version = response.version
        return True


class RunningForwarder:
    """The forwarder as a task of the running collector (collector/server.py)."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(forwarder.run(self._stop), name="tier-forwarder")

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def start_forwarder(collector: Any, config: Any) -> RunningForwarder:
    """Start forwarding for a running collector (server.Collector) as its config (CollectorConfig)
    says: a changed upstream policy reloads the collector's zones and rules."""

    async def reload() -> None:
        await collector.reload_zones(only_if_changed=False)
        await collector.reload_rules()

    forwarder = Forwarder(
        ForwarderConfig(
            state_dir=config.upstream_state_path,
            upstream=config.upstream,
            interval_s=config.upstream_interval_s,
            rollup_interval_s=config.upstream_rollup_interval_s,
        ),
        config.db_path,
        on_policy_changed=reload,
    )
    return RunningForwarder(forwarder)

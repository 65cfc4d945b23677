"""The ingest writer: the only code that writes agents' facts.

It owns the agents' sequence state in memory (loaded at start), so deciding
"stored, duplicate, gap or out of order" costs no query on the hot path. It is
not thread-safe on purpose: ingest.py calls it from one thread only.

Inventory facts are kept verbatim (other_facts) and they change state: they are
applied in the commit's transaction, batch after batch and fact after fact, as
they arrived. A full one replaces the agent's addresses and routes, a diff
removes, then adds; every row that really appears or goes away is written to
inventory_changes, so the history is exact across full refreshes, and a diff
that changes nothing records nothing. Only stored batches get here: a replayed
(duplicate) batch never does. A fact older than the newest one applied
(host_inventory.updated_ms) is ignored, so state never rolls back. Batches are
stored strictly in sequence order, so that happens only when the agent's clock
stepped back; its inventory then stays as it was until its clock passes the old
time again (at most a day: times over 24 h ahead of the collector are refused).
"""

from __future__ import annotations

import json
import sqlite3
from itertools import count, repeat
from typing import NamedTuple

from collector.errors import StoreError
from collector.model import AgentHello, CatalogRow, FlowRow, InventoryRow, Settled, ValidBatch
from collector.store.incidents import AGENT_CLONE, SEQUENCE_GAP, Raise, raise_incidents
from collector.store.tiers import COLLECTOR_ROLE, sender_of, store_tier_rows


class Rejected(NamedTuple):
    """A batch (or message) refused at the edge, recorded for `health` and the agent's ack."""

    agent_id: str
    seq: int
    received_ms: int
    code: str
    field: str
    message: str
    peer: str


_INSERT_SAMPLES = "INSERT INTO interface_samples VALUES (" + ", ".join("?" * 19) + ")"
_INSERT_ZONE_TRAFFIC = (
    "INSERT INTO zone_traffic (agent, seq, time_ms, zone, interface, bytes_in, bytes_out, packets_in,"
    " packets_out, window_ms, method, sampling_rate) VALUES (" + ", ".join("?" * 12) + ")"
)
_FLOW_FIELDS = FlowRow._fields
_INSERT_FLOWS = (
    f"INSERT INTO flows (agent, seq, {', '.join(_FLOW_FIELDS)})"
    f" VALUES ({', '.join('?' * (2 + len(_FLOW_FIELDS)))})"
)
_INSERT_BATCHES = "INSERT INTO batches VALUES (" + ", ".join("?" * 10) + ")"


class _AgentState:
    __slots__ = ("key", "last_seq")

    def __init__(self, key: int, last_seq: int) -> None:
        self.key = key
        self.last_seq = last_seq


class Writer:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._agents: dict[str, _AgentState] = {
            agent_id: _AgentState(key, last_seq)
            for key, agent_id, last_seq in db.execute("SELECT id, agent_id, last_seq FROM agents")
        }
        # (agent key, interface) -> series id; grows only after a COMMIT that created the series.
        self._series: dict[tuple[int, str], int] = {
            (agent, interface): series
            for series, agent, interface in db.execute("SELECT id, agent, interface FROM series")
        }
        (self._next_series,) = db.execute("SELECT coalesce(max(id), 0) + 1 FROM series").fetchone()
        (self._next_sample,) = db.execute("SELECT coalesce(max(id), 0) + 1 FROM interface_samples").fetchone()

    def agent_key(self, agent_id: str) -> int | None:
        """agents.id of an agent this writer knows."""
        state = self._agents.get(agent_id)
        return None if state is None else state.key

    def last_seq(self, agent_id: str) -> int:
        state = self._agents.get(agent_id)
        return state.last_seq if state else 0

    def register(self, hello: AgentHello, now_ms: int, *, enrolled: bool = False) -> int:
        """Create or update the agent's row; return its highest settled sequence.

        An ``enrolled`` agent (known by its certificate) keeps the labels its enrollment token
        gave it: the hello's labels are the host's claim, not the collector's record. A name an
        operator set (``agents rename``) is kept either way.
        """
        labels = hello.labels
        keep = "agents." if enrolled else "excluded."
        try:
            with self._transaction():
                self._db.execute(
                    f"""
                    INSERT INTO agents (agent_id, hostname, agent_version, department, county, site, role,
                                        policy_version, first_seen_ms, last_seen_ms, clock_skew_ms)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (agent_id) DO UPDATE SET
                        hostname = CASE WHEN agents.name_locked THEN agents.hostname
                                        ELSE excluded.hostname END,
                        agent_version = excluded.agent_version,
                        department = {keep}department, county = {keep}county,
                        site = {keep}site, role = {keep}role,
                        policy_version = excluded.policy_version,
                        last_seen_ms = excluded.last_seen_ms, clock_skew_ms = excluded.clock_skew_ms
                    """,
                    (
                        hello.agent_id,
                        hello.hostname,
                        hello.agent_version,
                        labels.department,
                        labels.county,
                        labels.site,
                        labels.role,
                        hello.policy_version,
                        now_ms,
                        now_ms,
                        hello.time_ms - now_ms if hello.time_ms else 0,
                    ),
                )
                if hello.agent_id not in self._agents:
                    (key,) = self._db.execute(
                        "SELECT id FROM agents WHERE agent_id = ?", (hello.agent_id,)
                    ).fetchone()
                    self._agents[hello.agent_id] = _AgentState(key, 0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot register agent {hello.agent_id}: {exc}") from exc
        return self._agents[hello.agent_id].last_seq

    def reload_agent(self, agent_id: str, *, forget: str = "") -> None:
        """Take the agent's row as it is now in the database (enrollment changed it), and forget
        the id it replaced (that key's certificates are revoked; it never reports again)."""
        if forget:
            self._agents.pop(forget, None)
        try:
            row = self._db.execute(
                "SELECT id, last_seq FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read agent {agent_id}: {exc}") from exc
        if row is not None:
            self._agents[agent_id] = _AgentState(row[0], row[1])

    def store_catalog(self, zones: list[CatalogRow], version: str, now_ms: int) -> None:
        """Replace the stored zone catalog with these rows."""
        try:
            with self._transaction():
                self._db.execute("DELETE FROM zones")
                self._db.executemany(
                    "INSERT INTO zones VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*zone, version, now_ms) for zone in zones],
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store the zone catalog: {exc}") from exc

    def note_policy_version(self, agent_id: str, version: str) -> bool:
        """Record the policy version an agent says it runs; False for an unknown agent."""
        if agent_id not in self._agents:
            return False
        try:
            with self._transaction():
                self._db.execute(
                    "UPDATE agents SET policy_version = ? WHERE agent_id = ?", (version, agent_id)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record policy version of {agent_id}: {exc}") from exc
        return True

    def commit(self, items: list[ValidBatch | Rejected]) -> list[Settled | Rejected]:
        """Settle many batches, in arrival order, in one durable transaction (group commit).

        Returns one outcome per item: Settled for a stored or duplicate batch,
        Rejected for a refused one (including a batch whose sequence went back
        into a hole it never filled). Memory changes only after COMMIT succeeded.
        """
        outcomes: list[Settled | Rejected] = []
        samples: list[tuple[object, ...]] = []
        others: list[tuple[object, ...]] = []
        zone_rows: list[tuple[object, ...]] = []
        flow_rows: list[tuple[object, ...]] = []
        inventory: list[tuple[int, InventoryRow]] = []  # (agent key, fact), in arrival order
        health: dict[int, tuple[object, ...]] = {}  # agent key -> newest health in this group
        batch_rows: list[tuple[object, ...]] = []
        gaps: list[tuple[int, int, int, int]] = []
        refused: list[Rejected] = []
        raised: list[Raise] = []
        tiers: list[tuple[int, str, list[tuple[object, ...]], int]] = []  # (sender key, name, rows, received)
        settled_now: set[tuple[str, int]] = set()
        series = self._series
        new_series: dict[tuple[int, str], int] = {}
        next_id = self._next_sample
        # agent_id -> (new last_seq, last_seen_ms, clock skew ms or None when unknown)
        seen: dict[str, tuple[int, int, int | None]] = {}
        for item in items:
            state = self._agents.get(item.agent_id)
            if state is None:
                if isinstance(item, ValidBatch):
                    raise StoreError(f"agent {item.agent_id} sent a batch before its hello")
                refused.append(item)
                outcomes.append(item)
                continue
            last = seen[item.agent_id][0] if item.agent_id in seen else state.last_seq
            seq = item.seq
            if isinstance(item, Rejected):
                refused.append(item)
                outcomes.append(item)
                if item.code == "INVALID_ARGUMENT" and seq > last:
                    # An invalid batch is settled too: the agent drops it from its spool,
                    # and the sequence moves on instead of looking like a hole.
                    if seq > last + 1:
                        gaps.append((state.key, last + 1, seq - 1, item.received_ms))
                    batch_rows.append(
                        (state.key, seq, 0, item.received_ms, 0, "rejected", None, None, None, None)
                    )
                    settled_now.add((item.agent_id, seq))
                    # A rejected batch says nothing trustworthy about the agent's clock.
                    skew = seen[item.agent_id][2] if item.agent_id in seen else None
                    seen[item.agent_id] = (seq, item.received_ms, skew)
                continue
            if seq <= last:
                if (item.agent_id, seq) in settled_now or self._has_batch(state.key, seq):
                    outcomes.append(Settled(last, True, 0, 0))
                else:
                    reject = Rejected(
                        item.agent_id,
                        seq,
                        item.received_ms,
                        "FAILED_PRECONDITION",
                        "batch.seq",
                        f"sequence {seq} is at or below the highest settled sequence {last} but was never "
                        "stored: the agent's sequence went backwards (restored state or cloned host?)",
                        "",
                    )
                    refused.append(reject)
                    outcomes.append(reject)
                    raised.append(
                        Raise(
                            AGENT_CLONE,
                            item.agent_id,
                            state.key,
                            "high",
                            f"agent {item.agent_id[:12]} sent sequence {seq} again after {last}: a cloned "
                            "host or a restored agent state",
                            {"agent_id": item.agent_id, "seq": seq, "highest_settled": last,
                             "evidence": "sequence went backwards"},
                            item.received_ms,
                        )
                    )  # fmt: skip
                continue
            if item.tier_rows:
                name, role = sender_of(self._db, state.key)
                # item.sender_role is what the certificate was enrolled with; agents.role of a client
                # without one (--insecure) is only what its hello claimed.
                if role != COLLECTOR_ROLE or item.sender_role != COLLECTOR_ROLE:
                    shown = repr(item.sender_role) if item.sender_role else "none (not enrolled)"
                    refusal = Rejected(
                        item.agent_id, seq, item.received_ms, "PERMISSION_DENIED", "batch.facts",
                        f"tier facts come only from a collector enrolled with the role {COLLECTOR_ROLE!r};"
                        f" this client's enrolled role is {shown}", "",
                    )  # fmt: skip
                    refused.append(refusal)
                    outcomes.append(refusal)
                    continue
                tiers.append((state.key, name, item.tier_rows, item.received_ms))
            gap_from, gap_to = (last + 1, seq - 1) if seq > last + 1 else (0, 0)
            if gap_from:
                gaps.append((state.key, gap_from, gap_to, item.received_ms))
            key = state.key
            first_sample = last_sample = None
            if item.sample_columns:
                times, names, *values = item.sample_columns
                first_sample = next_id
                next_id += len(times)
                last_sample = next_id - 1
                # A batch names a handful of interfaces: resolve each once, then map in C.
                ids: dict[str, int] = {}
                for name in set(names):
                    sid = series.get((key, name)) or new_series.get((key, name))
                    if sid is None:
                        sid = new_series[(key, name)] = self._next_series + len(new_series)
                    ids[name] = sid
                samples.extend(
                    zip(
                        count(first_sample),
                        repeat(key),
                        map(ids.__getitem__, names),
                        repeat(seq),
                        times,
                        *values,
                    )
                )
            batch_rows.append(
                (key, seq, item.sent_ms, item.received_ms, item.fact_count, "stored",
                 item.first_ms, item.last_ms, first_sample, last_sample)
            )  # fmt: skip
            others.extend([(key, seq, *row) for row in item.other_rows])
            zone_rows.extend([(key, seq, *row) for row in item.zone_rows])
            flow_rows.extend([(key, seq, *row) for row in item.flow_rows])
            inventory.extend([(key, row) for row in item.inventory_rows])
            for h in item.health_rows:
                if key not in health or h.time_ms >= int(health[key][0]):  # type: ignore[call-overload]
                    health[key] = (
                        h.time_ms, h.cpu_percent, h.rss_bytes, h.spool_bytes, h.spool_batches,
                        h.capture_packets, h.capture_drops, h.sensors, key, h.time_ms,
                    )  # fmt: skip
            settled_now.add((item.agent_id, seq))
            seen[item.agent_id] = (seq, item.received_ms, item.sent_ms - item.received_ms)
            outcomes.append(Settled(seq, False, gap_from, gap_to))
        try:
            with self._transaction():
                db = self._db
                if batch_rows:
                    db.executemany(_INSERT_BATCHES, batch_rows)
                if new_series:
                    db.executemany(
                        "INSERT INTO series (id, agent, interface) VALUES (?, ?, ?)",
                        [(sid, agent, name) for (agent, name), sid in new_series.items()],
                    )
                if samples:
                    db.executemany(_INSERT_SAMPLES, samples)
                if others:
                    db.executemany("INSERT INTO other_facts VALUES (?, ?, ?, ?, ?)", others)
                if zone_rows:
                    db.executemany(_INSERT_ZONE_TRAFFIC, zone_rows)
                if flow_rows:
                    db.executemany(_INSERT_FLOWS, flow_rows)
                for key, fact in inventory:
                    _apply_inventory(db, key, fact)
                for sender, name, rows, received in tiers:
                    store_tier_rows(db, sender, name, rows, received)
                if health:
                    db.executemany(
                        "UPDATE agents SET health_ms = ?, cpu_percent = ?, rss_bytes = ?, spool_bytes = ?,"
                        " spool_batches = ?, capture_packets = ?, capture_drops = ?, sensors = ?"
                        " WHERE id = ? AND health_ms <= ?",  # a replayed old report does not win
                        list(health.values()),
                    )
                if gaps:
                    db.executemany("INSERT INTO sequence_gaps VALUES (?, ?, ?, ?)", gaps)
                    raised.extend(self._gap_incidents(gaps))
                if raised:
                    raise_incidents(db, raised)
                if refused:
                    db.executemany(
                        "INSERT INTO rejections (agent_id, seq, received_ms, code, field, message, peer) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        refused,
                    )
                if seen:
                    db.executemany(
                        "UPDATE agents SET last_seq = ?, last_seen_ms = ?, "
                        "clock_skew_ms = coalesce(?, clock_skew_ms) "
                        "WHERE agent_id = ?",
                        [(s, t, k, a) for a, (s, t, k) in seen.items()],
                    )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store {len(items)} batches: {exc}") from exc
        for agent_id, (seq, _, _) in seen.items():
            self._agents[agent_id].last_seq = seq
        series.update(new_series)
        self._next_series += len(new_series)
        self._next_sample = next_id
        return outcomes

    def _gap_incidents(self, gaps: list[tuple[int, int, int, int]]) -> list[Raise]:
        ids = {state.key: agent_id for agent_id, state in self._agents.items()}
        return [
            Raise(
                SEQUENCE_GAP,
                ids.get(key, str(key)),
                key,
                "medium",
                f"agent {ids.get(key, str(key))[:12]}: batches {first}..{last} never arrived",
                {
                    "agent_id": ids.get(key, ""),
                    "from_seq": first,
                    "to_seq": last,
                    "missing": last + 1 - first,
                },
                detected,
            )
            for key, first, last, detected in gaps
        ]

    def _has_batch(self, key: int, seq: int) -> bool:
        row = self._db.execute("SELECT 1 FROM batches WHERE agent = ? AND seq = ?", (key, seq)).fetchone()
        return row is not None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def transaction(self) -> _Transaction:
        """BEGIN IMMEDIATE ... COMMIT for a write of another module (store/process.py's small ops)."""
        return _Transaction(self._db)


_ROUTE_COLUMNS = "destination, gateway, interface, route_table, metric, policy"
_ROUTE_KEYS = ("destination", "gateway", "interface", "table", "metric", "policy")


def _apply_inventory(db: sqlite3.Connection, key: int, fact: InventoryRow) -> None:
    """One inventory fact of agent ``key`` (see the module docstring), inside the caller's transaction."""
    row = db.execute("SELECT updated_ms FROM host_inventory WHERE agent = ?", (key,)).fetchone()
    if row is not None and fact.time_ms < row[0]:
        return
    t = fact.time_ms
    addresses = set(db.execute("SELECT interface, cidr FROM host_addresses WHERE agent = ?", (key,)))
    routes = set(db.execute(f"SELECT {_ROUTE_COLUMNS} FROM host_routes WHERE agent = ?", (key,)))
    if fact.full:
        gone_addresses = addresses - set(fact.addresses_added)
        new_addresses = set(fact.addresses_added) - addresses
        gone_routes = routes - set(fact.routes_added)
        new_routes = set(fact.routes_added) - routes
    else:
        gone_addresses = addresses & set(fact.addresses_removed)
        new_addresses = set(fact.addresses_added) - (addresses - gone_addresses)
        gone_routes = routes & set(fact.routes_removed)
        new_routes = set(fact.routes_added) - (routes - gone_routes)
    db.executemany(
        "DELETE FROM host_addresses WHERE agent = ? AND interface = ? AND cidr = ?",
        [(key, *a) for a in gone_addresses],
    )
    db.executemany(
        "DELETE FROM host_routes WHERE agent = ? AND destination = ? AND gateway = ? AND interface = ?"
        " AND route_table = ? AND metric = ? AND policy = ?",
        [(key, *r) for r in gone_routes],
    )
    db.executemany("INSERT INTO host_addresses VALUES (?, ?, ?, ?)", [(key, *a, t) for a in new_addresses])
    db.executemany(
        f"INSERT INTO host_routes (agent, {_ROUTE_COLUMNS}, since_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(key, *r, t) for r in new_routes],
    )
    changes = [
        *((change, "address", _json(("interface", "cidr"), a)) for change, items in
          (("removed", gone_addresses), ("added", new_addresses)) for a in sorted(items)),
        *((change, "route", _json(_ROUTE_KEYS, r)) for change, items in
          (("removed", gone_routes), ("added", new_routes)) for r in sorted(items)),
    ]  # fmt: skip
    db.executemany(
        "INSERT INTO inventory_changes (agent, time_ms, change, kind, value) VALUES (?, ?, ?, ?, ?)",
        [(key, t, *change) for change in changes],
    )
    db.execute(
        "INSERT INTO host_inventory (agent, hostname, os_name, os_version, dns_resolvers, updated_ms,"
        " full_ms) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent) DO UPDATE SET"
        " hostname = excluded.hostname, os_name = excluded.os_name, os_version = excluded.os_version,"
        " dns_resolvers = excluded.dns_resolvers, updated_ms = excluded.updated_ms,"
        " full_ms = max(host_inventory.full_ms, excluded.full_ms)",
        (key, fact.hostname, fact.os_name, fact.os_version, fact.dns_resolvers, t, t if fact.full else 0),
    )


def _json(keys: tuple[str, ...], values: tuple[object, ...]) -> str:
    return json.dumps(dict(zip(keys, values, strict=True)), ensure_ascii=False, sort_keys=True)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")

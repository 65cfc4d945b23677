"""Migration state in the database: gather the evidence, keep states, transitions and exemptions.

``evaluate`` runs in the writer process (the only writer), every few seconds. It is incremental:

- Bytes exchanged with dedicated and extranet zones are folded from new ``zone_traffic`` rows
  (by id, like the rollups) into ``migration_traffic`` (first/last time and bytes per agent and
  zone), so "when did this host last talk to its dedicated network" costs no scan of the raw
  rows, and survives their pruning.
- Only hosts with news (traffic with those zones, an inventory change) or a deadline due
  (``migration_states.recheck_ms``: a quiet period ending, an exemption expiring, an agent going
  silent) are decided again; ``full`` decides every host (after a catalog change).

Each (host, network) pair has one row in ``migration_states``; every change of state is appended
to ``migration_transitions`` with its time and evidence: the history, and the facts the rule
engine matches (a transition to ``regressed``, an exemption expiring).

The pairs considered: the dedicated networks of the host's department, and any dedicated
network the host shows evidence of.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from collections import defaultdict
from typing import Any, NamedTuple

from collector.errors import QueryError, StoreError
from collector.migration import (
    DAY_MS,
    NEVER,
    STATES,
    Catalog,
    Decision,
    Evidence,
    Exemption,
    MigrationPolicy,
    ZoneNets,
    decide,
)
from collector.store.sql import transaction, translated

MAX_BLOCKERS = 10
# 0.4 ms a host alone, 1-2 ms with the machine busy (bench/fleet.py): a step, and every commit queued
# behind it, waits at most ~50-100 ms. Steps run back to back while behind, commits in between.
MAX_AGENTS_PER_STEP = 50
# A host with traffic that changes no state is decided again at most this often (_fold_traffic): on
# extranet traffic alone rarely; on dedicated traffic often enough that the programs still using the
# network (blockers, from flows that arrive after the traffic that first decided the host) show soon.
EVIDENCE_REFRESH_MS = 15 * 60_000
DEDICATED_REFRESH_MS = 30_000
# Agents left over by a step that reached MAX_AGENTS_PER_STEP, decided first by the next.
_PENDING: set[int] = set()


class EvaluationReport(NamedTuple):
    traffic_rows: int
    agents: int
    transitions: int


# Exemptions ending within this are listed as expiring (`migration`, the report).
EXPIRING_MS = 14 * DAY_MS


class GroupProgress(NamedTuple):
    """A group's migration counts: a row of `migration` (and of the report's migration section)."""

    group: str
    pairs: int
    not_started: int
    dual_homed: int
    migrated: int
    regressed: int
    exempt: int
    unknown: int
    percent_migrated: float


class Pair(NamedTuple):
    """A host and dedicated network in one state, as `migration` lists the regressed ones."""

    hostname: str
    agent_id: str
    department: str
    county: str
    network: str
    state: str
    since_ms: int


class StateRow(NamedTuple):
    hostname: str
    agent_id: str
    department: str
    county: str
    network: str
    state: str
    since_ms: int
    evaluated_ms: int
    evidence: dict[str, Any]


class ExemptionRow(NamedTuple):
    id: int
    hostname: str
    agent_id: str
    network: str
    reason: str
    approved_by: str
    reference: str
    created_ms: int
    until_ms: int


def catalog(db: sqlite3.Connection) -> Catalog:
    zones = []
    for name, kind, department, networks in db.execute("SELECT name, kind, department, networks FROM zones"):
        nets = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks.split(",") if n.strip())
        zones.append(ZoneNets(name, kind, department, nets))
    return Catalog(zones)


def evaluate(
    db: sqlite3.Connection, now_ms: int, policy: MigrationPolicy, *, full: bool = False
) -> EvaluationReport:
    """One evaluation step (see the module docstring); one transaction."""
    try:
        with transaction(db):
            cat = catalog(db)
            folded, traffic_agents = _fold_traffic(
                db, cat, now_ms, policy.quiet_ms
            )  # even without dedicated zones: pruning waits on it
            if not cat.dedicated():
                _inventory_news(db)
                return EvaluationReport(folded, 0, 0)
            agents = traffic_agents | _inventory_news(db) | _PENDING
            _PENDING.clear()
            agents |= {
                a
                for (a,) in db.execute(
                    "SELECT DISTINCT agent FROM migration_states WHERE recheck_ms <= ?", (now_ms,)
                )
            }
            # Back from silence: an unknown host that has reported since it was last decided. Only one
            # unknown for its silence (due again NEVER): a new host with no evidence yet is unknown until
            # its quiet period ends, and deciding it again on every report cost a step per interval for
            # every such host (bench/fleet.py: 40 % of 5,000 agents, the writer saturated).
            agents |= {
                a
                for (a,) in db.execute(
                    "SELECT DISTINCT m.agent FROM migration_states AS m JOIN agents AS a ON a.id = m.agent"
                    " WHERE m.state = 'unknown' AND m.recheck_ms >= ? AND a.last_seen_ms > m.evaluated_ms",
                    (NEVER,),
                )
            }
            if full:
                agents |= {a for (a,) in db.execute("SELECT id FROM agents")}
            else:
                # New hosts of a department that owns a dedicated network (not every host, every step).
                departments = sorted({z.department for z in cat.dedicated() if z.department})
                agents |= {
                    a
                    for (a,) in db.execute(
                        f"SELECT id FROM agents WHERE department IN ({', '.join('?' * len(departments))})"
                        " AND id NOT IN (SELECT agent FROM migration_states)",
                        departments,
                    )
                }
            transitions = 0
            decided = sorted(agents)[:MAX_AGENTS_PER_STEP]
            for key in decided:
                transitions += _evaluate_agent(db, cat, key, now_ms, policy)
            # The rest at the next step (bounded transactions); kept in this process, which is the
            # writer's and lives as long as the collector, whose start decides every host anyway.
            _PENDING.update(sorted(agents)[MAX_AGENTS_PER_STEP:])
            return EvaluationReport(folded, len(decided), transitions)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot evaluate migration states: {exc}") from exc


def _fold_traffic(db: sqlite3.Connection, cat: Catalog, now_ms: int, quiet_ms: int) -> tuple[int, set[int]]:
    """Fold new zone_traffic rows into migration_traffic; (rows read, agents with news).

    Traffic is news only when it can change a state: a (host, zone) pair with no traffic within the
    quiet period before it (a network becoming active again). More traffic on an active pair changes
    no state (the recheck at its old quiet deadline sees the new evidence), so the host is decided again
    only when its state was last evaluated over EVIDENCE_REFRESH_MS ago, to keep bytes and blockers
    fresh. Measured (bench/fleet.py): every agent reports extranet traffic every interval, and deciding
    each again each step cost 0.65 ms a host, 1.3 s a step at 2,000 agents, stalling every commit.
    """
    (cursor,) = db.execute("SELECT last_id FROM migration_cursor WHERE source = 'zone_traffic'").fetchone()
    zones = {z.name for z in cat.dedicated()} | cat.extranet_names()
    rows = db.execute(
        "SELECT id, agent, zone, time_ms, bytes_in + bytes_out, sampling_rate FROM zone_traffic"
        " WHERE id > ? ORDER BY id LIMIT 200000",
        (cursor,),
    ).fetchall()
    if not rows:
        return 0, set()
    folded: dict[tuple[int, str], list[int]] = {}
    for _, agent, zone, time_ms, count, rate in rows:
        if zone not in zones or count <= 0:
            continue
        into = folded.setdefault((agent, zone), [time_ms, time_ms, 0])
        into[0] = min(into[0], time_ms)
        into[1] = max(into[1], time_ms)
        into[2] += round(count / (rate or 1.0))
    touched = json.dumps(sorted({agent for agent, _ in folded}))
    before = {
        (agent, zone): last_ms
        for agent, zone, last_ms in db.execute(
            "SELECT agent, zone, last_ms FROM migration_traffic"
            " WHERE agent IN (SELECT value FROM json_each(?))",
            (touched,),
        )
    }
    news = {
        agent
        for agent, zone in folded
        if (last := before.get((agent, zone))) is None or last + quiet_ms <= now_ms
    }
    news |= {
        a
        for (a,) in db.execute(
            "SELECT DISTINCT agent FROM migration_states WHERE evaluated_ms <= ?"
            " AND agent IN (SELECT value FROM json_each(?))",
            (now_ms - EVIDENCE_REFRESH_MS, touched),
        )
    }
    dedicated = {z.name for z in cat.dedicated()}
    on_dedicated = json.dumps(sorted({agent for agent, zone in folded if zone in dedicated}))
    news |= {
        a
        for (a,) in db.execute(
            "SELECT DISTINCT agent FROM migration_states WHERE evaluated_ms <= ?"
            " AND agent IN (SELECT value FROM json_each(?))",
            (now_ms - DEDICATED_REFRESH_MS, on_dedicated),
        )
    }
    db.executemany(
        "INSERT INTO migration_traffic (agent, zone, first_ms, last_ms, bytes) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (agent, zone) DO UPDATE SET first_ms = min(first_ms, excluded.first_ms),"
        " last_ms = max(last_ms, excluded.last_ms), bytes = min(bytes + excluded.bytes, 9223372036854775807)",
        [(agent, zone, *values) for (agent, zone), values in folded.items()],
    )
    db.execute("UPDATE migration_cursor SET last_id = ? WHERE source = 'zone_traffic'", (rows[-1][0],))
    return len(rows), news


def _inventory_news(db: sqlite3.Connection) -> set[int]:
    (cursor,) = db.execute(
        "SELECT last_id FROM migration_cursor WHERE source = 'inventory_changes'"
    ).fetchone()
    row = db.execute("SELECT max(id) FROM inventory_changes WHERE id > ?", (cursor,)).fetchone()
    if row[0] is None:
        return set()
    agents = {
        a for (a,) in db.execute("SELECT DISTINCT agent FROM inventory_changes WHERE id > ?", (cursor,))
    }
    db.execute("UPDATE migration_cursor SET last_id = ? WHERE source = 'inventory_changes'", (row[0],))
    return agents


def _evaluate_agent(
    db: sqlite3.Connection, cat: Catalog, key: int, now_ms: int, policy: MigrationPolicy
) -> int:
    agent = db.execute(
        "SELECT department, first_seen_ms, last_seen_ms FROM agents WHERE id = ?", (key,)
    ).fetchone()
    if agent is None:
        return 0
    department, first_seen_ms, last_seen_ms = agent
    extranet_zones = cat.extranet_names()
    evidence: dict[str, Evidence] = defaultdict(Evidence)
    for interface, cidr in db.execute("SELECT interface, cidr FROM host_addresses WHERE agent = ?", (key,)):
        zone = cat.zone_of(cidr)
        if zone:
            evidence[zone].addresses.append(f"{interface} {cidr}")
    for dest, gateway, interface, table, policy_text in db.execute(
        "SELECT destination, gateway, interface, route_table, policy FROM host_routes WHERE agent = ?", (key,)
    ):
        text = f"{dest}{f' via {gateway}' if gateway else ''} dev {interface} table {table}"
        text += f" ({policy_text})" if policy_text else ""
        for zone in cat.route_zones(dest, gateway):
            evidence[zone].routes.append(text)
    for zone, last_ms, count in db.execute(
        "SELECT zone, last_ms, bytes FROM migration_traffic WHERE agent = ?", (key,)
    ):
        evidence[zone].last_traffic_ms, evidence[zone].bytes = last_ms, count
    for kind, value, time_ms in db.execute(
        "SELECT kind, value, time_ms FROM inventory_changes WHERE agent = ? AND change = 'removed'", (key,)
    ):
        for zone in _zones_of_change(cat, kind, value):
            evidence[zone].last_removed_ms = max(evidence[zone].last_removed_ms, time_ms)
    extranet = Evidence()
    for zone in extranet_zones & set(evidence):
        e = evidence[zone]
        extranet.addresses += e.addresses
        extranet.routes += e.routes
        extranet.last_traffic_ms = max(extranet.last_traffic_ms, e.last_traffic_ms)
        extranet.bytes += e.bytes
        extranet.last_removed_ms = max(extranet.last_removed_ms, e.last_removed_ms)
    previous = {
        network: (state, since)
        for network, state, since in db.execute(
            "SELECT network, state, since_ms FROM migration_states WHERE agent = ?", (key,)
        )
    }
    networks = {z.name for z in cat.dedicated() if department and z.department == department}
    networks |= {z.name for z in cat.dedicated() if z.name in evidence} | set(previous)
    transitions = 0
    for network in sorted(networks):
        if network not in cat.zones or cat.zones[network].kind != "dedicated":
            # Gone from the catalog (or no longer dedicated): its row stays as it was, for the
            # record, and is not due again.
            db.execute(
                "UPDATE migration_states SET recheck_ms = ? WHERE agent = ? AND network = ?",
                (NEVER, key, network),
            )
            continue
        dedicated = evidence.get(network, Evidence())
        blockers = _blockers(db, key, network, now_ms - policy.quiet_ms) if dedicated.last_traffic_ms else []
        prev_state, prev_since = previous.get(network, (None, now_ms))
        judged = prev_state
        if prev_state in ("unknown", "exempt"):
            # Silence or an exemption does not erase where the host stood: a host that had
            # migrated and is back on the dedicated network after either has regressed.
            row = db.execute(
                "SELECT to_state FROM migration_transitions WHERE agent = ? AND network = ?"
                " AND to_state NOT IN ('unknown', 'exempt') ORDER BY id DESC LIMIT 1",
                (key, network),
            ).fetchone()
            judged = row[0] if row else prev_state
        decision = decide(
            now_ms=now_ms,
            policy=policy,
            previous=judged,
            first_seen_ms=first_seen_ms,
            last_seen_ms=last_seen_ms,
            dedicated=dedicated,
            extranet=extranet,
            exemption=_exemption(db, key, network, now_ms),
            blockers=blockers,
        )
        transitions += _record(db, key, network, decision, prev_state, prev_since, now_ms)
    return transitions


def _zones_of_change(cat: Catalog, kind: str, value: str) -> set[str]:
    try:
        item = json.loads(value)
    except ValueError:
        return set()
    if kind == "address":
        zone = cat.zone_of(str(item.get("cidr", "")))
        return {zone} if zone else set()
    return cat.route_zones(str(item.get("destination", "")), str(item.get("gateway", "")))


def _blockers(db: sqlite3.Connection, key: int, network: str, since_ms: int) -> list[dict[str, Any]]:
    """The processes, peers and ports still exchanging traffic with the network, most bytes first."""
    rows = db.execute(
        "SELECT process, user, max(cmdline), remote_addr, remote_port, ip_protocol,"
        " sum(bytes_out) + sum(bytes_in), count(*), max(end_ms) FROM flows"
        " WHERE agent = ? AND remote_zone = ? AND time_ms >= ?"
        " GROUP BY process, user, remote_addr, remote_port, ip_protocol ORDER BY 7 DESC LIMIT ?",
        (key, network, since_ms, MAX_BLOCKERS),
    ).fetchall()
    fields = ("process", "user", "cmdline", "remote_addr", "remote_port", "ip_protocol", "bytes", "flows",
              "last_ms")  # fmt: skip
    return [dict(zip(fields, row, strict=True)) for row in rows]


def _exemption(db: sqlite3.Connection, key: int, network: str, now_ms: int) -> Exemption | None:
    row = db.execute(
        "SELECT id, reason, approved_by, reference, until_ms FROM migration_exemptions"
        " WHERE agent = ? AND network = ? AND revoked_ms IS NULL AND until_ms > ? ORDER BY until_ms DESC",
        (key, network, now_ms),
    ).fetchone()
    return Exemption(*row) if row else None


def _record(
    db: sqlite3.Connection,
    key: int,
    network: str,
    decision: Decision,
    prev_state: str | None,
    prev_since: int,
    now_ms: int,
) -> int:
    evidence = json.dumps(decision.evidence, ensure_ascii=False, sort_keys=True)
    changed = decision.state != prev_state
    since = now_ms if changed else prev_since
    db.execute(
        "INSERT INTO migration_states (agent, network, state, since_ms, evaluated_ms, recheck_ms, evidence)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent, network) DO UPDATE SET state = excluded.state,"
        " since_ms = excluded.since_ms, evaluated_ms = excluded.evaluated_ms,"
        " recheck_ms = excluded.recheck_ms, evidence = excluded.evidence",
        (key, network, decision.state, since, now_ms, min(decision.recheck_ms, NEVER), evidence),
    )
    if not changed:
        return 0
    db.execute(
        "INSERT INTO migration_transitions (agent, network, from_state, to_state, time_ms, evidence)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (key, network, prev_state or "", decision.state, now_ms, evidence),
    )
    return 1


# --- exemptions ----------------------------------------------------------------------------------


def exempt(
    db: sqlite3.Connection,
    key: int,
    network: str,
    *,
    reason: str,
    approved_by: str,
    reference: str,
    until_ms: int,
    now_ms: int,
) -> int:
    """Record an approved exception; refuses an unknown network, a past expiry, a conflict."""
    for name, value in (("reason", reason), ("approved-by", approved_by)):
        if not value.strip():
            raise QueryError(f"an exemption needs --{name}")
    if until_ms <= now_ms:
        raise QueryError("an exemption's expiry must be in the future")
    with translated("record the exemption"), transaction(db):
        zone = db.execute("SELECT kind FROM zones WHERE name = ?", (network,)).fetchone()
        if zone is None or zone[0] != "dedicated":
            raise QueryError(f"no dedicated network named {network!r} in the zone catalog")
        clash = db.execute(
            "SELECT id, until_ms FROM migration_exemptions WHERE agent = ? AND network = ?"
            " AND revoked_ms IS NULL AND until_ms > ?",
            (key, network, now_ms),
        ).fetchone()
        if clash is not None:
            raise QueryError(
                f"exemption {clash[0]} already covers this host and network until {clash[1]} (ms); "
                "unexempt it first"
            )
        cursor = db.execute(
            "INSERT INTO migration_exemptions (agent, network, reason, approved_by, reference, created_ms,"
            " until_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, network, reason.strip(), approved_by.strip(), reference.strip(), now_ms, until_ms),
        )
        # Decided again at the next evaluation step.
        db.execute(
            "UPDATE migration_states SET recheck_ms = ? WHERE agent = ? AND network = ?",
            (now_ms, key, network),
        )
    return int(cursor.lastrowid or 0)


def unexempt(db: sqlite3.Connection, key: int, network: str, now_ms: int, by: str) -> int:
    with translated("end the exemption"), transaction(db):
        changed = db.execute(
            "UPDATE migration_exemptions SET revoked_ms = ?, revoked_by = ? WHERE agent = ? AND network = ?"
            " AND revoked_ms IS NULL AND until_ms > ?",
            (now_ms, by, key, network, now_ms),
        ).rowcount
        if not changed:
            raise QueryError(f"no exemption in force for this host and {network!r}")
        db.execute(
            "UPDATE migration_states SET recheck_ms = ? WHERE agent = ? AND network = ?",
            (now_ms, key, network),
        )
    return int(changed)


# --- queries ----------------------------------------------------------------------------------------


def states(
    db: sqlite3.Connection, *, agent: int | None = None, network: str | None = None, state: str | None = None
) -> list[StateRow]:
    if state is not None and state not in STATES:
        raise QueryError(f"unknown state {state!r}: use one of {', '.join(STATES)}")
    where, params = ["1"], []
    for column, value in (("m.agent", agent), ("m.network", network), ("m.state", state)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    with translated("query migration states"):
        rows = db.execute(
            "SELECT a.hostname, a.agent_id, a.department, a.county, m.network, m.state, m.since_ms,"
            " m.evaluated_ms, m.evidence FROM migration_states AS m JOIN agents AS a ON a.id = m.agent"
            f" WHERE {' AND '.join(where)} ORDER BY a.department, a.hostname, m.network",
            params,
        ).fetchall()
    return [StateRow._make((*row[:-1], json.loads(row[-1]))) for row in rows]


def exemptions(db: sqlite3.Connection, now_ms: int) -> list[ExemptionRow]:
    """Exemptions in force, soonest to expire first."""
    with translated("query exemptions"):
        rows = db.execute(
            "SELECT e.id, a.hostname, a.agent_id, e.network, e.reason, e.approved_by, e.reference,"
            " e.created_ms, e.until_ms FROM migration_exemptions AS e JOIN agents AS a ON a.id = e.agent"
            " WHERE e.revoked_ms IS NULL AND e.until_ms > ? ORDER BY e.until_ms",
            (now_ms,),
        ).fetchall()
    return [ExemptionRow(*row) for row in rows]


def transitions(
    db: sqlite3.Connection, *, since_ms: int, until_ms: int, agent: int | None = None
) -> list[dict[str, Any]]:
    with translated("query migration history"):
        rows = db.execute(
            "SELECT t.time_ms, a.hostname, a.agent_id, a.department, a.county, t.network, t.from_state,"
            " t.to_state FROM migration_transitions AS t JOIN agents AS a ON a.id = t.agent"
            " WHERE t.time_ms >= ? AND t.time_ms < ?"
            + (" AND t.agent = ?" if agent is not None else "")
            + " ORDER BY t.time_ms, t.id",
            (since_ms, until_ms, *([agent] if agent is not None else [])),
        ).fetchall()
    fields = ("time_ms", "hostname", "agent_id", "department", "county", "network", "from_state", "to_state")
    return [dict(zip(fields, row, strict=True)) for row in rows]


class Summary(NamedTuple):
    group: str
    hosts: int  # (host, network) pairs
    counts: dict[str, int]  # state -> pairs
    percent_migrated: float  # migrated + exempt of all but unknown


def summarize(rows: list[StateRow], by: str) -> list[Summary]:
    """Counts per state for each department, county or network; busiest group first."""
    key = {"department": lambda r: r.department, "county": lambda r: r.county, "network": lambda r: r.network}
    if by not in key:
        raise QueryError(f"cannot group migration by {by!r}: use department, county or network")
    groups: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATES, 0))
    for row in rows:
        groups[key[by](row) or "(none)"][row.state] += 1
    out = [
        Summary(group, sum(counts.values()), counts, percent_migrated(counts))
        for group, counts in groups.items()
    ]
    out.sort(key=lambda s: (-s.hosts, s.group))
    return out


def percent_migrated(counts: dict[str, int]) -> float:
    """Migrated and exempt pairs of all whose state is known, in percent (0 when none is known)."""
    known = sum(counts.values()) - counts["unknown"]
    return round(100.0 * (counts["migrated"] + counts["exempt"]) / known, 1) if known else 0.0


def progress(rows: list[StateRow], by: str) -> list[GroupProgress]:
    """summarize() as the rows `migration` prints (and the report shows)."""
    return [
        GroupProgress._make((s.group, s.hosts, *(s.counts[state] for state in STATES), s.percent_migrated))
        for s in summarize(rows, by)
    ]


def pair(row: StateRow) -> Pair:
    return Pair(row.hostname, row.agent_id, row.department, row.county, row.network, row.state, row.since_ms)


def trend(db: sqlite3.Connection, *, since_ms: int, until_ms: int, bucket_ms: int) -> list[dict[str, Any]]:
    """Pairs per state at the end of each bucket, replayed from the transitions."""
    with translated("query the migration trend"):
        rows = db.execute(
            "SELECT agent, network, to_state, time_ms FROM migration_transitions WHERE time_ms < ?"
            " ORDER BY time_ms, id",
            (until_ms,),
        ).fetchall()
    current: dict[tuple[int, str], str] = {}
    out: list[dict[str, Any]] = []
    index = 0
    edge = since_ms - since_ms % bucket_ms + bucket_ms
    while edge - bucket_ms < until_ms:
        while index < len(rows) and rows[index][3] < edge:
            agent, network, state, _ = rows[index]
            current[(agent, network)] = state
            index += 1
        counts = dict.fromkeys(STATES, 0)
        for state in current.values():
            counts[state] += 1
        out.append({"bucket_end_ms": edge, **counts})
        edge += bucket_ms
    return out

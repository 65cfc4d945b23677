"""Incidents in a real database: deduplicated while active, reviewed through a fixed lifecycle, every
action in a hash-chained audit log the database itself keeps append-only."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from collector.errors import QueryError
from collector.store import schema
from collector.store.database import open_database
from collector.store.incidents import (
    GENESIS_HASH,
    MAX_EVENTS,
    IncidentError,
    Raise,
    act,
    incident_detail,
    list_incidents,
    raise_incidents,
    verify_audit,
)

NOW = 1_800_000_000_000
RULE = "admin_port_scan"
RULE_ID = "5f0c6a57-6a4c-4f3e-9d55-0b1c2d3e4f50"


def add_agent(db: sqlite3.Connection, agent_id: str, hostname: str, department: str = "市公安局") -> int:
    cursor = db.execute(
        "INSERT INTO agents (agent_id, hostname, department, county, site, role, first_seen_ms, last_seen_ms)"
        " VALUES (?, ?, ?, '高新区', '主机房', 'server', ?, ?)",
        (agent_id, hostname, department, NOW, NOW),
    )
    return int(cursor.lastrowid or 0)


def match(
    key: str = "10.9.9.9",
    time_ms: int = NOW,
    *,
    agent: int | None = None,
    events: list[dict[str, object]] | None = None,
    processes: list[dict[str, object]] | None = None,
    severity: str = "high",
) -> Raise:
    return Raise(
        RULE,
        key,
        agent,
        severity,
        f"admin ports scanned from {key}",
        {
            "events": events
            if events is not None
            else [{"category": "access", "peer_addr": key, "time_ms": time_ms}],
            "processes": processes or [],
        },
        time_ms,
        rule_id=RULE_ID,
        rule_title="Admin port scan",
        dedup_fields={"peer_addr": key},
    )


def incident_row(db: sqlite3.Connection, incident_id: int) -> dict[str, object]:
    cursor = db.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,))
    names = [c[0] for c in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


def status(db: sqlite3.Connection, incident_id: int) -> str:
    return str(db.execute("SELECT status FROM incidents WHERE id = ?", (incident_id,)).fetchone()[0])


# --- raising and deduplication -----------------------------------------------------------------


def test_a_match_raises_and_the_next_with_the_same_key_updates_it(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "a" * 32, "web-01")
    (first,) = raise_incidents(db, [match(agent=agent)])
    row = incident_row(db, first)
    assert (row["rule"], row["rule_id"], row["rule_title"], row["status"], row["count"]) == (
        RULE,
        RULE_ID,
        "Admin port scan",
        "open",
        1,
    )
    assert json.loads(str(row["dedup_fields"])) == {"peer_addr": "10.9.9.9"}
    assert (row["first_seen_ms"], row["last_seen_ms"], row["updated_ms"]) == (NOW, NOW, NOW)

    assert raise_incidents(db, [match(agent=agent, time_ms=NOW + 5000)]) == [first]
    row = incident_row(db, first)
    assert (row["count"], row["first_seen_ms"], row["last_seen_ms"], row["updated_ms"]) == (
        2,
        NOW,
        NOW + 5000,
        NOW + 5000,
    )
    # A late match (older event time) counts but moves no time backwards.
    raise_incidents(db, [match(agent=agent, time_ms=NOW - 1000)])
    row = incident_row(db, first)
    assert (row["count"], row["last_seen_ms"], row["updated_ms"]) == (3, NOW + 5000, NOW + 5000)
    times = [e["time_ms"] for e in json.loads(str(row["evidence"]))["events"]]
    assert times == [NOW - 1000, NOW, NOW + 5000]  # oldest first, whatever order they came in


def test_a_different_key_is_a_different_incident(db: sqlite3.Connection) -> None:
    ids = raise_incidents(db, [match("10.9.9.9"), match("10.9.9.10"), match("10.9.9.9", NOW + 1)])
    assert ids[0] == ids[2] != ids[1]
    assert db.execute("SELECT dedup_key, count FROM incidents ORDER BY id").fetchall() == [
        ("10.9.9.9", 2),
        ("10.9.9.10", 1),
    ]


def test_evidence_keeps_the_newest_events_and_each_process_once(db: sqlite3.Connection) -> None:
    events = [{"category": "access", "time_ms": NOW + i, "attempts": i} for i in range(40)]
    nginx = {"pid": 100, "process": "nginx", "user": "www"}
    (incident,) = raise_incidents(db, [match(events=events[:30], processes=[nginx])])
    # Overlapping windows (events 20..39): each event once; the same process again: once.
    more = {"pid": 200, "process": "ssh", "user": "root"}
    raise_incidents(db, [match(events=events[20:], processes=[{**nginx, "user": "nginx"}, more])])
    evidence = incident_detail(db, incident).evidence
    assert [e["attempts"] for e in evidence["events"]] == list(range(40))
    assert evidence["processes"] == [{**nginx, "user": "nginx"}, more]

    flood = [{"category": "access", "time_ms": NOW + 1000 + i} for i in range(MAX_EVENTS + 10)]
    processes = [{"pid": pid, "process": "p"} for pid in range(60)]
    raise_incidents(db, [match(events=flood, processes=processes)])
    evidence = incident_detail(db, incident).evidence
    assert [e["time_ms"] for e in evidence["events"]] == [NOW + 1000 + i for i in range(10, MAX_EVENTS + 10)]
    assert [p["pid"] for p in evidence["processes"]] == list(range(10, 60))


def test_the_collectors_own_evidence_is_replaced_by_the_newest(db: sqlite3.Connection) -> None:
    gap = Raise("zonewatch.sequence_gap", "agent-1", None, "medium", "gap", {"from_seq": 2, "to_seq": 3}, NOW)
    (incident,) = raise_incidents(db, [gap])
    raise_incidents(db, [gap._replace(evidence={"from_seq": 7, "to_seq": 9}, time_ms=NOW + 1)])
    assert incident_detail(db, incident).evidence == {"from_seq": 7, "to_seq": 9}
    assert incident_detail(db, incident).dedup_fields == {}


def test_a_match_after_the_incident_was_closed_opens_a_new_one(db: sqlite3.Connection) -> None:
    (first,) = raise_incidents(db, [match()])
    act(db, first, "acknowledge", "张三", "", NOW + 1)
    assert raise_incidents(db, [match(time_ms=NOW + 2)]) == [first]  # acknowledged: still active
    act(db, first, "resolve", "张三", "patched", NOW + 3)
    (second,) = raise_incidents(db, [match(time_ms=NOW + 4)])
    assert second != first
    act(db, second, "false_positive", "李四", "", NOW + 5)
    (third,) = raise_incidents(db, [match(time_ms=NOW + 6)])
    assert len({first, second, third}) == 3
    assert [(s, c) for s, c in db.execute("SELECT status, count FROM incidents ORDER BY id")] == [
        ("resolved", 2),
        ("false_positive", 1),
        ("open", 1),
    ]
    # Reopening an old one while a newer one is active: both stay; new matches go to the newest.
    act(db, first, "reopen", "张三", "came back", NOW + 7)
    assert raise_incidents(db, [match(time_ms=NOW + 8)]) == [max(first, third)]


# --- the lifecycle -----------------------------------------------------------------------------

LEGAL = {
    ("open", "acknowledge"): "acknowledged",
    ("open", "resolve"): "resolved",
    ("open", "false_positive"): "false_positive",
    ("acknowledged", "resolve"): "resolved",
    ("acknowledged", "false_positive"): "false_positive",
    ("resolved", "reopen"): "open",
    ("false_positive", "reopen"): "open",
    **{(s, "comment"): s for s in ("open", "acknowledged", "resolved", "false_positive")},
}
# How to bring a fresh (open) incident to each status.
PATH = {
    "open": [],
    "acknowledged": ["acknowledge"],
    "resolved": ["resolve"],
    "false_positive": ["false_positive"],
}


@pytest.mark.parametrize("start", list(PATH))
@pytest.mark.parametrize("action", ["acknowledge", "resolve", "false_positive", "reopen", "comment"])
def test_every_transition(db: sqlite3.Connection, start: str, action: str) -> None:
    (incident,) = raise_incidents(db, [match()])
    for step in PATH[start]:
        act(db, incident, step, "setup", "", NOW)
    assert status(db, incident) == start
    before = db.execute("SELECT count(*) FROM incident_actions").fetchone()[0]
    if (start, action) in LEGAL:
        done = act(db, incident, action, "王五", "why", NOW + 10)
        assert (done.from_status, done.to_status, done.actor, done.comment) == (
            start,
            LEGAL[(start, action)],
            "王五",
            "why",
        )
        assert status(db, incident) == LEGAL[(start, action)]
        assert incident_row(db, incident)["updated_ms"] == NOW + 10
    else:
        with pytest.raises(IncidentError) as refused:
            act(db, incident, action, "王五", "why", NOW + 10)
        message = str(refused.value)
        assert message.startswith(f"incident {incident} is {start.replace('_', ' ')}; it cannot be ")
        assert "\n" not in message
        assert status(db, incident) == start
        assert db.execute("SELECT count(*) FROM incident_actions").fetchone()[0] == before
    assert verify_audit(db).ok


def test_refusals_read_well(db: sqlite3.Connection) -> None:
    (incident,) = raise_incidents(db, [match()])
    act(db, incident, "resolve", "ops", "", NOW)
    with pytest.raises(IncidentError, match=rf"^incident {incident} is resolved; it cannot be acknowledged"):
        act(db, incident, "acknowledge", "ops", "", NOW)
    with pytest.raises(IncidentError, match="reopen it first"):
        act(db, incident, "resolve", "ops", "", NOW)
    with pytest.raises(IncidentError, match=r"^no incident 999$"):
        act(db, 999, "acknowledge", "ops", "", NOW)
    with pytest.raises(IncidentError, match="unknown incident action 'close'"):
        act(db, incident, "close", "ops", "", NOW)


def test_actor_and_comment_are_checked(db: sqlite3.Connection) -> None:
    (incident,) = raise_incidents(db, [match()])
    with pytest.raises(IncidentError, match="--by"):
        act(db, incident, "acknowledge", "  ", "", NOW)
    with pytest.raises(IncidentError, match="at most 200"):
        act(db, incident, "acknowledge", "x" * 201, "", NOW)
    with pytest.raises(IncidentError, match="at most 4000"):
        act(db, incident, "acknowledge", "ops", "x" * 4001, NOW)
    with pytest.raises(IncidentError, match="say why"):
        act(db, incident, "comment", "ops", "", NOW)
    act(db, incident, "resolve", "ops", "", NOW)
    with pytest.raises(IncidentError, match="say why"):
        act(db, incident, "reopen", "ops", " ", NOW)
    assert isinstance(IncidentError("x"), QueryError)
    done = act(db, incident, "reopen", " " + "李" * 200 + " ", "中" * 4000, NOW)
    assert done.actor == "李" * 200 and len(done.comment) == 4000


# --- the audit chain ---------------------------------------------------------------------------


def recompute(row: tuple[object, ...], prev_hash: str) -> str:
    """The chain's rule, written out independently of the code under test."""
    names = ("id", "incident", "action", "actor", "comment", "from_status", "to_status", "time_ms")
    canonical = json.dumps(
        dict(zip(names, row, strict=True)), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def lifecycle(db: sqlite3.Connection) -> list[int]:
    a, b = raise_incidents(db, [match("10.0.0.1"), match("10.0.0.2")])
    act(db, a, "acknowledge", "张三", "在查", NOW + 1)
    act(db, b, "comment", "李四", "looks like the backup job", NOW + 2)
    act(db, b, "false_positive", "李四", "backup", NOW + 3)
    act(db, a, "resolve", "张三", "firewall rule added", NOW + 4)
    act(db, a, "reopen", "王五", "seen again", NOW + 5)
    return [a, b]


def test_every_action_is_an_audit_row_chained_to_the_one_before(db: sqlite3.Connection) -> None:
    a, b = lifecycle(db)
    rows = db.execute(
        "SELECT id, incident, action, actor, comment, from_status, to_status, time_ms, prev_hash, hash"
        " FROM incident_actions ORDER BY id"
    ).fetchall()
    assert [(r[1], r[2], r[5], r[6]) for r in rows] == [
        (a, "acknowledge", "open", "acknowledged"),
        (b, "comment", "open", "open"),
        (b, "false_positive", "open", "false_positive"),
        (a, "resolve", "acknowledged", "resolved"),
        (a, "reopen", "resolved", "open"),
    ]
    prev = "0" * 64
    assert prev == GENESIS_HASH
    for row in rows:
        assert row[8] == prev
        assert row[9] == recompute(row[:8], prev)
        prev = row[9]
    check = verify_audit(db)
    assert check == (5, True, None, "5 audit rows, chain intact", prev)
    detail = incident_detail(db, a)
    assert [(x.action, x.actor, x.comment) for x in detail.actions] == [
        ("acknowledge", "张三", "在查"),
        ("resolve", "张三", "firewall rule added"),
        ("reopen", "王五", "seen again"),
    ]


def test_an_empty_log_verifies(db: sqlite3.Connection) -> None:
    raise_incidents(db, [match()])
    assert verify_audit(db) == (0, True, None, "0 audit rows, chain intact", GENESIS_HASH)


def test_the_database_refuses_to_change_or_delete_audit_rows(db: sqlite3.Connection) -> None:
    lifecycle(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE incident_actions SET actor = 'nobody' WHERE id = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM incident_actions WHERE id = 5")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM incident_actions")
    assert db.execute("SELECT count(*) FROM incident_actions").fetchone() == (5,)
    assert verify_audit(db).ok


def drop_triggers(db: sqlite3.Connection) -> None:
    db.execute("DROP TRIGGER incident_actions_no_update")
    db.execute("DROP TRIGGER incident_actions_no_delete")


def test_a_row_rewritten_behind_the_triggers_is_found(db: sqlite3.Connection) -> None:
    lifecycle(db)
    drop_triggers(db)
    db.execute("UPDATE incident_actions SET actor = '张三', comment = 'not me' WHERE id = 3")
    check = verify_audit(db)
    assert (check.ok, check.first_bad_id, check.rows) == (False, 3, 3)
    assert "audit row 3" in check.message and "changed" in check.message


def test_a_row_rewritten_with_its_hash_recomputed_breaks_the_next_link(db: sqlite3.Connection) -> None:
    lifecycle(db)
    drop_triggers(db)
    row = db.execute("SELECT * FROM incident_actions WHERE id = 2").fetchone()
    forged = (*row[:4], "forged", *row[5:8])
    db.execute(
        "UPDATE incident_actions SET comment = 'forged', hash = ? WHERE id = 2", (recompute(forged, row[8]),)
    )
    check = verify_audit(db)
    assert (check.ok, check.first_bad_id) == (False, 3)
    assert "prev_hash" in check.message


def test_a_deleted_row_is_found(db: sqlite3.Connection) -> None:
    lifecycle(db)
    drop_triggers(db)
    db.execute("DELETE FROM incident_actions WHERE id = 2")
    assert verify_audit(db)[:3] == (2, False, 3)
    # The first row gone: the chain no longer starts at the genesis hash.
    db.execute("DELETE FROM incident_actions WHERE id = 1")
    assert verify_audit(db)[:3] == (1, False, 3)


def test_a_status_changed_without_an_action_is_found(db: sqlite3.Connection) -> None:
    a, _ = lifecycle(db)
    db.execute("UPDATE incidents SET status = 'resolved' WHERE id = ?", (a,))
    check = verify_audit(db)
    assert (check.ok, check.first_bad_id) == (False, None)
    assert f"incident {a} is resolved" in check.message
    db.execute("UPDATE incidents SET status = 'open' WHERE id = ?", (a,))
    assert verify_audit(db).ok
    # The last action removed (tail truncation) leaves the status unexplained.
    drop_triggers(db)
    db.execute("DELETE FROM incident_actions WHERE id = 5")
    assert not verify_audit(db).ok and f"incident {a} is open" in verify_audit(db).message


def test_two_operators_at_once_keep_one_chain(path: Path, db: sqlite3.Connection) -> None:
    incidents = raise_incidents(db, [match(f"10.1.0.{i}") for i in range(4)])
    errors: list[BaseException] = []

    def operator(name: str) -> None:
        con = open_database(path)
        try:
            for i in range(15):
                for incident in incidents:
                    act(con, incident, "comment", name, f"note {i}", NOW + i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            con.close()

    threads = [threading.Thread(target=operator, args=(f"op{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check = verify_audit(db)
    assert check.ok and check.rows == 3 * 15 * 4
    ids = [i for (i,) in db.execute("SELECT id FROM incident_actions ORDER BY id")]
    assert ids == list(range(1, 181))


# --- queries -----------------------------------------------------------------------------------


def test_list_filters_and_order(db: sqlite3.Connection) -> None:
    web = add_agent(db, "a" * 32, "web-01", "市公安局")
    db_host = add_agent(db, "b" * 32, "db-01", "市教育局")
    low, high, other = raise_incidents(
        db,
        [
            match("10.0.0.1", NOW, agent=web, severity="low"),
            match("10.0.0.2", NOW + 2, agent=web, severity="high"),
            match("10.0.0.3", NOW + 1, agent=db_host, severity="critical")._replace(rule="other", rule_id=""),
        ],
    )
    act(db, low, "resolve", "ops", "", NOW)
    assert [r.id for r in list_incidents(db)] == [high, other]
    assert [r.id for r in list_incidents(db, status="all")] == [high, other, low]
    assert [r.id for r in list_incidents(db, status="resolved")] == [low]
    assert [r.id for r in list_incidents(db, status="all", severity="high")] == [high, other]
    assert [r.id for r in list_incidents(db, status="all", rule=RULE)] == [high, low]
    assert [r.id for r in list_incidents(db, status="all", rule=RULE_ID.upper())] == [high, low]
    assert [r.id for r in list_incidents(db, status="all", agent=db_host)] == [other]
    assert [r.id for r in list_incidents(db, status="all", department="市公安局")] == [high, low]
    assert [r.id for r in list_incidents(db, status="all", since_ms=NOW + 1)] == [high, other]
    assert [r.id for r in list_incidents(db, status="all", limit=1)] == [high]
    row = list_incidents(db, rule="other")[0]
    assert (row.hostname, row.agent_id, row.department, row.county, row.matches) == (
        "db-01",
        "b" * 32,
        "市教育局",
        "高新区",
        1,
    )
    with pytest.raises(QueryError, match="unknown incident status"):
        list_incidents(db, status="closed")
    with pytest.raises(QueryError, match="unknown severity"):
        list_incidents(db, severity="urgent")
    with pytest.raises(QueryError, match="at least 1"):
        list_incidents(db, limit=0)


def test_detail_has_the_host_labels(db: sqlite3.Connection) -> None:
    agent = add_agent(db, "c" * 32, "app-01")
    (incident,) = raise_incidents(db, [match(agent=agent)])
    d = incident_detail(db, incident)
    assert (d.hostname, d.department, d.county, d.site, d.role) == (
        "app-01",
        "市公安局",
        "高新区",
        "主机房",
        "server",
    )
    assert (d.rule, d.rule_id, d.rule_title, d.dedup_fields, d.actions) == (
        RULE,
        RULE_ID,
        "Admin port scan",
        {"peer_addr": "10.9.9.9"},
        [],
    )
    with pytest.raises(IncidentError, match="no incident 77"):
        incident_detail(db, 77)


# --- the migration -----------------------------------------------------------------------------


def test_incidents_raised_before_the_step_keep_their_times(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:9])
    old = open_database(path)
    old.execute(
        "INSERT INTO incidents (rule, dedup_key, severity, title, first_seen_ms, last_seen_ms, evidence)"
        " VALUES ('zonewatch.sequence_gap', 'agent-1', 'medium', 'gap', ?, ?, '{}')",
        (NOW, NOW + 9),
    )
    old.close()
    monkeypatch.undo()
    db = open_database(path)
    try:
        row = incident_row(db, 1)
        assert (row["rule_id"], row["rule_title"], row["dedup_fields"], row["updated_ms"]) == (
            "",
            "",
            "{}",
            NOW + 9,
        )
        assert raise_incidents(
            db, [Raise("zonewatch.sequence_gap", "agent-1", None, "medium", "gap", {}, NOW + 10)]
        ) == [1]
        assert verify_audit(db).ok
    finally:
        db.close()

"""Rule exceptions in a real database: scoped by rule, host, peer network and port, never without
an expiry, inert once expired or removed."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from collector.errors import QueryError
from collector.store.exceptions import (
    DAY_MS,
    ExceptionError,
    ExceptionSet,
    add_exception,
    list_exceptions,
    remove_exception,
)

NOW = 1_800_000_000_000
RULE, RULE_ID = "admin_port_scan", "5f0c6a57-6a4c-4f3e-9d55-0b1c2d3e4f50"
ACCESS: dict[str, Any] = {
    "category": "access",
    "agent_id": "a" * 32,
    "hostname": "web-01",
    "department": "市公安局",
    "direction": "inbound",
    "peer_addr": "10.20.0.5",
    "service": "ssh",
    "service_port": 22,
    "ports": [22, 80, 443],
}
FLOW: dict[str, Any] = {
    "category": "flow",
    "agent_id": "b" * 32,
    "hostname": "db-01",
    "local_addr": "10.1.0.2",
    "local_port": 51000,
    "remote_addr": "fd00:250:2::9",
    "remote_port": 1521,
}


def add(db: sqlite3.Connection, **scope: Any) -> int:
    fields: dict[str, Any] = {
        "rule": RULE,
        "reason": "备份服务器巡检",
        "owner": "张三",
        "expires_ms": NOW + 30 * DAY_MS,
        "now_ms": NOW,
        **scope,
    }
    return add_exception(db, **fields).id


def covering(
    db: sqlite3.Connection, fields: dict[str, Any], rule: str = RULE, rule_id: str = RULE_ID
) -> int | None:
    found = ExceptionSet.load(db, NOW).covering(rule, rule_id, fields)
    return None if found is None else found.id


def test_no_exception_covers_nothing(db: sqlite3.Connection) -> None:
    assert len(ExceptionSet.load(db, NOW)) == 0
    assert covering(db, ACCESS) is None


def test_scoped_by_rule_name_id_or_every_rule(db: sqlite3.Connection) -> None:
    by_name = add(db)
    assert covering(db, ACCESS) == by_name
    assert covering(db, ACCESS, "other_rule", "") is None
    by_id = add(db, rule=RULE_ID.upper())  # ids compare without case
    assert covering(db, ACCESS, "renamed_rule", RULE_ID) == by_id
    every = add(db, rule="*")
    assert covering(db, ACCESS, "anything", "") == every
    # An empty rule id matches no exception by itself.
    assert covering(db, ACCESS, "x", "") == every


def test_scoped_by_host_agent_id_or_hostname(db: sqlite3.Connection) -> None:
    by_host = add(db, host="WEB-01")
    assert covering(db, ACCESS) == by_host  # hostnames without case, as DNS
    assert covering(db, {**ACCESS, "hostname": "web-02"}) is None
    by_id = add(db, host="b" * 32)
    assert covering(db, FLOW) == by_id
    assert covering(db, {**FLOW, "agent_id": "c" * 32}) is None
    assert covering(db, {"category": "heartbeat"}) is None  # no host fields: a host scope does not cover


def test_scoped_by_peer_network(db: sqlite3.Connection) -> None:
    net = add(db, peer="10.20.0.0/24")
    assert covering(db, ACCESS) == net
    assert covering(db, {**ACCESS, "peer_addr": "10.20.1.5"}) is None
    assert covering(db, {**ACCESS, "peer_addr": "not an address"}) is None
    v6 = add(db, peer="fd00:250:2::/64")
    assert covering(db, FLOW) == v6  # remote_addr when there is no peer_addr
    assert covering(db, {**FLOW, "remote_addr": "10.20.0.5"}) == net
    # peer_addr, when present, is the peer: remote_addr is not looked at.
    assert covering(db, {**FLOW, "peer_addr": "192.0.2.1"}) is None
    assert covering(db, {"category": "interface", "agent_id": "x"}) is None  # no peer field at all


def test_a_single_address_is_a_host_network(db: sqlite3.Connection) -> None:
    row = add_exception(
        db, rule=RULE, peer="10.20.0.5", reason="r", owner="o", expires_ms=NOW + DAY_MS, now_ms=NOW
    )
    assert row.peer == "10.20.0.5/32"
    assert covering(db, ACCESS) == row.id
    assert covering(db, {**ACCESS, "peer_addr": "10.20.0.6"}) is None
    # A network written with host bits is taken as its network.
    assert add_exception(db, rule=RULE, peer="10.30.1.7/16", reason="r", owner="o", expires_ms=NOW + 1,
                         now_ms=NOW).peer == "10.30.0.0/16"  # fmt: skip


def test_scoped_by_port_in_any_port_field_or_the_ports_list(db: sqlite3.Connection) -> None:
    ssh = add(db, port=22)
    assert covering(db, ACCESS) == ssh  # service_port
    assert covering(db, {**ACCESS, "service_port": 0, "ports": [22]}) == ssh  # an element of ports
    assert covering(db, {**ACCESS, "service_port": 0, "ports": [80, 443]}) is None
    oracle = add(db, port=1521)
    assert covering(db, FLOW) == oracle  # remote_port
    assert covering(db, {**FLOW, "remote_port": 443, "local_port": 1521}) == oracle  # local_port
    assert covering(db, {**FLOW, "remote_port": 443}) is None
    assert covering(db, {"category": "listener", "local_port": 22, "agent_id": "x"}) == ssh


def test_every_scope_must_hold(db: sqlite3.Connection) -> None:
    narrow = add(db, host="web-01", peer="10.20.0.0/16", port=443)
    assert covering(db, ACCESS) == narrow  # 443 is in ports
    assert covering(db, {**ACCESS, "hostname": "web-02"}) is None
    assert covering(db, {**ACCESS, "peer_addr": "10.99.0.1"}) is None
    assert covering(db, {**ACCESS, "ports": [22]}) is None
    assert covering(db, ACCESS, "other_rule", "") is None


def test_an_expiry_is_mandatory_and_bounded(db: sqlite3.Connection) -> None:
    with pytest.raises(ExceptionError, match="needs an expiry"):
        add(db, expires_ms=None)
    with pytest.raises(ExceptionError, match="in the future"):
        add(db, expires_ms=NOW)
    with pytest.raises(ExceptionError, match="at most 366 days"):
        add(db, expires_ms=NOW + 366 * DAY_MS + 1)
    assert add(db, expires_ms=NOW + 366 * DAY_MS) > 0
    assert isinstance(ExceptionError("x"), QueryError)


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ({"rule": " "}, "needs the rule"),
        ({"reason": ""}, "needs a reason"),
        ({"owner": "  "}, "needs an owner"),
        ({"peer": "10.0.0.0/33"}, "not an address or network"),
        ({"peer": "web-01"}, "not an address or network"),
        ({"port": 65536}, "port must be"),
        ({"port": -1}, "port must be"),
        ({"owner": "x" * 201}, "at most 200"),
    ],
)
def test_malformed_exceptions_are_refused(
    db: sqlite3.Connection, scope: dict[str, Any], message: str
) -> None:
    with pytest.raises(ExceptionError, match=message):
        add(db, **scope)
    assert db.execute("SELECT count(*) FROM rule_exceptions").fetchone() == (0,)


def test_an_expired_exception_never_covers(db: sqlite3.Connection) -> None:
    soon = add(db, expires_ms=NOW + 1000)
    assert covering(db, ACCESS) == soon
    # Loaded after the expiry: not in the set; held across it: judged at the given time.
    assert ExceptionSet.load(db, NOW + 1000).covering(RULE, RULE_ID, ACCESS) is None
    held = ExceptionSet.load(db, NOW)
    assert held.covering(RULE, RULE_ID, ACCESS, now_ms=NOW + 999) is not None
    assert held.covering(RULE, RULE_ID, ACCESS, now_ms=NOW + 1000) is None


def test_removal_ends_it_and_is_recorded(db: sqlite3.Connection) -> None:
    kept, removed = add(db, port=22), add(db, rule="*")
    row = remove_exception(db, removed, " 李四 ", NOW + 5)
    assert (row.removed_ms, row.removed_by, row.status) == (NOW + 5, "李四", "removed")
    assert covering(db, ACCESS, "other_rule", "") is None
    assert covering(db, ACCESS) == kept
    with pytest.raises(ExceptionError, match=f"exception {removed} was already removed"):
        remove_exception(db, removed, "李四", NOW + 6)
    with pytest.raises(ExceptionError, match="no exception 99"):
        remove_exception(db, 99, "李四", NOW)
    with pytest.raises(ExceptionError, match="--by"):
        remove_exception(db, kept, "", NOW)
    # Nothing is deleted: the removed one is still listed with --all.
    assert db.execute("SELECT count(*) FROM rule_exceptions").fetchone() == (2,)


def test_listing_in_force_or_all(db: sqlite3.Connection) -> None:
    late = add(db, expires_ms=NOW + 20 * DAY_MS)
    early = add(db, expires_ms=NOW + 2 * DAY_MS)
    gone = add(db)
    expiring = add(db, expires_ms=NOW + DAY_MS)
    remove_exception(db, gone, "ops", NOW)
    later = NOW + DAY_MS
    assert [r.id for r in list_exceptions(db, now_ms=later)] == [early, late]
    everything = list_exceptions(db, include_expired=True, now_ms=later)
    assert [(r.id, r.status) for r in everything] == [
        (expiring, "expired"),
        (gone, "removed"),
        (early, "active"),
        (late, "active"),
    ]
    first = everything[-1]
    assert (first.rule, first.host, first.peer, first.port, first.reason, first.owner, first.created_ms) == (
        RULE,
        "",
        "",
        0,
        "备份服务器巡检",
        "张三",
        NOW,
    )


def test_a_row_with_an_unreadable_peer_covers_nothing(db: sqlite3.Connection) -> None:
    add(db, peer="10.20.0.0/24")
    db.execute("UPDATE rule_exceptions SET peer = 'garbage'")
    assert covering(db, ACCESS) is None

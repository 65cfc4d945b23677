"""Host inventory: validated at the edge, applied in order by the real Writer on a real SQLite file
(current addresses and routes, and their exact history), and through a real collector."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Collector, Stream, now_ms, sample

from agent.sensors.inventory import Address, InventoryReport, Route
from agent.wire import batch_request, inventory_fact
from collector import validate
from collector.errors import ValidationError
from collector.model import AgentHello, HostLabels, Settled, ValidBatch
from collector.store.writer import Writer
from protos.zonewatch.v1 import agent_pb2, facts_pb2

NOW = 1_700_000_000_000
AGENT = "agent-0001"
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]

EXTRANET = ("eth0", "10.250.1.10/24")
EXTRANET6 = ("eth0", "fd00:250:1::10/64")
DEDICATED = ("eth1", "10.250.2.10/24")
POLICY = "from 10.250.2.0/24 lookup 100"
DEFAULT = ("0.0.0.0/0", "10.250.1.1", "eth0", 254, 0, "")
CONNECTED = ("10.250.1.0/24", "", "eth0", 254, 0, "")
DEDICATED_DEFAULT = ("0.0.0.0/0", "10.250.2.1", "eth1", 100, 0, POLICY)
DEDICATED_NET = ("10.9.0.0/16", "10.250.2.1", "eth1", 100, 5, POLICY)

Item = tuple[Any, ...]


def inventory(
    *,
    full: bool = False,
    add: tuple[Item, ...] = (),
    remove: tuple[Item, ...] = (),
    add_routes: tuple[Item, ...] = (),
    remove_routes: tuple[Item, ...] = (),
    resolvers: tuple[str, ...] = ("10.10.0.53",),
    hostname: str = "web-01",
    os_version: str = "V10",
) -> facts_pb2.Inventory:
    def addresses(items: tuple[Item, ...]) -> list[facts_pb2.Address]:
        return [facts_pb2.Address(interface=i, cidr=c) for i, c in items]

    def routes(items: tuple[Item, ...]) -> list[facts_pb2.Route]:
        keys = ("destination", "gateway", "interface", "table", "metric", "policy")
        return [facts_pb2.Route(**dict(zip(keys, r, strict=True))) for r in items]

    return facts_pb2.Inventory(
        full=full, addresses_added=addresses(add), addresses_removed=addresses(remove),
        routes_added=routes(add_routes), routes_removed=routes(remove_routes), dns_resolvers=resolvers,
        hostname=hostname, os_name="Kylin Linux Advanced Server", os_version=os_version,
    )  # fmt: skip


def request(seq: int, *facts: tuple[int, facts_pb2.Inventory]) -> agent_pb2.Batch:
    extra = [facts_pb2.Fact(time_ms=t, inventory=inv) for t, inv in facts]
    return batch_request(seq, NOW, NOW, [], extra=extra).batch


def valid(seq: int, *facts: tuple[int, facts_pb2.Inventory]) -> ValidBatch:
    return validate.batch(request(seq, *facts), AGENT, NOW)


@pytest.fixture
def writer(db: sqlite3.Connection) -> Writer:
    w = Writer(db)
    w.register(AgentHello(AGENT, "web-01", "0.1.0", HostLabels("市公安局"), "", NOW), NOW)
    return w


def peek(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """What a separate connection sees: what was committed."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def addresses(path: Path) -> list[tuple[Any, ...]]:
    return peek(path, "SELECT interface, cidr, since_ms FROM host_addresses ORDER BY interface, cidr")


def routes(path: Path) -> list[tuple[Any, ...]]:
    return peek(
        path,
        "SELECT destination, gateway, interface, route_table, metric, policy, since_ms FROM host_routes"
        " ORDER BY route_table, destination, gateway",
    )


def history(path: Path) -> list[tuple[Any, ...]]:
    rows = peek(path, "SELECT time_ms, change, kind, value FROM inventory_changes ORDER BY id")
    return [(t, change, kind, json.loads(value)) for t, change, kind, value in rows]


def host(path: Path) -> list[tuple[Any, ...]]:
    return peek(
        path,
        "SELECT hostname, os_name, os_version, dns_resolvers, updated_ms, full_ms FROM host_inventory",
    )


def address(item: Item) -> dict[str, Any]:
    return {"interface": item[0], "cidr": item[1]}


def route(item: Item) -> dict[str, Any]:
    return dict(zip(("destination", "gateway", "interface", "table", "metric", "policy"), item, strict=True))


# --- the writer ----------------------------------------------------------------------------------


def test_full_then_diff_then_full_leave_the_current_state_and_the_exact_history(
    writer: Writer, path: Path
) -> None:
    t1, t2, t3 = NOW, NOW + 10_000, NOW + 3_600_000
    first = inventory(
        full=True, add=(EXTRANET, DEDICATED), add_routes=(DEFAULT, CONNECTED, DEDICATED_DEFAULT)
    )
    assert writer.commit([valid(1, (t1, first))]) == [Settled(1, False, 0, 0)]
    # The dedicated table gets a second route, the host an IPv6 address.
    change = inventory(add=(EXTRANET6,), add_routes=(DEDICATED_NET,))
    writer.commit([valid(2, (t2, change))])
    # An hour later, in full: the dedicated address and its table are gone, the resolver changed.
    last = inventory(
        full=True, add=(EXTRANET, EXTRANET6), add_routes=(DEFAULT, CONNECTED), resolvers=("10.10.0.54",)
    )
    writer.commit([valid(3, (t3, last))])
    assert addresses(path) == [(*EXTRANET, t1), (*EXTRANET6, t2)]
    assert routes(path) == [(*DEFAULT, t1), (*CONNECTED, t1)]
    assert host(path) == [("web-01", "Kylin Linux Advanced Server", "V10", '["10.10.0.54"]', t3, t3)]
    assert history(path) == [
        (t1, "added", "address", address(EXTRANET)),
        (t1, "added", "address", address(DEDICATED)),
        (t1, "added", "route", route(DEFAULT)),
        (t1, "added", "route", route(DEDICATED_DEFAULT)),
        (t1, "added", "route", route(CONNECTED)),
        (t2, "added", "address", address(EXTRANET6)),
        (t2, "added", "route", route(DEDICATED_NET)),
        # The full refresh records exactly what went away, and nothing for what stayed.
        (t3, "removed", "address", address(DEDICATED)),
        (t3, "removed", "route", route(DEDICATED_DEFAULT)),
        (t3, "removed", "route", route(DEDICATED_NET)),
    ]


def test_a_diff_removes_then_adds_and_moves_the_host_row_but_not_its_full_time(
    writer: Writer, path: Path
) -> None:
    writer.commit([valid(1, (NOW, inventory(full=True, add=(EXTRANET, DEDICATED), add_routes=(DEFAULT,))))])
    later = NOW + 20_000
    writer.commit(
        [valid(2, (later, inventory(remove=(DEDICATED,), hostname="web-01.gov", os_version="V10 SP3")))]
    )
    assert addresses(path) == [(*EXTRANET, NOW)]
    assert host(path) == [
        ("web-01.gov", "Kylin Linux Advanced Server", "V10 SP3", '["10.10.0.53"]', later, NOW)
    ]
    assert history(path)[-1] == (later, "removed", "address", address(DEDICATED))


def test_diffs_are_idempotent(writer: Writer, path: Path) -> None:
    writer.commit([valid(1, (NOW, inventory(full=True, add=(EXTRANET,), add_routes=(DEFAULT,))))])
    before = (addresses(path), routes(path), history(path))
    # Adding what is there and removing what is not: nothing changes, nothing is recorded.
    again = inventory(
        add=(EXTRANET,), remove=(DEDICATED,), add_routes=(DEFAULT,), remove_routes=(DEDICATED_NET,)
    )
    writer.commit([valid(2, (NOW + 10_000, again)), valid(3, (NOW + 20_000, again))])
    assert (addresses(path), routes(path), history(path)) == before
    assert host(path)[0][4:] == (NOW + 20_000, NOW)
    # The same full inventory again records nothing either.
    writer.commit([valid(4, (NOW + 30_000, inventory(full=True, add=(EXTRANET,), add_routes=(DEFAULT,))))])
    assert history(path) == before[2]


def test_a_replayed_batch_never_reaches_the_tables_again(writer: Writer, path: Path) -> None:
    full = valid(1, (NOW, inventory(full=True, add=(EXTRANET, DEDICATED))))
    removal = valid(2, (NOW + 10_000, inventory(remove=(DEDICATED,))))
    writer.commit([full, removal])
    # The spool sends both again (the acks were lost): duplicates, stored once, state as it was.
    assert writer.commit([full, removal]) == [Settled(2, True, 0, 0), Settled(2, True, 0, 0)]
    # And within one group too.
    addition = valid(3, (NOW + 20_000, inventory(add=(DEDICATED,))))
    assert writer.commit([addition, addition]) == [Settled(3, False, 0, 0), Settled(3, True, 0, 0)]
    assert addresses(path) == [(*EXTRANET, NOW), (*DEDICATED, NOW + 20_000)]
    assert [(t, c) for t, c, _, _ in history(path)] == [
        (NOW, "added"), (NOW, "added"), (NOW + 10_000, "removed"), (NOW + 20_000, "added"),
    ]  # fmt: skip


def test_an_older_inventory_never_rolls_the_state_back(writer: Writer, path: Path) -> None:
    newer = NOW + 60_000
    writer.commit([valid(1, (newer, inventory(full=True, add=(EXTRANET,), add_routes=(DEFAULT,))))])
    # A later batch with an older time: only an agent clock stepping back makes one.
    stale = inventory(full=True, add=(DEDICATED,), add_routes=(DEDICATED_DEFAULT,), hostname="old")
    writer.commit([valid(2, (NOW, stale), (NOW + 1, inventory(remove=(EXTRANET,))))])
    assert addresses(path) == [(*EXTRANET, newer)]
    assert routes(path) == [(*DEFAULT, newer)]
    assert host(path)[0][0] == "web-01" and host(path)[0][4:] == (newer, newer)
    assert len(history(path)) == 2
    # Facts of the same time are applied (one batch's facts share it), in their order.
    writer.commit([valid(3, (newer, inventory(add=(DEDICATED,))), (newer, inventory(remove=(EXTRANET,))))])
    assert addresses(path) == [(*DEDICATED, newer)]


def test_inventories_of_several_agents_in_one_group_stay_apart(
    writer: Writer, db: sqlite3.Connection, path: Path
) -> None:
    writer.register(AgentHello("agent-0002", "db-01", "0.1.0", HostLabels(), "", NOW), NOW)
    other = validate.batch(request(1, (NOW, inventory(full=True, add=(DEDICATED,)))), "agent-0002", NOW)
    writer.commit([valid(1, (NOW, inventory(full=True, add=(EXTRANET,)))), other])
    rows = peek(
        path,
        "SELECT a.agent_id, h.interface, h.cidr FROM host_addresses AS h JOIN agents AS a ON a.id = h.agent"
        " ORDER BY a.agent_id",
    )
    assert rows == [(AGENT, *EXTRANET), ("agent-0002", *DEDICATED)]
    assert peek(path, "SELECT count(DISTINCT agent) FROM inventory_changes") == [(2,)]


def test_each_inventory_fact_is_also_kept_verbatim_as_one_fact_of_its_batch(
    writer: Writer, path: Path
) -> None:
    first, second = inventory(full=True, add=(EXTRANET,)), inventory(add=(DEDICATED,))
    writer.commit([valid(1, (NOW, first), (NOW + 1, second))])
    assert peek(path, "SELECT facts FROM batches") == [(2,)]
    kept = peek(path, "SELECT seq, time_ms, kind, payload FROM other_facts ORDER BY time_ms")
    assert [(seq, t, kind, facts_pb2.Fact.FromString(p).inventory) for seq, t, kind, p in kept] == [
        (1, NOW, "inventory", first),
        (1, NOW + 1, "inventory", second),
    ]


# --- validation ----------------------------------------------------------------------------------

LONG = "x" * 65


@pytest.mark.parametrize(
    ("fact", "field"),
    [
        (inventory(add=(EXTRANET, ("eth0", "10.250.1.300/24"))), "addresses_added[1].cidr"),
        (inventory(add=(("eth0", "10.250.1.10"),)), "addresses_added[0].cidr"),
        (inventory(remove=(("", "10.250.1.10/24"),)), "addresses_removed[0].interface"),
        (inventory(add=((LONG, "10.250.1.10/24"),)), "addresses_added[0].interface"),
        (inventory(add=(("eth0\n", "10.250.1.10/24"),)), "addresses_added[0].interface"),
        (
            inventory(add_routes=(*[DEFAULT] * 5, ("10.9.0.0/33", "", "eth0", 254, 0, ""))),
            "routes_added[5].destination",
        ),
        (inventory(add_routes=(("default", "", "eth0", 254, 0, ""),)), "routes_added[0].destination"),
        (
            inventory(remove_routes=(("10.9.0.0/16", "gw-1", "eth0", 254, 0, ""),)),
            "routes_removed[0].gateway",
        ),
        (inventory(add_routes=(("10.9.0.0/16", "", "eth0", 0, 0, ""),)), "routes_added[0].table"),
        (inventory(add_routes=(("10.9.0.0/16", "", LONG, 254, 0, ""),)), "routes_added[0].interface"),
        (inventory(add_routes=(("10.9.0.0/16", "", "eth0", 100, 0, "p" * 1025),)), "routes_added[0].policy"),
        (inventory(add_routes=(("10.9.0.0/16", "", "eth0", 100, 0, "a\x1b[31m"),)), "routes_added[0].policy"),
        (inventory(add_routes=(DEFAULT,) * 4097), "routes_added"),
        (inventory(add=(EXTRANET,) * 4097), "addresses_added"),
        (inventory(full=True, remove=(DEDICATED,)), "addresses_removed"),
        (inventory(full=True, remove_routes=(DEFAULT,)), "routes_removed"),
        (inventory(resolvers=("10.10.0.53", "dns.gov.cn")), "dns_resolvers[1]"),
        (inventory(resolvers=("10.10.0.53",) * 65), "dns_resolvers"),
        (inventory(hostname="web\x00"), "hostname"),
        (inventory(os_version="v" * 129), "os_version"),
    ],
)
def test_a_bad_inventory_is_refused_naming_the_field(fact: facts_pb2.Inventory, field: str) -> None:
    ok = inventory(full=True, add=(EXTRANET,))
    msg = request(7, (NOW, ok), (NOW, ok), (NOW, fact))
    with pytest.raises(ValidationError) as refused:
        validate.batch(msg, AGENT, NOW)
    assert refused.value.field == f"batch.facts[2].inventory.{field}"
    assert refused.value.code == "INVALID_ARGUMENT"


def test_addresses_and_networks_are_normalized() -> None:
    fact = inventory(
        add=(("eth0", "FD00:250:1:0::10/64"), ("eth1", "10.250.2.10/24")),
        add_routes=(("10.250.2.7/24", "FE80::1", "eth1", 100, 0, POLICY), ("::/0", "", "wg0", 254, 1024, "")),
        resolvers=("FD00::53", "fe80::53%eth0"),
    )
    (row,) = valid(1, (NOW, fact)).inventory_rows
    assert row.addresses_added == (("eth0", "fd00:250:1::10/64"), ("eth1", "10.250.2.10/24"))
    assert row.routes_added == (
        ("10.250.2.0/24", "fe80::1", "eth1", 100, 0, POLICY),
        ("::/0", "", "wg0", 254, 1024, ""),
    )
    assert json.loads(row.dns_resolvers) == ["fd00::53", "fe80::53%eth0"]


# --- a real collector ----------------------------------------------------------------------------


def test_an_agents_inventory_lands_in_the_tables_of_a_real_collector(collector: Collector) -> None:
    stream = Stream(collector.target, "inventory-01")
    try:
        t = now_ms()
        report = InventoryReport(
            True,
            (Address(*EXTRANET), Address(*DEDICATED)),
            (),
            (Route(*DEFAULT), Route(*DEDICATED_DEFAULT)),
            (),
            ("10.10.0.53",),
            "web-01",
            "UnionTech OS Server 20",
            "20",
        )
        first = batch_request(1, t, t, [sample()], extra=[inventory_fact(report, t)])
        assert stream.send(first.SerializeToString()).ack.acked_seq == 1
        gone = InventoryReport(
            False, (), (Address(*DEDICATED),), (), (Route(*DEDICATED_DEFAULT),), *report[5:]
        )
        second = batch_request(2, t + 1, t + 1, [sample()], extra=[inventory_fact(gone, t + 1)])
        assert stream.send(second.SerializeToString()).ack.acked_seq == 2
        # A bad one is answered in band, naming the field; the stream goes on.
        bad = batch_request(3, t + 2, t + 2, [sample()], extra=[inventory_fact(report, t + 2)])
        bad.batch.facts[1].inventory.routes_added[1].destination = "10.250.2.0/99"
        reply = stream.send(bad.SerializeToString())
        assert (reply.rejection.code, reply.rejection.field) == (
            INVALID,
            "batch.facts[1].inventory.routes_added[1].destination",
        )
    finally:
        stream.close()
    assert addresses(collector.db) == [(*EXTRANET, t)]
    assert routes(collector.db) == [(*DEFAULT, t)]
    assert host(collector.db) == [("web-01", "UnionTech OS Server 20", "20", '["10.10.0.53"]', t + 1, t)]
    assert [(time_ms, change, kind) for time_ms, change, kind, _ in history(collector.db)] == [
        (t, "added", "address"), (t, "added", "address"), (t, "added", "route"), (t, "added", "route"),
        (t + 1, "removed", "address"), (t + 1, "removed", "route"),
    ]  # fmt: skip

"""Flows from packets: both directions folded, timeouts, bounded memory, zones and owning processes."""

from __future__ import annotations

import ipaddress
import os
import socket
from types import SimpleNamespace
from typing import NamedTuple

import psutil

from agent.aggregate.flows import TCP, UDP, FlowTable, ProcessRef, SocketOwners
from agent.sensors.accounting import ZoneCounters, ZoneRanges
from agent.zonemap import ZoneMap

SEC = 1_000_000_000
LOCAL, PEER = int(ipaddress.IPv4Address("10.250.1.10")), int(ipaddress.IPv4Address("10.250.2.20"))


def span(network: str) -> tuple[int, int]:
    n = ipaddress.ip_network(network)
    return int(n.network_address), int(n.broadcast_address)


ZONES = ZoneMap(
    [ZoneRanges("公安专网", [span("10.250.2.0/24")], []), ZoneRanges("外网v6", [], [span("fd00::/112")])]
)


class Packet(NamedTuple):
    ts_ns: int
    ip_version: int
    src: int
    dst: int
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    length: int
    outgoing: bool
    sampling_rate: int = 1


def out(ts: float, length: int, flags: int = 0x10, sport: int = 40000, dport: int = 443) -> Packet:
    return Packet(int(ts * SEC), 4, LOCAL, PEER, TCP, sport, dport, flags, length, True)


def inn(ts: float, length: int, flags: int = 0x10, sport: int = 40000, dport: int = 443) -> Packet:
    return Packet(int(ts * SEC), 4, PEER, LOCAL, TCP, dport, sport, flags, length, False)


def test_zone_map_bisects_the_collectors_ranges() -> None:
    assert ZONES.zone_of(4, PEER) == "公安专网"
    assert ZONES.zone_of(4, LOCAL) == "unknown"
    assert ZONES.zone_of(6, int(ipaddress.IPv6Address("fd00::10"))) == "外网v6"
    assert ZONES.zone_of(6, int(ipaddress.IPv6Address("fd01::"))) == "unknown"
    assert ZoneMap().zone_of(4, PEER) == "unknown"


def test_both_directions_fold_into_one_flow_closed_when_idle() -> None:
    table = FlowTable(ZONES, "eth0", idle_timeout_s=30)
    table.add([out(1.0, 60, 0x02), inn(1.1, 60, 0x12), out(1.2, 1500), inn(5.0, 40, 0x11)])
    assert table.expire(int(20 * SEC)) == []  # idle only 15 s
    (flow,) = table.expire(int(35.1 * SEC))
    assert (flow.local_addr, flow.local_port, flow.remote_addr, flow.remote_port) == (
        "10.250.1.10", 40000, "10.250.2.20", 443,
    )  # fmt: skip
    assert (flow.bytes_out, flow.packets_out, flow.bytes_in, flow.packets_in) == (1560, 2, 100, 2)
    assert (flow.start_ms, flow.end_ms) == (1000, 5000)
    assert flow.tcp_flags == 0x02 | 0x10 | 0x01  # SYN, ACK, FIN seen
    assert flow.initiated_locally and flow.remote_zone == "公安专网" and flow.interface == "eth0"
    assert table.stats().active == 0 and table.stats().closed == 1


def test_an_inbound_connection_is_not_initiated_locally() -> None:
    table = FlowTable(ZONES)
    table.add([inn(1.0, 60, 0x02), out(1.1, 60, 0x12)])
    (flow,) = table.flush()
    assert not flow.initiated_locally


def test_a_long_flow_is_reported_while_it_runs() -> None:
    table = FlowTable(ZONES, idle_timeout_s=30, active_timeout_s=60)
    table.add([out(t, 1000) for t in range(0, 61, 5)])
    (first,) = table.expire(int(61 * SEC))
    assert (first.packets_out, first.bytes_out) == (13, 13_000)
    table.add([out(t, 1000) for t in range(65, 121, 5)])
    (second,) = table.expire(int(130 * SEC))
    assert second.packets_out == 12 and second.start_ms == 60_000
    # Nothing more came: the continuation closes without an empty record.
    assert table.flush() == []
    assert table.stats().active == 0


def test_sampled_packets_are_scaled_back_up() -> None:
    table = FlowTable(ZONES)
    table.add([out(1.0, 100)._replace(sampling_rate=8), inn(1.1, 50)._replace(sampling_rate=8)])
    (flow,) = table.flush()
    assert (flow.packets_out, flow.bytes_out, flow.packets_in, flow.bytes_in) == (8, 800, 8, 400)


def test_memory_is_bounded_and_evictions_are_reported_not_lost() -> None:
    table = FlowTable(ZONES, max_flows=3)
    table.add([out(float(i), 100, sport=50000 + i) for i in range(5)])
    assert table.stats().active == 3 and table.stats().evicted == 2
    reported = table.flush()
    assert sorted(f.local_port for f in reported) == [50000, 50001, 50002, 50003, 50004]
    assert sum(f.bytes_out for f in reported) == 500


def fake_conn(proto: int, laddr: tuple[str, int], raddr: tuple[str, int] | None, pid: int, status: str):  # type: ignore[no-untyped-def]
    addr = lambda a: SimpleNamespace(ip=a[0], port=a[1])  # noqa: E731
    return SimpleNamespace(
        type=1 if proto == TCP else 2,
        laddr=addr(laddr),
        raddr=addr(raddr) if raddr else (),
        pid=pid,
        status=status,
    )


def test_attribution_uses_the_socket_table_at_most_once_per_interval() -> None:
    calls = []

    def connections():  # type: ignore[no-untyped-def]
        calls.append(1)
        return [
            fake_conn(TCP, ("10.250.1.10", 40000), ("10.250.2.20", 443), 101, psutil.CONN_ESTABLISHED),
            fake_conn(TCP, ("0.0.0.0", 22), None, 202, psutil.CONN_LISTEN),
            fake_conn(UDP, ("::ffff:10.250.1.10", 5353), None, 303, psutil.CONN_NONE),
        ]

    clock = iter([0.0, 1.0, 10.0])
    owners = SocketOwners(connections, describe=lambda pid: ProcessRef(pid, f"p{pid}", "root", ""),
                          monotonic=lambda: next(clock), min_interval_s=5)  # fmt: skip
    table = FlowTable(ZONES)
    table.add([out(1.0, 100), inn(1.0, 60, 0x02, sport=22, dport=51000)])
    table.add([Packet(SEC, 4, LOCAL, PEER, UDP, 5353, 5353, 0, 80, True)])
    flows = {f.local_port: f for f in table.flush(owners)}
    assert flows[40000].process == ProcessRef(101, "p101", "root", "")
    # An inbound connection to a listener belongs to the listener's process.
    assert flows[22].process is not None and flows[22].process.pid == 202
    # IPv4-mapped socket addresses match the IPv4 flow.
    assert flows[5353].process is not None and flows[5353].process.pid == 303
    table.add([out(2.0, 100, sport=41000)])
    (orphan,) = table.flush(owners)
    assert orphan.process is None  # its socket is not in the table: not guessed
    assert len(calls) == 1, "the socket table was read again within the interval"
    table.add([out(3.0, 100)])
    table.flush(owners)
    assert len(calls) == 2


def test_a_real_connection_is_attributed_to_this_process() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        lport = client.getsockname()[1]
        rport = server.getsockname()[1]
        loopback = int(ipaddress.IPv4Address("127.0.0.1"))
        table = FlowTable(ZoneMap())
        table.add([Packet(SEC, 4, loopback, loopback, TCP, lport, rport, 0x02, 60, True)])
        (flow,) = table.flush(SocketOwners())
        assert flow.process is not None
        assert flow.process.pid == os.getpid()
        assert flow.process.name == psutil.Process().name()
    finally:
        client.close()
        accepted.close()
        server.close()


def test_the_table_tallies_what_it_saw_per_remote_zone_for_capture_based_accounting() -> None:
    table = FlowTable(ZONES)
    table.add([out(1.0, 1000), inn(1.1, 60), out(1.2, 1000, sport=40001)])
    table.add([out(1.3, 500)._replace(sampling_rate=4)])  # sampled: one summary for four packets
    (zone,) = table.zone_counters().items()
    assert zone == ("公安专网", ZoneCounters(60, 2500, 1, 3, 7))
    # Flows ending do not take their bytes out of the tally: it is cumulative.
    table.expire(10**6 * SEC)
    assert table.zone_counters()["公安专网"].bytes_out == 2500


def test_a_new_catalog_moves_open_flows_to_their_new_zone() -> None:
    table = FlowTable(ZoneMap())
    table.add([out(1.0, 1000)])
    table.set_zones(ZONES)
    table.add([out(1.1, 200)])
    counters = table.zone_counters()
    assert counters["unknown"].bytes_out == 1000 and counters["公安专网"].bytes_out == 200
    (flow,) = table.flush()
    assert flow.remote_zone == "公安专网"

"""Access summaries from packets: scans open and closed, failed and completed handshakes, ICMP
unreachables, admin services apart, bytes, bounded peers and pending handshakes, IPv6."""

from __future__ import annotations

import ipaddress

from agent.aggregate.access import AccessRecord, AccessTable
from agent.aggregate.flows import TCP, UDP
from agent.sensors.accounting import ZoneRanges
from agent.sensors.capture import PacketSummary
from agent.zonemap import ZoneMap

SEC = 1_000_000_000
T0 = 1_795_000_000 * SEC
SYN, RST, ACK = 0x02, 0x04, 0x10
ADMIN = {22: "ssh", 3389: "rdp"}


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def span(network: str) -> tuple[int, int]:
    n = ipaddress.ip_network(network)
    return int(n.network_address), int(n.broadcast_address)


LOCAL, LOCAL2, PEER = ip("10.250.1.10"), ip("10.250.1.11"), ip("203.0.113.7")
ZONES = ZoneMap(
    [
        ZoneRanges("互联网", [span("203.0.113.0/24")], [span("2001:db8::/32")]),
        ZoneRanges("本地", [span("10.250.1.0/24")], [span("fd00::/64")]),
    ]
)


def received(
    t: float, flags: int, *, peer: int = PEER, local: int = LOCAL, sport: int = 50000, dport: int = 80,
    length: int = 60, proto: int = TCP, version: int = 4, rate: int = 1,
) -> PacketSummary:  # fmt: skip
    """A packet from the peer to this host."""
    return PacketSummary(
        T0 + int(t * SEC), version, peer, local, proto, sport, dport, flags, length, False, rate
    )


def sent(
    t: float, flags: int, *, peer: int = PEER, local: int = LOCAL, sport: int = 80, dport: int = 50000,
    length: int = 60, proto: int = TCP, version: int = 4, rate: int = 1,
) -> PacketSummary:  # fmt: skip
    """A packet from this host to the peer."""
    return PacketSummary(
        T0 + int(t * SEC), version, local, peer, proto, sport, dport, flags, length, True, rate
    )


def table(**kwargs: int) -> AccessTable:
    return AccessTable(ZONES, ADMIN, start_ns=T0, **kwargs)


def by_key(records: list[AccessRecord]) -> dict[tuple[str, str, str], AccessRecord]:
    keyed = {(r.direction, r.peer_addr, r.service): r for r in records}
    assert len(keyed) == len(records), "one record per direction, peer and service"
    return keyed


def test_a_vertical_syn_scan_is_one_inbound_record_with_closed_and_open_ports_told_apart() -> None:
    t = table()
    packets = []
    for i, port in enumerate(range(1000, 1100)):
        at = i * 0.001
        packets.append(received(at, SYN, sport=40000, dport=port))
        if port % 10 == 0:  # open: we answer SYN-ACK, nmap resets instead of completing
            packets.append(sent(at, SYN | ACK, sport=port, dport=40000))
            packets.append(received(at + 0.0005, RST, sport=40000, dport=port))
        else:  # closed: the kernel refuses with RST-ACK
            packets.append(sent(at, RST | ACK, sport=port, dport=40000))
    t.add(packets)
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.direction, r.peer_addr, r.peer_zone, r.local_zone) == (
        "inbound",
        "203.0.113.7",
        "互联网",
        "本地",
    )
    assert (r.attempts, r.distinct_ports, r.distinct_hosts) == (100, 100, 1)
    assert (r.resets, r.half_open, r.icmp_unreachable) == (90, 10, 0)
    assert r.ports == tuple(range(1000, 1064))
    assert (r.service, r.service_port, r.window_ms, r.time_ms) == (
        "",
        0,
        10_000,
        (T0 + 10 * SEC) // 1_000_000,
    )
    assert r.bytes_in == 60 * 110 and r.bytes_out == 60 * 100


def test_completed_handshakes_are_not_half_open() -> None:
    t = table()
    for i in range(5):
        t.add(
            [
                received(i, SYN, sport=50000 + i),
                sent(i, SYN | ACK, dport=50000 + i),
                received(i + 0.01, ACK, sport=50000 + i),
                received(i + 0.02, ACK | 0x08, sport=50000 + i, length=500),
            ]
        )
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.half_open, r.resets, r.distinct_ports, r.ports) == (5, 0, 0, 1, (80,))
    assert t.stats().pending == 0


def test_an_unanswered_syn_ack_is_half_open_once_the_timeout_passed() -> None:
    t = table()
    t.add([received(0, SYN), sent(0, SYN | ACK)])
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.half_open) == (1, 1)
    # A late ACK (after the 1 s timeout) does not make a completed handshake either.
    t.add([received(20, SYN, sport=50001), sent(20, SYN | ACK, dport=50001), received(22, ACK, sport=50001)])
    (r,) = t.collect(T0 + 30 * SEC)
    assert (r.attempts, r.half_open) == (1, 1)


def test_an_outbound_scan_counts_refusals_silence_and_successes() -> None:
    t = table()
    packets = []
    for i, port in enumerate((21, 23, 25, 80, 443, 8080)):
        at = i * 0.01
        packets.append(sent(at, SYN, sport=45000, dport=port))
        if port in (21, 23):
            packets.append(received(at + 0.001, RST | ACK, sport=port, dport=45000))
        elif port in (80, 443):
            packets.append(received(at + 0.001, SYN | ACK, sport=port, dport=45000))
        # 25 and 8080: no answer at all
    t.add(packets)
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.direction, r.peer_addr, r.attempts, r.resets, r.half_open) == (
        "outbound",
        "203.0.113.7",
        6,
        2,
        2,
    )
    assert (r.distinct_ports, r.distinct_hosts, r.ports) == (6, 1, (21, 23, 25, 80, 443, 8080))


def test_icmp_unreachable_each_way_and_no_double_count_with_a_timed_out_syn() -> None:
    t = table()
    # A UDP probe we refuse: port unreachable from us to the peer.
    t.add([received(0, 0, proto=UDP, dport=161), sent(0, 0, proto=1, sport=3, dport=3, length=88)])
    # Our SYN refused by the peer's firewall with an ICMP unreachable: one failure, not two.
    t.add([sent(0.1, SYN, sport=45000, dport=5432, peer=ip("203.0.113.9"))])
    t.add([received(0.11, 0, proto=1, sport=3, dport=13, peer=ip("203.0.113.9"), length=88)])
    keyed = by_key(t.collect(T0 + 10 * SEC))
    refused = keyed[("inbound", "203.0.113.7", "")]
    assert (refused.icmp_unreachable, refused.attempts, refused.bytes_out) == (1, 0, 88)
    ours = keyed[("outbound", "203.0.113.9", "")]
    assert (ours.attempts, ours.icmp_unreachable, ours.half_open, ours.ports) == (1, 1, 0, (5432,))


def test_admin_ports_get_records_of_their_own() -> None:
    t = table()
    t.add([received(0, SYN, dport=22), sent(0, RST | ACK, sport=22)])
    t.add([received(0.1, SYN, dport=22, sport=50001), sent(0.1, SYN | ACK, sport=22, dport=50001)])
    t.add([received(0.2, ACK, dport=22, sport=50001, length=1000)])
    t.add([received(0.3, SYN, dport=80, sport=50002), sent(0.3, RST | ACK, sport=80, dport=50002)])
    t.add([sent(0.4, SYN, sport=45000, dport=3389), received(0.4, SYN | ACK, sport=3389, dport=45000)])
    keyed = by_key(t.collect(T0 + 10 * SEC))
    assert set(keyed) == {
        ("inbound", "203.0.113.7", "ssh"),
        ("inbound", "203.0.113.7", ""),
        ("outbound", "203.0.113.7", "rdp"),
    }
    ssh = keyed[("inbound", "203.0.113.7", "ssh")]
    assert (ssh.service_port, ssh.attempts, ssh.resets, ssh.half_open, ssh.ports) == (22, 2, 1, 0, (22,))
    general = keyed[("inbound", "203.0.113.7", "")]
    assert (general.service_port, general.attempts, general.resets, general.ports) == (0, 1, 1, (80,))
    rdp = keyed[("outbound", "203.0.113.7", "rdp")]
    assert (rdp.service_port, rdp.attempts, rdp.half_open, rdp.resets) == (3389, 1, 0, 0)
    # The peer's bytes go to one record: the inbound general one.
    assert (general.bytes_in, general.bytes_out) == (60 * 4 + 1000, 60 * 4)
    assert ssh.bytes_in == ssh.bytes_out == rdp.bytes_in == 0


def test_bytes_are_exact_sums_scaled_by_sampling_and_go_to_a_guessed_record_without_attempts() -> None:
    t = table()
    # An ssh session opened in an earlier window: no attempt now, its bytes still count, to ssh.
    t.add([received(0, ACK, dport=22, length=1500), sent(0, ACK, sport=22, length=52, rate=4)])
    # A download from a web server this host connected to earlier.
    other = ip("203.0.113.50")
    t.add([received(0, ACK, peer=other, sport=443, dport=51000, length=1400, rate=2)])
    t.add([sent(0, ACK, peer=other, sport=51000, dport=443, length=40)])
    keyed = by_key(t.collect(T0 + 10 * SEC))
    ssh = keyed[("inbound", "203.0.113.7", "ssh")]
    assert (ssh.bytes_in, ssh.bytes_out, ssh.attempts, ssh.service_port) == (1500, 208, 0, 22)
    web = keyed[("outbound", "203.0.113.50", "")]
    assert (web.bytes_in, web.bytes_out, web.attempts) == (2800, 40, 0)
    # Sampled attempts are scaled too, but not tracked as handshakes.
    t.add([received(11, SYN, rate=8), sent(11, SYN | ACK, rate=8)])
    (r,) = t.collect(T0 + 20 * SEC)
    assert (r.attempts, r.half_open, t.stats().pending) == (8, 0, 0)


def test_peers_beyond_the_bound_fold_into_one_record_per_zone_and_direction() -> None:
    t = table(max_peers=3)
    packets = []
    for i in range(10):
        packets.append(received(0, SYN, peer=ip("203.0.113.0") + 100 + i, dport=445))
        packets.append(sent(0, RST | ACK, peer=ip("203.0.113.0") + 100 + i, sport=445))
    t.add(packets)
    records = t.collect(T0 + 10 * SEC)
    assert [r.peer_addr for r in records] == ["203.0.113.100", "203.0.113.101", "203.0.113.102", "*"]
    folded = records[-1]
    assert (folded.peer_zone, folded.direction, folded.attempts, folded.resets) == ("互联网", "inbound", 7, 7)
    assert folded.bytes_in == 7 * 60 and folded.bytes_out == 7 * 60
    assert sum(r.attempts for r in records) == 10
    assert t.stats().folded == 14


def test_pending_handshakes_carry_over_and_a_full_pending_table_counts_half_open_at_once() -> None:
    t = table()
    t.add([received(9.8, SYN), sent(9.8, SYN | ACK)])  # 0.2 s before the window closes
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.half_open, t.stats().pending) == (1, 0, 1)
    assert t.collect(T0 + 20 * SEC)[0].half_open == 1  # settled in the next window, once
    assert t.stats().pending == 0

    t = table(max_pending=2)
    for i in range(4):
        t.add([received(0, SYN, sport=50000 + i), sent(0, SYN | ACK, dport=50000 + i)])
    assert t.stats().pending == 2 and t.stats().untracked == 2
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.half_open) == (4, 4)
    # Entries that timed out are pruned when the table is full, before any is counted as untracked.
    t.add([received(11, SYN, sport=1), sent(11, SYN | ACK, dport=1)])
    t.add([received(11, SYN, sport=2), sent(11, SYN | ACK, dport=2)])
    t.add([received(13, SYN, sport=3), sent(13, SYN | ACK, dport=3)])
    assert t.stats().untracked == 2 and t.stats().pending == 1


def test_horizontal_scan_counts_local_hosts() -> None:
    t = table()
    t.add([received(0, SYN, local=LOCAL, dport=445), received(0, SYN, local=LOCAL2, dport=445)])
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.distinct_hosts, r.distinct_ports) == (2, 2, 1)


def test_ipv6_peers_and_more_distinct_ports_than_the_set_holds() -> None:
    t = table()
    peer, local = ip("2001:db8::7"), ip("fd00::10")
    packets = [received(0, SYN, version=6, peer=peer, local=local, dport=port) for port in range(1024, 3024)]
    # The same 5-tuples again within the handshake timeout: retransmissions, not new attempts.
    packets += [received(0, SYN, version=6, peer=peer, local=local, dport=port) for port in range(1024, 1123)]
    packets.append(received(0, 0, proto=58, sport=1, dport=4, version=6, peer=peer, local=local))
    t.add(packets)
    keyed = by_key(t.collect(T0 + 10 * SEC))
    scan = keyed[("inbound", "2001:db8::7", "")]
    assert (scan.peer_zone, scan.local_zone) == ("互联网", "本地")
    assert (scan.attempts, scan.distinct_ports, len(scan.ports), scan.ports[0]) == (2000, 2000, 64, 1024)
    assert keyed[("outbound", "2001:db8::7", "")].icmp_unreachable == 1  # received: about our packets


def test_set_zones_applies_to_the_open_window() -> None:
    t = table()
    t.add([received(0, SYN)])
    t.set_zones(ZoneMap())
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.peer_zone, r.local_zone) == ("unknown", "unknown")


def test_a_retransmitted_syn_is_one_attempt_not_three() -> None:
    t = table()
    # A client knocking on a filtered port: its kernel sends the SYN again before the timeout.
    t.add([received(0, SYN, dport=8443), received(0.3, SYN, dport=8443), received(0.6, SYN, dport=8443)])
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.attempts, r.half_open, r.ports) == (1, 0, (8443,))


def test_fragmentation_needed_is_path_mtu_discovery_not_an_unreachable() -> None:
    t = table()
    t.add([received(0, 0, proto=1, sport=3, dport=4, length=576)])
    (r,) = t.collect(T0 + 10 * SEC)
    assert (r.icmp_unreachable, r.bytes_in) == (0, 576)

"""Packet capture: the parser on crafted frames, the sampling policy on a driven clock, then real
packets between two test hosts, with the engine running inside host B's namespace.

The engine is opened by a thread that has joined B's namespace (its socket, and the tcpdump
that compiles its filter, stay there); the test then reads it from the main thread. Traffic
comes from sockets opened the same way in A and B. Every test filters what it checks by its
own ports, because the link also carries the kernel's IPv6 multicast chatter (MLD, ND).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from testnet import Host, TestNetwork, in_netns, require_root_netns

from agent.errors import SensorError
from agent.sensors.capture import (
    DEFAULT_FILTER,
    CaptureEngine,
    PacketSummary,
    SamplingPolicy,
    available,
    compile_filter,
    parse_frame,
    parse_program,
    summarize_packets,
)

T = TypeVar("T")
SEC = 1_000_000_000
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
SMALL_RING: dict[str, Any] = {"block_size": 64 * 1024, "block_count": 8}

# --- crafted frames ------------------------------------------------------------------------------

MAC = bytes.fromhex("020000000001020000000002")
A4, B4 = "10.250.1.10", "10.250.1.11"
A6, B6 = "fd00:250:1::10", "fd00:250:1::11"


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def ethernet(ethertype: int, payload: bytes, *tags: tuple[int, int]) -> bytes:
    vlan = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)
    return MAC + vlan + struct.pack("!H", ethertype) + payload


def ipv4(
    proto: int, payload: bytes, *, options: bytes = b"", fragment: int = 0, length: int | None = None
) -> bytes:
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload) if length is None else length
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, fragment, 64, proto, 0,
        socket.inet_aton(A4), socket.inet_aton(B4),
    )  # fmt: skip
    return header + options + payload


def ipv6(next_header: int, payload: bytes, *, payload_length: int | None = None) -> bytes:
    length = len(payload) if payload_length is None else payload_length
    addresses = socket.inet_pton(socket.AF_INET6, A6) + socket.inet_pton(socket.AF_INET6, B6)
    return struct.pack("!IHBB", 0x60000000, length, next_header, 64) + addresses + payload


def udp(sport: int, dport: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp(sport: int, dport: int, flags: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 64240, 0, 0) + data


def icmp(kind: int, code: int) -> bytes:
    return struct.pack("!BBHHH", kind, code, 0, 7, 1) + b"ping"


def summary(**fields: Any) -> PacketSummary:
    base = PacketSummary(0, 4, ip(A4), ip(B4), 17, 0, 0, 0, 0, False, 1)
    return base._replace(**fields)


def test_ipv4_udp_tcp_and_icmp_frames() -> None:
    datagram = ipv4(17, udp(40000, 53, b"x" * 30))
    assert parse_frame(ethernet(0x0800, datagram), ts_ns=5 * SEC + 7) == summary(
        ts_ns=5 * SEC + 7, sport=40000, dport=53, length=20 + 8 + 30
    )
    segment = ipv4(6, tcp(40001, 22, SYN | ACK))
    assert parse_frame(ethernet(0x0800, segment), outgoing=True) == summary(
        proto=6, sport=40001, dport=22, tcp_flags=SYN | ACK, length=40, outgoing=True
    )
    # ICMP type and code travel as sport and dport, as in Zeek.
    assert parse_frame(ethernet(0x0800, ipv4(1, icmp(3, 3)))) == summary(proto=1, sport=3, dport=3, length=32)


def test_ip_options_and_vlan_tags_move_the_headers() -> None:
    with_options = ipv4(6, tcp(1, 2, RST), options=b"\x01" * 8)  # IHL 7
    assert parse_frame(ethernet(0x0800, with_options)) == summary(
        proto=6, sport=1, dport=2, tcp_flags=RST, length=28 + 20
    )
    plain = parse_frame(ethernet(0x0800, ipv4(17, udp(5, 6))))
    assert parse_frame(ethernet(0x0800, ipv4(17, udp(5, 6)), (0x8100, 42))) == plain
    assert parse_frame(ethernet(0x0800, ipv4(17, udp(5, 6)), (0x88A8, 42))) == plain


def test_ipv6_and_its_extension_headers() -> None:
    expected = summary(ip_version=6, src=ip(A6), dst=ip(B6), sport=7, dport=8, length=40 + 8)
    assert parse_frame(ethernet(0x86DD, ipv6(17, udp(7, 8)))) == expected
    hop_by_hop = struct.pack("!BB6x", 44, 0)  # 8 bytes, then a fragment header
    first_fragment = struct.pack("!BxHI", 6, 0x0001, 99)  # offset 0, more fragments
    chain = hop_by_hop + first_fragment + tcp(9, 443, SYN)
    assert parse_frame(ethernet(0x86DD, ipv6(0, chain))) == expected._replace(
        proto=6, sport=9, dport=443, tcp_flags=SYN, length=40 + len(chain)
    )
    later_fragment = struct.pack("!BxHI", 17, 185 << 3, 99) + b"rest of the datagram"
    assert parse_frame(ethernet(0x86DD, ipv6(44, later_fragment))) == expected._replace(
        sport=0, dport=0, length=40 + len(later_fragment)
    )
    authentication = struct.pack("!BB10x", 58, 1)  # AH: (1 + 2) * 4 = 12 bytes
    assert parse_frame(ethernet(0x86DD, ipv6(51, authentication + icmp(128, 0)))) == expected._replace(
        proto=58, sport=128, dport=0, length=40 + 12 + 12
    )


def test_what_the_headers_cannot_say() -> None:
    later_fragment = ipv4(17, b"middle of a datagram", fragment=0x2000 | 100)
    assert parse_frame(ethernet(0x0800, later_fragment)) == summary(length=40)
    # A GSO packet over 64 KiB has 0 in its length field: the frame's length says it instead.
    big = ipv4(6, tcp(1, 2, ACK), length=0)
    assert parse_frame(ethernet(0x0800, big), wire_length=14 + 100_000) == summary(
        proto=6, sport=1, dport=2, tcp_flags=ACK, length=100_000
    )
    # Cut short (snaplen): the IP header is enough for a summary, without ports.
    cut = ethernet(0x0800, ipv4(6, tcp(1, 2, ACK)))[: 14 + 20 + 6]
    assert parse_frame(cut, wire_length=54) == summary(proto=6, length=40)
    arp = ethernet(0x0806, bytes(28))
    truncated = ethernet(0x0800, ipv4(17, udp(1, 2)))[:30]
    not_v4 = ethernet(0x0800, b"\x65" + ipv4(17, udp(1, 2))[1:])
    assert [parse_frame(f) for f in (arp, truncated, not_v4, b"\x00" * 10)] == [None] * 4


def block_of(frames: list[bytes], pkttype: int = 0) -> bytes:
    """Records laid out as the kernel does in a TPACKET_V3 block: header, sockaddr_ll, frame at 82."""
    records = []
    for i, frame in enumerate(frames):
        size = (82 + len(frame) + 15) // 16 * 16
        next_offset = 0 if i == len(frames) - 1 else size
        header = struct.pack("=IIIIIIHH", next_offset, 100, i, len(frame), len(frame), 1, 82, 96)
        header += bytes(58 - len(header)) + bytes([pkttype])
        records.append((header + bytes(82 - len(header)) + frame).ljust(size, b"\0"))
    return b"".join(records)


def test_a_block_is_walked_and_sampled_one_in_n_across_blocks() -> None:
    frames = [ethernet(0x0800, ipv4(17, udp(1000 + i, 53))) for i in range(10)]
    out: list[PacketSummary] = []
    assert summarize_packets(block_of(frames), 0, 10, 1, 1, out) == (1, 0)
    assert [s.sport for s in out] == list(range(1000, 1010))
    assert [s.ts_ns for s in out] == [100 * SEC + i for i in range(10)]
    sampled: list[PacketSummary] = []
    countdown, _ = summarize_packets(block_of(frames), 0, 10, 4, 1, sampled)
    assert [s.sport for s in sampled] == [1000, 1004, 1008]
    assert countdown == 3  # the phase carries into the next block: packets 12 and 16 of 20 are next
    summarize_packets(block_of(frames), 0, 10, 4, countdown, sampled)
    assert [s.sport for s in sampled[3:]] == [1002, 1006]
    assert {s.sampling_rate for s in sampled} == {4}
    mixed = [ethernet(0x0806, bytes(28)), frames[0]]
    assert summarize_packets(block_of(mixed, pkttype=4), 0, 2, 1, 1, out) == (1, 1)
    assert out[-1].outgoing


# --- filters ----------------------------------------------------------------------------------


def test_compiled_programs_are_read_and_cut_at_snaplen() -> None:
    text = "4\n40 0 0 12\n21 0 1 2048\n6 0 0 262144\n6 0 0 0\n"
    assert parse_program(text, 128) == [(40, 0, 0, 12), (21, 0, 1, 2048), (6, 0, 0, 128), (6, 0, 0, 0)]
    for broken in ("", "3\n40 0 0 12\n", "1\n40 0 0\n", "x\n6 0 0 0\n"):
        with pytest.raises(SensorError, match="cannot read tcpdump's compiled filter"):
            parse_program(broken, 128)


def test_without_tcpdump_only_the_default_filter_is_available() -> None:
    program = compile_filter(DEFAULT_FILTER, "eth0", 128, tcpdump=None)
    assert program[-2:] == [(0x06, 0, 0, 128), (0x06, 0, 0, 0)]
    with pytest.raises(SensorError, match=r"'tcp port 22' needs tcpdump.*not installed"):
        compile_filter("tcp port 22", "eth0", 128, tcpdump="no-such-tcpdump")


# --- sampling policy ----------------------------------------------------------------------------


def test_sampling_doubles_on_drops_or_cpu_and_recovers_after_quiet_windows() -> None:
    policy = SamplingPolicy(cpu_budget=0.25, max_rate=8, quiet_windows=3)
    assert policy.update(0, 0, 0) == 1
    assert policy.update(1 * SEC, 5, 0) == 2  # drops
    assert policy.update(2 * SEC, 5, SEC // 2) == 4  # half a core > a quarter
    assert policy.update(3 * SEC, 9, SEC // 2) == 8
    assert policy.update(4 * SEC, 20, SEC // 2) == 8  # bounded
    # Quiet windows: no drops, little CPU. Three of them halve the rate once.
    assert [policy.update(t * SEC, 20, SEC // 2) for t in (5, 6, 7)] == [8, 8, 4]
    # 0.2 core at 1 in 4 could become 0.4 at 1 in 2: over budget, so stay.
    assert [policy.update(t * SEC, 20, SEC // 2 + (t - 7) * SEC // 5) for t in (8, 9, 10, 11)] == [4] * 4
    cpu = SEC // 2 + 4 * SEC // 5
    assert [policy.update(t * SEC, 20, cpu) for t in range(12, 18)] == [4, 4, 2, 2, 2, 1]
    with pytest.raises(SensorError):
        SamplingPolicy(max_rate=0)


def test_ring_sizes_the_kernel_would_refuse_are_explained() -> None:
    for size, message in ((5000, "multiple of the page size"), (0, "multiple of the page size")):
        with pytest.raises(SensorError, match=message):
            CaptureEngine("eth0", block_size=size)
    with pytest.raises(SensorError, match="frame size"):
        CaptureEngine("eth0", frame_size=100)
    with pytest.raises(SensorError, match="snaplen"):
        CaptureEngine("eth0", snaplen=20)
    assert available("no/such") == (False, "'no/such' is not an interface name")


# --- real packets between two test hosts ------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> Iterator[TestNetwork]:
    require_root_netns(iperf3=False)
    with TestNetwork() as network:
        a, b = network.add_host("a", "extranet"), network.add_host("b", "extranet")
        for host in (a, b):  # TCP headers are then 32 bytes after the SYNs: payload = length - 52
            host.run("sysctl", "-qw", "net.ipv4.tcp_timestamps=1")
        assert a.ping(B4) and a.ping(B6)  # neighbours resolved before any engine starts
        yield network


@pytest.fixture
def a(net: TestNetwork) -> Host:
    return net.hosts["a"]


@pytest.fixture
def b(net: TestNetwork) -> Host:
    return net.hosts["b"]


def engine_in(host: Host, **options: Any) -> CaptureEngine:
    return in_netns(host, lambda: CaptureEngine("eth0", **{**SMALL_RING, **options}))


def udp_socket(host: Host, address: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def open_bound() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(2)
        return sock

    return in_netns(host, open_bound)


def drain(engine: CaptureEngine) -> list[PacketSummary]:
    """Everything the engine will still see: read until two reads of 100 ms (2 retire periods) are empty."""
    summaries: list[PacketSummary] = []
    empty = 0
    while empty < 2:
        batch = engine.read(100)
        summaries += batch
        empty = 0 if batch else empty + 1
    return summaries


def mine(summaries: list[PacketSummary], *ports: int) -> list[PacketSummary]:
    return [s for s in summaries if s.proto in (6, 17) and (s.sport in ports or s.dport in ports)]


@pytest.mark.netns
@pytest.mark.parametrize(("src", "dst", "header"), [(A4, B4, 20 + 8), (A6, B6, 40 + 8)])
def test_datagrams_each_way_are_summarized_exactly(a: Host, b: Host, src: str, dst: str, header: int) -> None:
    sizes = [0, 1, 100, 1000, 1472 - 20 if ":" in src else 1472]
    started = time.time_ns()
    with engine_in(b) as engine, udp_socket(a, src, 41000) as sender, udp_socket(b, dst, 42000) as receiver:
        for size in sizes:
            sender.sendto(b"d" * size, (dst, 42000))
            data, peer = receiver.recvfrom(2048)
            receiver.sendto(data[:10], peer)  # a reply: B sends, so the engine sees it outgoing
            sender.recv(2048)
        summaries = mine(drain(engine), 41000)
        stats = engine.stats()
    version, s, d = (6 if ":" in src else 4), ip(src), ip(dst)
    expected = []
    for size in sizes:
        expected.append(PacketSummary(0, version, s, d, 17, 41000, 42000, 0, header + size, False, 1))
        expected.append(PacketSummary(0, version, d, s, 17, 42000, 41000, 0, header + min(size, 10), True, 1))
    assert [x._replace(ts_ns=0) for x in summaries] == expected
    assert all(started < x.ts_ns < time.time_ns() for x in summaries)
    assert [x.ts_ns for x in summaries] == sorted(x.ts_ns for x in summaries)
    assert stats.dropped == stats.sampled_out == 0 and stats.sampling_rate == 1
    # The default filter also took the link's IPv6 multicast chatter, which may still be arriving.
    assert stats.received >= stats.summarized + stats.skipped >= len(expected)


def tcp_exchange(a: Host, b: Host, server: str, payload: bytes) -> int:
    """One connection from A to B: A sends ``payload``, B echoes 100 bytes, both close; returns A's port."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET

    def listen() -> socket.socket:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((server, 43000))
        listener.listen(1)
        return listener

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            conn.sendall(received[:100])

    with in_netns(b, listen) as listener:
        thread = threading.Thread(target=serve, args=(listener,))
        thread.start()
        client = in_netns(a, lambda: socket.socket(family, socket.SOCK_STREAM))
        with client:
            client.connect((server, 43000))
            port: int = client.getsockname()[1]
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            echoed = b""
            while chunk := client.recv(65536):
                echoed += chunk
        thread.join(10)
    assert echoed == payload[:100]
    return port


@pytest.mark.netns
@pytest.mark.parametrize("server", [B4, B6])
def test_a_tcp_connection_shows_its_handshake_data_and_close(a: Host, b: Host, server: str) -> None:
    payload = os.urandom(50_000)
    with engine_in(b) as engine:
        port = tcp_exchange(a, b, server, payload)
        summaries = mine(drain(engine), 43000)
    ip_header = 40 if ":" in server else 20
    inbound = [s for s in summaries if not s.outgoing]
    outbound = [s for s in summaries if s.outgoing]
    assert {(s.sport, s.dport) for s in inbound} == {(port, 43000)}
    assert {(s.sport, s.dport) for s in outbound} == {(43000, port)}
    assert all(s.proto == 6 and s.ip_version == (6 if ":" in server else 4) for s in summaries)
    # Handshake: A's SYN in, B's SYN-ACK out, each exactly once, and first in each direction.
    assert inbound[0].tcp_flags == SYN and outbound[0].tcp_flags == SYN | ACK
    assert [s.tcp_flags & (SYN | RST) for s in summaries].count(SYN) == 2
    # Close: one FIN each way (A shut down writing; B closed after echoing), no reset.
    assert [s.tcp_flags & FIN for s in inbound].count(FIN) == 1
    assert [s.tcp_flags & FIN for s in outbound].count(FIN) == 1
    assert not any(s.tcp_flags & RST for s in summaries)
    # Lengths: IP header + 32 bytes of TCP header (timestamps) + data, so the payloads add up.
    assert sum(s.length - ip_header - 32 for s in inbound[1:]) == len(payload)
    assert sum(s.length - ip_header - 32 for s in outbound[1:]) == 100


@pytest.mark.netns
def test_pings_in_both_families(a: Host, b: Host) -> None:
    with engine_in(b) as engine:
        assert a.ping(B4, count=2) == 2
        assert a.ping(B6, count=2) == 2
        summaries = [s for s in drain(engine) if s.proto in (1, 58) and s.sport in (0, 8, 128, 129)]
    # testnet's ping sends 17 bytes of payload after the 8-byte ICMP header.
    assert [(s.ip_version, s.proto, s.sport, s.dport, s.length, s.outgoing) for s in summaries] == [
        (4, 1, 8, 0, 20 + 8 + 17, False),
        (4, 1, 0, 0, 20 + 8 + 17, True),
    ] * 2 + [
        (6, 58, 128, 0, 40 + 8 + 17, False),
        (6, 58, 129, 0, 40 + 8 + 17, True),
    ] * 2
    assert {(s.src, s.dst) for s in summaries if not s.outgoing} == {(ip(A4), ip(B4)), (ip(A6), ip(B6))}


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="custom filters are compiled by tcpdump")
def test_the_filter_runs_in_the_kernel(a: Host, b: Host) -> None:
    # The built-in program is what tcpdump compiles for the default filter.
    assert compile_filter(DEFAULT_FILTER, "eth0", 128, tcpdump=None) == in_netns(
        b, lambda: compile_filter(DEFAULT_FILTER, "eth0", 128, tcpdump="tcpdump")
    )
    with engine_in(b, filter="udp and dst port 44000") as engine, udp_socket(a, A4) as sender:
        for port in (44000, 44001, 44000, 44001, 44000):
            sender.sendto(b"f" * 20, (B4, port))
        assert a.ping(B4)
        summaries = drain(engine)
        stats = engine.stats()
    assert [(s.dport, s.length) for s in summaries] == [(44000, 48)] * 3
    assert (stats.received, stats.summarized, stats.dropped, stats.skipped) == (3, 3, 0, 0)
    with pytest.raises(SensorError, match=r"capture filter 'udp port \(': .*syntax error"):
        engine_in(b, filter="udp port (")


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


@pytest.mark.netns
def test_a_full_ring_counts_its_drops_then_sampling_starts(a: Host, b: Host) -> None:
    clock = Clock()
    # Two 4 KiB blocks hold about 50 of these datagrams; the reader does not read while 300 arrive.
    tiny = {"block_size": 4096, "block_count": 2, "filter": "udp and dst port 45000"}
    with engine_in(b, **tiny, monotonic_ns=clock) as engine, udp_socket(a, A4) as sender:
        for _ in range(300):
            sender.sendto(b"s" * 18, (B4, 45000))
        time.sleep(0.3)
        clock.now = 2 * SEC  # the policy's window ends at the next read
        first = drain(engine)
        stats = engine.stats()
        assert stats.dropped > 200 and stats.ring_full >= 1
        assert stats.received == 300 == stats.summarized + stats.dropped
        assert len(first) == stats.summarized and {s.sampling_rate for s in first} == {1}
        assert stats.sampling_rate == 2  # drops in the window: from now on 1 in 2

        for _ in range(20):
            sender.sendto(b"s" * 18, (B4, 45000))
        second = drain(engine)
        after = engine.stats()
    assert len(second) == 10 and {s.sampling_rate for s in second} == {2}
    assert after.received - stats.received == 20 and after.dropped == stats.dropped
    assert after.sampled_out == 10
    assert after.received == after.summarized + after.sampled_out + after.dropped


@pytest.mark.netns
def test_sampled_summaries_carry_their_rate_and_counts_stay_exact(a: Host, b: Host) -> None:
    policy = SamplingPolicy(rate=4, max_rate=4, quiet_windows=10**9)
    with engine_in(b, filter="udp and dst port 46000", policy=policy) as engine, udp_socket(a, A6) as sender:
        for i in range(100):
            sender.sendto(bytes(i), (B6, 46000))
        summaries = drain(engine)
        stats = engine.stats()
    assert [s.length for s in summaries] == [48 + i for i in range(0, 100, 4)]
    assert {s.sampling_rate for s in summaries} == {4}
    assert (stats.received, stats.summarized, stats.sampled_out, stats.dropped) == (100, 25, 75, 0)
    assert stats.cpu_ns > 0


@pytest.mark.netns
def test_availability_and_errors_in_words(b: Host) -> None:
    assert in_netns(b, lambda: available("eth0")) == (True, "")
    assert in_netns(b, lambda: available("eth9")) == (False, "no interface named eth9")
    with pytest.raises(SensorError, match=r"^no interface named eth9$"):
        in_netns(b, lambda: CaptureEngine("eth9"))
    if b.run("ip", "tuntap", "add", "dev", "zwtun", "mode", "tun", check=False).returncode == 0:
        ok, reason = in_netns(b, lambda: available("zwtun"))
        assert not ok and "link type 65534" in reason
    if shutil.which("setpriv"):
        # Root without CAP_NET_RAW, as a service account would be without the capability.
        program = "from agent.sensors.capture import available; print(*available('eth0'), sep='|')"
        drop = ("setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw")
        done = b.run(*drop, sys.executable, "-c", program)
        assert done.stdout.strip() == (
            "False|opening a packet socket needs CAP_NET_RAW (run as root or grant the capability)"
        )


@pytest.mark.netns
def test_an_interface_that_goes_down_pauses_and_one_that_goes_away_is_an_error(b: Host) -> None:
    b.run("ip", "link", "add", "zw0", "type", "veth", "peer", "name", "zw1")
    b.run("ip", "link", "set", "zw0", "up")
    b.run("ip", "link", "set", "zw1", "up")
    engine = in_netns(b, lambda: CaptureEngine("zw0", **SMALL_RING))
    try:
        b.run("ip", "link", "set", "zw0", "down")
        assert engine.read(100) == []
        b.run("ip", "link", "set", "zw0", "up")
        engine.read(100)
        b.run("ip", "link", "del", "zw0")
        # What the ring already holds is still delivered; the read after that says why nothing comes.
        deadline = time.monotonic() + 5
        with pytest.raises(SensorError, match=r"^capture on zw0: the interface went away$"):
            while time.monotonic() < deadline:
                engine.read(100)
    finally:
        engine.close()
    with pytest.raises(SensorError, match="closed"):
        engine.read(0)
    assert engine.stats().dropped == 0

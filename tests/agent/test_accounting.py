"""Kernel accounting per zone: the nft script against a fake nft, then real packets between namespaces.

The namespace tests build two hosts, A and B, joined by a veth pair, run the accountant
inside A (never in the host's own namespace, whose ruleset they must not touch) and
compare its counters with what the veth itself counted and with exact datagram sizes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import pytest
from testnet import in_netns

from agent.errors import SensorError
from agent.sensors.accounting import (
    UNKNOWN_ZONE,
    V4_MAX,
    V6_MAX,
    NftAccountant,
    ZoneCounters,
    ZoneDelta,
    ZoneRanges,
    ZoneTrafficSampler,
    build_script,
    check_ranges,
    complement,
    nft_runner,
    parse_counters,
)

T = TypeVar("T")


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


def span(cidr: str) -> tuple[int, int]:
    network = ipaddress.ip_network(cidr)
    return int(network.network_address), int(network.broadcast_address)


def without(cidr: str, hole: int) -> list[tuple[int, int]]:
    """The network minus one address, flattened as the collector's catalog would."""
    low, high = span(cidr)
    return [r for r in ((low, hole - 1), (hole + 1, high)) if r[0] <= r[1]]


# --- pure: ranges, names, script ---------------------------------------------------------------


def test_complement_covers_what_the_zones_leave() -> None:
    assert complement([], V4_MAX) == [(0, V4_MAX)]
    assert complement([(0, V4_MAX)], V4_MAX) == []
    assert complement([(20, 29), (5, 9), (10, 10)], 100) == [(0, 4), (11, 19), (30, 100)]
    assert complement([(0, 0), (V6_MAX, V6_MAX)], V6_MAX) == [(1, V6_MAX - 1)]


def test_catalog_errors_name_the_zones() -> None:
    with pytest.raises(SensorError, match=r"'a' and 'b' overlap at 10\.0\.0\.8"):
        check_ranges([ZoneRanges("a", [span("10.0.0.0/24")], []), ZoneRanges("b", [span("10.0.0.8/29")], [])])
    with pytest.raises(SensorError, match="reserved"):
        check_ranges([ZoneRanges(UNKNOWN_ZONE, [], [])])
    with pytest.raises(SensorError, match="twice"):
        check_ranges([ZoneRanges("a", [], []), ZoneRanges("a", [], [])])
    with pytest.raises(SensorError, match="not within"):
        check_ranges([ZoneRanges("a", [(0, V4_MAX + 1)], [])])
    # Adjacent ranges of different zones are fine: flattening produces them all the time.
    check_ranges([ZoneRanges("a", [(0, 9)], []), ZoneRanges("b", [(10, 19)], [])])


def elements(script: str, map_name: str) -> list[tuple[str, str]]:
    """(interval, counter) pairs of one map's ``add element`` line."""
    line = next(x for x in script.splitlines() if x.startswith(f"add element inet zonewatch {map_name} "))
    body = line[line.index("{") + 1 : line.rindex("}")]
    pairs = [item.split(" : ") for item in body.split(", ")]
    return [(interval.strip(), counter.strip().strip('"')) for interval, counter in pairs]


def test_script_maps_every_address_to_exactly_one_counter() -> None:
    zones = [
        ZoneRanges(
            "市公安局专网", [span("10.1.0.0/16"), (v4("10.3.0.1"), v4("10.3.0.1"))], [span("fd00:1::/32")]
        ),
        ZoneRanges("internet", [span("0.0.0.0/8")], []),
    ]
    counter_of = {UNKNOWN_ZONE: UNKNOWN_ZONE, "市公安局专网": "z0", "internet": "z1"}

    script = build_script("zonewatch", zones, counter_of)

    script.encode("ascii")  # nft object names must be ASCII; zone names stay in Python
    assert elements(script, "in4") == [
        ("0.0.0.0-0.255.255.255", "z1_in"),
        ("1.0.0.0-10.0.255.255", "unknown_in"),
        ("10.1.0.0-10.1.255.255", "z0_in"),
        ("10.2.0.0-10.3.0.0", "unknown_in"),
        ("10.3.0.1", "z0_in"),
        ("10.3.0.2-255.255.255.255", "unknown_in"),
    ]
    assert [counter for _, counter in elements(script, "out4")] == [
        "z1_out",
        "unknown_out",
        "z0_out",
        "unknown_out",
        "z0_out",
        "unknown_out",
    ]
    assert elements(script, "in6") == [
        ("::-fd00:0:ffff:ffff:ffff:ffff:ffff:ffff", "unknown_in"),
        ("fd00:1::-fd00:1:ffff:ffff:ffff:ffff:ffff:ffff", "z0_in"),
        ("fd00:2::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "unknown_in"),
    ]


def test_script_rules_count_and_never_decide() -> None:
    script = build_script("zonewatch", [], {UNKNOWN_ZONE: UNKNOWN_ZONE}, exclude_interfaces=("lo", "docker*"))
    rules = [line.split(" ", 5)[5] for line in script.splitlines() if line.startswith("add rule ")]

    assert rules == [
        'iifname { "docker*", "lo" } return',
        "counter name ip saddr map @in4",
        "counter name ip6 saddr map @in6",
        'oifname { "docker*", "lo" } return',
        "counter name ip daddr map @out4",
        "counter name ip6 daddr map @out6",
    ]
    assert elements(script, "in4") == [("0.0.0.0-255.255.255.255", "unknown_in")]
    assert "hook input priority -300; policy accept;" in script
    assert "hook output priority -300; policy accept;" in script
    assert not any(word in script for word in ("drop", "reject", "jump", "goto", "delete"))


def test_without_exclusions_there_is_no_return_rule() -> None:
    script = build_script("zonewatch", [], {UNKNOWN_ZONE: UNKNOWN_ZONE}, exclude_interfaces=())
    assert "return" not in script


class FakeNft:
    """Records nft calls; answers listings from a settable counter table."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.counters: dict[str, tuple[int, int]] = {}
        self.fail: str | None = None

    def __call__(self, args: list[str], stdin: str | None) -> str:
        self.calls.append((args, stdin))
        if self.fail is not None:
            raise SensorError(self.fail)
        if args[:3] in (["-j", "list", "counters"], ["-j", "reset", "counters"]):
            listing: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
            listing += [
                {"counter": {"family": "inet", "table": "zonewatch", "name": n, "bytes": b, "packets": p}}
                for n, (b, p) in self.counters.items()
            ]
            listing.append(
                {"counter": {"family": "inet", "table": "other", "name": "z0_in", "bytes": 1, "packets": 1}}
            )
            if args[1] == "reset":
                self.counters = dict.fromkeys(self.counters, (0, 0))
            return json.dumps({"nftables": listing})
        return ""

    @property
    def scripts(self) -> list[str]:
        return [stdin for args, stdin in self.calls if args == ["-f", "-"] and stdin is not None]


def test_first_apply_replaces_a_leftover_table_later_ones_keep_counters() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft)

    accountant.apply([ZoneRanges("a", [(1, 1)], []), ZoneRanges("b", [(2, 2)], [])])
    accountant.apply([ZoneRanges("b", [(2, 2)], []), ZoneRanges("c", [(3, 3)], [])])
    accountant.apply([ZoneRanges("a", [(1, 1)], [])])

    first, second, third = nft.scripts
    assert first.splitlines()[:3] == [
        "add table inet zonewatch",
        "delete table inet zonewatch",
        "add table inet zonewatch",
    ]
    assert "delete" not in second and "delete" not in third
    # Names are stable: b stays z1, c is new, a comes back to z0; retired b and c keep their counters.
    assert ("0.0.0.2", "z1_in") in elements(second, "in4")
    assert ("0.0.0.3", "z2_in") in elements(second, "in4")
    assert "add counter inet zonewatch z0_in" in second  # a is retired, still declared
    assert ("0.0.0.1", "z0_in") in elements(third, "in4")
    assert {"add counter inet zonewatch z1_out", "add counter inet zonewatch z2_out"} <= set(
        third.splitlines()
    )
    assert len(nft.calls) == 3  # one transaction per apply


def test_a_failed_apply_changes_nothing_we_believe() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft)
    accountant.apply([ZoneRanges("a", [(1, 1)], [])])
    nft.fail = "nft -f -: Error: Could not process rule: No buffer space available"

    with pytest.raises(SensorError, match="No buffer space"):
        accountant.apply([ZoneRanges("b", [(2, 2)], [])])

    nft.fail = None
    accountant.apply([ZoneRanges("c", [(3, 3)], [])])
    assert ("0.0.0.3", "z1_in") in elements(nft.scripts[-1], "in4")  # b's failed claim on z1 is gone
    assert "delete table" not in nft.scripts[-1]


def test_invalid_input_is_refused_before_nft_runs() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft)
    with pytest.raises(SensorError, match="interface name"):
        accountant.apply([], exclude_interfaces=['lo" accept; drop #'])
    with pytest.raises(SensorError, match="overlap"):
        accountant.apply([ZoneRanges("a", [(1, 5)], []), ZoneRanges("b", [(5, 6)], [])])
    with pytest.raises(ValueError, match="table name"):
        NftAccountant(run=nft, table="zone watch")
    assert nft.calls == []


def test_read_maps_counters_back_to_zone_names() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft)
    accountant.apply([ZoneRanges("市公安局专网", [(1, 1)], [])])
    nft.counters = {"z0_in": (1500, 3), "z0_out": (600, 2), "unknown_in": (0, 0), "unknown_out": (84, 1)}

    assert accountant.read() == {
        "市公安局专网": ZoneCounters(bytes_in=1500, bytes_out=600, packets_in=3, packets_out=2),
        UNKNOWN_ZONE: ZoneCounters(0, 84, 0, 1),
    }
    assert nft.calls[-1][0] == ["-j", "list", "counters", "table", "inet", "zonewatch"]


def test_reset_on_read_keeps_cumulative_totals() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft, reset_on_read=True)
    accountant.apply([ZoneRanges("a", [(1, 1)], [])])
    nft.counters = {"z0_in": (100, 1), "z0_out": (0, 0), "unknown_in": (0, 0), "unknown_out": (0, 0)}
    assert accountant.read()["a"] == ZoneCounters(100, 0, 1, 0)

    nft.counters["z0_in"] = (50, 1)
    assert accountant.read()["a"] == ZoneCounters(150, 0, 2, 0)
    assert nft.calls[-1][0] == ["-j", "reset", "counters", "table", "inet", "zonewatch"]


def test_read_errors_are_sensor_errors() -> None:
    nft = FakeNft()
    accountant = NftAccountant(run=nft)
    nft.fail = (
        "nft -j list counters table inet zonewatch: Error: No such file or directory\nlist counters ..."
    )
    with pytest.raises(SensorError, match=r"cannot read table inet zonewatch: .*No such file or directory$"):
        accountant.read()
    with pytest.raises(SensorError, match="cannot parse"):
        parse_counters('{"nftables": [{"counter": {"table": "zonewatch", "family": "inet"}}]}', "zonewatch")
    with pytest.raises(SensorError, match="cannot parse"):
        parse_counters("Error: JSON support not compiled-in", "zonewatch")


def test_remove_is_one_unconditional_transaction_and_the_context_manager_calls_it() -> None:
    nft = FakeNft()
    with NftAccountant(run=nft) as accountant:
        accountant.apply([])
    assert nft.scripts[-1] == "add table inet zonewatch\ndelete table inet zonewatch\n"


def test_available_reports_the_reason() -> None:
    nft = FakeNft()
    assert NftAccountant(run=nft).available() == (True, "")
    assert [args for args, _ in nft.calls] == [["-j", "list", "tables"], ["--check", "-f", "-"]]
    assert "inet zonewatch_probe" in (nft.calls[1][1] or "")

    nft.fail = (
        "nft -j list tables: netlink: Error: cache initialization failed: Operation not permitted\nmore"
    )
    ok, reason = NftAccountant(run=nft).available()
    assert not ok
    assert reason.endswith("Operation not permitted (needs root or CAP_NET_ADMIN)")

    ok, reason = NftAccountant(run=nft_runner(nft="/nonexistent/nft")).available()
    assert (ok, reason) == (False, "/nonexistent/nft not found (is nftables installed?)")


def test_runner_translates_failures() -> None:
    failing = nft_runner(nft="sh")
    with pytest.raises(SensorError, match="boom"):
        failing(["-c", "echo boom >&2; exit 3"], None)
    assert failing(["-c", "cat"], "script") == "script"
    with pytest.raises(SensorError, match="did not finish"):
        nft_runner(nft="sleep", timeout=0.05)(["5"], None)


# --- pure: deltas ---------------------------------------------------------------------------


class FakeCounters:
    def __init__(self) -> None:
        self.values: dict[str, ZoneCounters] = {}
        self.now_ns = 10**9

    def read(self) -> dict[str, ZoneCounters]:
        return dict(self.values)

    def monotonic_ns(self) -> int:
        return self.now_ns


def test_sampler_reports_deltas_for_new_and_reset_zones() -> None:
    fake = FakeCounters()
    sampler = ZoneTrafficSampler(fake.read, fake.monotonic_ns)
    fake.values = {"a": ZoneCounters(1000, 500, 10, 5), "idle": ZoneCounters(7, 7, 1, 1)}
    assert sampler.sample() == []

    fake.now_ns += 2 * 10**9
    fake.values = {
        "a": ZoneCounters(1600, 500, 14, 5),
        "idle": ZoneCounters(7, 7, 1, 1),
        "new": ZoneCounters(300, 0, 3, 0),  # created by an apply since the last reading
    }
    assert sampler.sample() == [
        ZoneDelta("a", 600, 0, 4, 0, 2000, False),
        ZoneDelta("new", 300, 0, 3, 0, 2000, False),
    ]

    fake.now_ns += 10**9
    fake.values = {"a": ZoneCounters(40, 700, 1, 7), "idle": ZoneCounters(7, 7, 1, 1)}  # table recreated
    assert sampler.sample() == [ZoneDelta("a", 40, 200, 1, 2, 1000, True)]


def test_sampler_reports_the_fraction_a_sampled_capture_saw() -> None:
    fake = FakeCounters()
    sampler = ZoneTrafficSampler(fake.read, fake.monotonic_ns)
    fake.values = {"a": ZoneCounters(1000, 0, 10, 0, 10)}
    sampler.sample()
    fake.now_ns += 10**9
    # 4 more packets seen, standing for 16: one in four was seen.
    fake.values = {"a": ZoneCounters(1400, 0, 14, 0, 26)}
    (delta,) = sampler.sample()
    assert (delta.bytes_in, delta.packets_in, delta.sampling_rate) == (400, 4, 0.25)
    fake.now_ns += 10**9
    fake.values = {"a": ZoneCounters(1500, 0, 15, 0, 27)}  # every packet seen again
    assert sampler.sample()[0].sampling_rate == 1.0


def test_sampler_can_report_idle_zones() -> None:
    fake = FakeCounters()
    fake.values = {"idle": ZoneCounters(7, 7, 1, 1)}
    sampler = ZoneTrafficSampler(fake.read, fake.monotonic_ns, include_idle=True)
    sampler.sample()
    assert sampler.sample() == [ZoneDelta("idle", 0, 0, 0, 0, 0, False)]


# --- real packets between two namespaces -------------------------------------------------------

A4, B4, A6, B6 = "10.251.0.1", "10.251.0.2", "fd00:251::1", "fd00:251::2"
SUBNET4, SUBNET6 = "10.251.0.0/24", "fd00:251::/64"
OTHER_IN_SUBNET4, OTHER_IN_SUBNET6 = "10.251.0.77", "fd00:251::77"  # nobody's; B drops them
UNZONED4, UNZONED6 = "10.252.0.9", "fd00:252::9"  # routed via B, in no zone; B drops them
B_UNZONED_SOURCE4 = "10.253.0.1"  # an address of B that is in no zone
B_UNRESOLVED4, B_UNRESOLVED6 = "10.251.0.3", "fd00:251::3"  # B's, without a static neighbour in A
LINK_LOCAL_AND_MULTICAST = "链路本地与组播"
ETHERNET_HEADER = 14
IPERF_PORT = 5201
SO_RCVBUFFORCE = 33  # Linux; Python 3.11 has no name for it


def catalog() -> list[ZoneRanges]:
    return [
        ZoneRanges("peer", [(v4(B4), v4(B4))], [(v6(B6), v6(B6))]),
        ZoneRanges("subnet", without(SUBNET4, v4(B4)), without(SUBNET6, v6(B6))),
        # Where IPv6 neighbour discovery and MLD go: they are IP, unlike ARP.
        ZoneRanges(LINK_LOCAL_AND_MULTICAST, [span("224.0.0.0/4")], [span("fe80::/10"), span("ff00::/8")]),
    ]


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def udp_socket(namespace: str, address: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def open_bound() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        # Tests send a burst before reading; the default buffer holds only ~90 datagrams.
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind((address, port))
        s.settimeout(2)
        return s

    return in_netns(namespace, open_bound)


class LinkCounters(NamedTuple):
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    tx_dropped: int


class Hosts(NamedTuple):
    a: str
    b: str

    def link(self) -> LinkCounters:
        (info,) = json.loads(sh("ip", "-n", self.a, "-j", "-s", "link", "show", "dev", "vA"))
        rx, tx = info["stats64"]["rx"], info["stats64"]["tx"]
        return LinkCounters(rx["bytes"], tx["bytes"], rx["packets"], tx["packets"], tx["dropped"])

    def nft_in_a(self) -> Callable[[list[str], str | None], str]:
        return nft_runner(["ip", "netns", "exec", self.a])


def needs_root_and_nft() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    """Namespaces A and B on a veth pair, static neighbours (no ARP or ND unless a test wants it)."""
    needs_root_and_nft()
    pair = Hosts(f"zwacctA{os.getpid()}", f"zwacctB{os.getpid()}")
    created: list[str] = []
    try:
        for namespace in pair:
            sh("ip", "netns", "add", namespace)
            created.append(namespace)
            # No router solicitations or RAs: background IPv6 noise the tests would have to explain.
            sh(
                "ip", "netns", "exec", namespace, "sysctl", "-q", "-w",
                "net.ipv6.conf.default.accept_ra=0", "net.ipv6.conf.default.router_solicitations=0",
                "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.all.forwarding=0", "net.ipv4.ip_forward=0",
            )  # fmt: skip
        a, b = pair
        sh("ip", "link", "add", "vA", "netns", a, "type", "veth", "peer", "name", "vB", "netns", b)
        for namespace, device, v4_addresses, v6_addresses in (
            (a, "vA", [A4], [A6]),
            (b, "vB", [B4, B_UNRESOLVED4, B_UNZONED_SOURCE4], [B6, B_UNRESOLVED6]),
        ):
            for address in v4_addresses:
                sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            for address in v6_addresses:
                sh("ip", "-n", namespace, "addr", "add", f"{address}/64", "dev", device, "nodad")
            sh("ip", "-n", namespace, "link", "set", device, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        mac = {
            ns: json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0]["address"]
            for ns, dev in ((a, "vA"), (b, "vB"))
        }
        for address in (B4, B6, OTHER_IN_SUBNET4, OTHER_IN_SUBNET6, B_UNZONED_SOURCE4):
            sh("ip", "-n", a, "neigh", "replace", address, "lladdr", mac[b], "dev", "vA", "nud", "permanent")
        for address in (A4, A6):
            sh("ip", "-n", b, "neigh", "replace", address, "lladdr", mac[a], "dev", "vB", "nud", "permanent")
        sh("ip", "-n", a, "route", "add", "10.252.0.0/24", "via", B4)
        sh("ip", "-n", a, "route", "add", "10.253.0.0/24", "via", B4)
        sh("ip", "-n", a, "-6", "route", "add", "fd00:252::/64", "via", B6)
        # B drops what A sends to unzoned addresses silently: without a route it would
        # answer with ICMPv6 "no route" errors, real but rate-limited and so unpredictable.
        sh("ip", "-n", b, "-6", "route", "add", "blackhole", "fd00:252::/64")
        yield pair
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=30)


@pytest.fixture
def accountant(hosts: Hosts, request: pytest.FixtureRequest) -> Iterator[NftAccountant]:
    """An accountant in A; parametrize indirectly with True for reset_on_read."""
    with NftAccountant(run=hosts.nft_in_a(), reset_on_read=getattr(request, "param", False)) as accountant:
        yield accountant


both_read_modes = pytest.mark.parametrize("accountant", [False, True], ids=["list", "reset"], indirect=True)


@pytest.fixture(scope="module")
def iperf_server(hosts: Hosts) -> Iterator[None]:
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed")
    server = subprocess.Popen(
        ["ip", "netns", "exec", hosts.b, "iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while f":{IPERF_PORT}" not in sh("ip", "netns", "exec", hosts.b, "ss", "-Hltn"):
            assert server.poll() is None, "iperf3 server exited"
            assert time.monotonic() < deadline, "iperf3 server did not listen"
            time.sleep(0.05)
        yield
    finally:
        server.terminate()  # ip netns exec execs iperf3, so this PID is iperf3's
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def iperf(hosts: Hosts, server: str, seconds: float) -> subprocess.Popen[str]:
    """An iperf3 client in A sending to and receiving from B at once (--bidir)."""
    command = ["ip", "netns", "exec", hosts.a, "iperf3", "-c", server, "-p", str(IPERF_PORT)]
    command += ["-t", str(seconds), "--bidir", "-J"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(client: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    assert client.returncode == 0, err or out
    result: dict[str, Any] = json.loads(out)
    return result


def minus(after: ZoneCounters, before: ZoneCounters | None) -> ZoneCounters:
    before = before or ZoneCounters(0, 0, 0, 0)
    return ZoneCounters(*(x - y for x, y in zip(after, before, strict=True)))


def changes(before: dict[str, ZoneCounters], after: dict[str, ZoneCounters]) -> dict[str, ZoneCounters]:
    return {zone: minus(now, before.get(zone)) for zone, now in after.items() if now != before.get(zone)}


def l3_bytes(link_bytes: int, link_packets: int) -> int:
    # The veth counts whole Ethernet frames: each packet's IP bytes plus a 14-byte header
    # (no FCS, no padding on a veth). nft counts from the IP header on, so the veth's IP
    # bytes are its byte counter minus 14 per packet. A GSO packet is one packet to both
    # (veth passes it unsegmented), with one Ethernet header, so the identity holds at 64 KiB too.
    return link_bytes - ETHERNET_HEADER * link_packets


def ratio(counted: int, expected: int) -> float:
    return counted / expected if expected else float("nan")


@pytest.mark.netns
@pytest.mark.parametrize(("server", "family"), [(B4, "IPv4"), (B6, "IPv6")])
def test_bytes_per_zone_match_the_veth(
    hosts: Hosts, iperf_server: None, accountant: NftAccountant, server: str, family: str
) -> None:
    accountant.apply(catalog())
    # Each reading of nft is bracketed by two of the link: the kernel may send a packet of its own
    # (neighbour discovery, MLD) between two reads, which would then count on one side only.
    link_before, zones_before, link_before_late = hosts.link(), accountant.read(), hosts.link()

    report = finish(iperf(hosts, server, 2))

    link_after, zones_after, link_after_late = hosts.link(), accountant.read(), hosts.link()
    link = LinkCounters(*(x - y for x, y in zip(link_after, link_before, strict=True)))
    # The most the link can have sent in nft's window, and the least.
    widest = LinkCounters(*(x - y for x, y in zip(link_after_late, link_before, strict=True)))
    narrowest = LinkCounters(*(x - y for x, y in zip(link_after, link_before_late, strict=True)))
    zones = changes(zones_before, zones_after)
    peer = zones["peer"]
    wire_out = l3_bytes(link.tx_bytes, link.tx_packets)
    wire_in = l3_bytes(link.rx_bytes, link.rx_packets)
    sent_app = report["end"]["sum_sent"]["bytes"]
    received_app = report["end"]["sum_received_bidir_reverse"]["bytes"]
    total = ZoneCounters(*(sum(column) for column in zip(*zones.values(), strict=True)))
    print(
        f"\n{family}: veth out {wire_out} B / {link.tx_packets} pkts, nft peer out {peer.bytes_out} B /"
        f" {peer.packets_out} pkts (ratio {ratio(peer.bytes_out, wire_out):.6f}); veth in {wire_in} B /"
        f" {link.rx_packets} pkts, nft peer in {peer.bytes_in} B / {peer.packets_in} pkts"
        f" (ratio {ratio(peer.bytes_in, wire_in):.6f}); iperf3 payload sent {sent_app} received"
        f" {received_app}; tx dropped {link.tx_dropped}; other zones {zones.keys() - {'peer'}};"
        f" all zones out {total.bytes_out} B / {total.packets_out} pkts,"
        f" in {total.bytes_in} B / {total.packets_in} pkts"
    )
    assert wire_out > 100_000_000 and wire_in > 100_000_000, "too little traffic to judge 0.1 %"
    assert peer.bytes_out == pytest.approx(wire_out, rel=1e-3)
    assert peer.bytes_in == pytest.approx(wire_in, rel=1e-3)
    # Summed over all zones the output hook saw exactly what the veth sent: between the two
    # there is only neighbour resolution (static here, and ARP would be missing from nft)
    # and a noqueue device. The input side may miss the odd packet the veth received but
    # the host did not take (B's MLD reports to ff02::16, which A is not listening to).
    # (Exactly, whenever nothing else was sent between the paired reads, as in most runs.)
    assert l3_bytes(narrowest.tx_bytes, narrowest.tx_packets) <= total.bytes_out
    assert total.bytes_out <= l3_bytes(widest.tx_bytes, widest.tx_packets)
    assert narrowest.tx_packets <= total.packets_out <= widest.tx_packets
    assert wire_in - 1000 < total.bytes_in <= wire_in
    assert peer.packets_out == pytest.approx(link.tx_packets, rel=1e-3)
    assert peer.packets_in == pytest.approx(link.rx_packets, rel=1e-3)
    # IP bytes include the TCP/IP headers iperf3 does not see, never less than its payload.
    assert sent_app < peer.bytes_out and received_app < peer.bytes_in
    # All the traffic was with B's own address: nothing landed in another catalog zone.
    assert not (zones.keys() & {"subnet", UNKNOWN_ZONE})


def send_and_receive(sender: socket.socket, receiver: socket.socket, count: int, payload: bytes) -> int:
    """Send ``count`` datagrams and return how many arrived."""
    address = receiver.getsockname()[:2]
    for _ in range(count):
        sender.sendto(payload, address)
    received = 0
    with contextlib.suppress(TimeoutError):
        receiver.settimeout(0.3)
        while received < count:
            receiver.recv(65536)
            received += 1
    return received


def send_only(namespace: str, destination: str, count: int, payload: bytes) -> None:
    with udp_socket(namespace, "::" if ":" in destination else "0.0.0.0") as sender:
        for _ in range(count):
            sender.sendto(payload, (destination, 9))


@pytest.mark.netns
def test_each_datagram_lands_in_its_zone_and_loopback_is_not_counted(
    hosts: Hosts, accountant: NftAccountant
) -> None:
    accountant.apply(catalog())
    payload, n = b"z" * 1000, 50
    udp4, udp6 = 8 + 20 + len(payload), 8 + 40 + len(payload)  # UDP header + IP header + payload
    before = accountant.read()

    with contextlib.ExitStack() as stack:
        sockets = {
            name: stack.enter_context(udp_socket(namespace, address, port))
            for name, namespace, address, port in (
                ("a4", hosts.a, A4, 7001),
                ("a6", hosts.a, A6, 7001),
                ("b4", hosts.b, B4, 7001),
                ("b6", hosts.b, B6, 7001),
                ("b4_unzoned", hosts.b, B_UNZONED_SOURCE4, 0),
                ("a4_self", hosts.a, A4, 0),
            )
        }
        assert send_and_receive(sockets["a4"], sockets["b4"], n, payload) == n  # peer out
        assert send_and_receive(sockets["a6"], sockets["b6"], n, payload) == n  # peer out
        assert send_and_receive(sockets["b4"], sockets["a4"], 2 * n, payload) == 2 * n  # peer in
        assert send_and_receive(sockets["b6"], sockets["a6"], 2 * n, payload) == 2 * n  # peer in
        assert send_and_receive(sockets["b4_unzoned"], sockets["a4"], 3 * n, payload) == 3 * n  # unknown in
        # A to its own address goes over lo: excluded, although A's address is in "subnet".
        assert send_and_receive(sockets["a4_self"], sockets["a4"], 5 * n, payload) == 5 * n
    send_only(hosts.a, OTHER_IN_SUBNET4, 4 * n, payload)  # subnet out
    send_only(hosts.a, OTHER_IN_SUBNET6, 4 * n, payload)  # subnet out
    send_only(hosts.a, UNZONED4, 6 * n, payload)  # unknown out
    send_only(hosts.a, UNZONED6, 6 * n, payload)  # unknown out

    zones = changes(before, accountant.read())
    zones.pop(LINK_LOCAL_AND_MULTICAST, None)  # MLD reports may come and go; not this test's concern
    assert zones == {
        "peer": ZoneCounters(
            bytes_in=2 * n * (udp4 + udp6), bytes_out=n * (udp4 + udp6), packets_in=4 * n, packets_out=2 * n
        ),
        "subnet": ZoneCounters(bytes_in=0, bytes_out=4 * n * (udp4 + udp6), packets_in=0, packets_out=8 * n),
        UNKNOWN_ZONE: ZoneCounters(
            bytes_in=3 * n * udp4, bytes_out=6 * n * (udp4 + udp6), packets_in=3 * n, packets_out=12 * n
        ),
    }


@pytest.mark.netns
def test_arp_is_invisible_but_neighbour_discovery_is_ip(hosts: Hosts, accountant: NftAccountant) -> None:
    accountant.apply(catalog())
    for address in (B_UNRESOLVED4, B_UNRESOLVED6):
        subprocess.run(
            ["ip", "-n", hosts.a, "neigh", "del", address, "dev", "vA"], capture_output=True, check=False
        )
    link_before, before = hosts.link(), accountant.read()

    with contextlib.ExitStack() as stack:
        for address in (B_UNRESOLVED4, B_UNRESOLVED6):
            receiver = stack.enter_context(udp_socket(hosts.b, address, 7005))
            sender = stack.enter_context(udp_socket(hosts.a, A4 if "." in address else A6))
            assert send_and_receive(sender, receiver, 1, b"x" * 100) == 1

    link_after, zones = hosts.link(), changes(before, accountant.read())
    tx_packets = link_after.tx_packets - link_before.tx_packets
    rx_packets = link_after.rx_packets - link_before.rx_packets
    counted_out = sum(z.packets_out for z in zones.values())
    counted_in = sum(z.packets_in for z in zones.values())
    # The veth carried an ARP request and reply that nft never saw ...
    assert (tx_packets - counted_out, rx_packets - counted_in) == (1, 1)
    # ... while the neighbour solicitation (to a solicited-node multicast address) and the
    # advertisement (from B's address) were counted like any IP packet.
    assert zones["subnet"] == ZoneCounters(
        bytes_in=72, bytes_out=128 + 148, packets_in=1, packets_out=2
    )  # in: NA with target link-layer option; out: the two datagrams
    assert zones[LINK_LOCAL_AND_MULTICAST].packets_out >= 1  # the NS (plus any MLD report)


@pytest.mark.netns
@both_read_modes
def test_a_catalog_update_under_load_loses_no_bytes(
    hosts: Hosts, iperf_server: None, accountant: NftAccountant
) -> None:
    old = catalog()
    # The new catalog moves B's IPv4 address into a new zone, splits "subnet", and drops
    # the link-local zone; "peer" keeps counting IPv6 only.
    new = [
        ZoneRanges("peer", [], [(v6(B6), v6(B6))]),
        ZoneRanges("b-moved", [(v4(B4), v4(B4))], []),
        ZoneRanges("subnet-low", [span("10.251.0.0/31")], []),
        ZoneRanges("subnet-high", without(SUBNET4, v4(B4))[1:], without(SUBNET6, v6(B6))),
    ]
    accountant.apply(old)
    sampler = ZoneTrafficSampler(accountant.read)
    link_before = hosts.link()
    sampler.sample()

    client = iperf(hosts, B4, 1.5)
    deltas: list[ZoneDelta] = []
    apply_seconds = []
    try:
        for step in range(10):
            time.sleep(0.1)
            started = time.perf_counter()
            accountant.apply(new if step % 2 == 0 else old)
            apply_seconds.append(time.perf_counter() - started)
            deltas += sampler.sample()
    finally:
        finish(client)
    deltas += sampler.sample()
    link = hosts.link()

    out = sum(d.bytes_out for d in deltas)
    received = sum(d.bytes_in for d in deltas)
    wire_out = l3_bytes(link.tx_bytes - link_before.tx_bytes, link.tx_packets - link_before.tx_packets)
    wire_in = l3_bytes(link.rx_bytes - link_before.rx_bytes, link.rx_packets - link_before.rx_packets)
    moved = sum(d.bytes_out for d in deltas if d.zone == "b-moved")
    print(
        f"\nupdate under load ({'reset' if accountant.reset_on_read else 'list'}): sum of deltas out {out}"
        f" vs veth {wire_out} (ratio {ratio(out, wire_out):.6f}),"
        f" in {received} vs {wire_in} (ratio {ratio(received, wire_in):.6f}); b-moved carried {moved} B;"
        f" apply took {min(apply_seconds) * 1000:.0f}-{max(apply_seconds) * 1000:.0f} ms"
    )
    assert not any(d.counter_reset for d in deltas)
    assert wire_out > 100_000_000
    assert 0 < moved < out  # B's traffic really changed zones mid-flow
    assert out == pytest.approx(wire_out, rel=1e-3)
    assert received == pytest.approx(wire_in, rel=1e-3)


@pytest.mark.netns
def test_other_tables_still_drop(hosts: Hosts, accountant: NftAccountant) -> None:
    blocker = (
        "table inet zwtest_blocker {\n"
        "  chain input { type filter hook input priority 0; policy accept; udp dport 7002 drop; }\n"
        "}\n"
    )
    run = hosts.nft_in_a()
    run(["-f", "-"], blocker)
    try:
        accountant.apply(catalog())
        before = accountant.read()
        with (
            udp_socket(hosts.a, A4, 7002) as blocked,
            udp_socket(hosts.a, A4, 7003) as open_port,
            udp_socket(hosts.b, B4) as sender,
        ):
            assert send_and_receive(sender, blocked, 20, b"b" * 100) == 0
            assert send_and_receive(sender, open_port, 20, b"o" * 100) == 20
        peer = changes(before, accountant.read())["peer"]
        # Counted on arrival (priority -300), before the other table's drop at priority 0.
        assert peer.packets_in == 40
        accountant.remove()
        assert "drop" in run(["list", "table", "inet", "zwtest_blocker"], None)
    finally:
        run(["-f", "-"], "add table inet zwtest_blocker\ndelete table inet zwtest_blocker\n")


@pytest.mark.netns
def test_remove_leaves_no_table_and_a_leftover_is_replaced(hosts: Hosts) -> None:
    run = hosts.nft_in_a()
    # What a crashed run might leave: a chain that counts everything, a stale counter.
    run(
        ["-f", "-"],
        "table inet zonewatch {\n"
        "  counter z0_in { packets 5 bytes 500 }\n"
        "  chain stale { type filter hook input priority 0; policy accept; counter; }\n"
        "}\n",
    )
    with NftAccountant(run=run) as accountant:
        assert accountant.available() == (True, "")
        accountant.apply(catalog())
        listing = run(["list", "table", "inet", "zonewatch"], None)
        assert "stale" not in listing
        assert accountant.read()["peer"] == ZoneCounters(0, 0, 0, 0)
    assert "zonewatch" not in run(["list", "tables"], None)
    NftAccountant(run=run).remove()  # nothing to delete: still fine


@pytest.mark.netns
@both_read_modes
def test_a_table_deleted_by_an_administrator(hosts: Hosts, accountant: NftAccountant) -> None:
    accountant.apply(catalog())
    sampler = ZoneTrafficSampler(accountant.read)
    with udp_socket(hosts.a, A4) as sender, udp_socket(hosts.b, B4, 7006) as receiver:
        sampler.sample()
        assert send_and_receive(sender, receiver, 2, b"x" * 100) == 2
        assert [d.packets_out for d in sampler.sample() if d.zone == "peer"] == [2]

        hosts.nft_in_a()(["delete", "table", "inet", "zonewatch"], None)
        with pytest.raises(SensorError, match="cannot read table inet zonewatch"):
            accountant.read()
        accountant.apply(catalog())
        assert send_and_receive(sender, receiver, 1, b"x" * 100) == 1
        peer = [d for d in sampler.sample() if d.zone == "peer"]
    # Either way the datagram is reported; only list readings went backwards.
    reset = not accountant.reset_on_read
    assert peer == [ZoneDelta("peer", 0, 128, 0, 1, peer[0].interval_ms, counter_reset=reset)]


@pytest.mark.netns
def test_available_without_cap_net_admin(hosts: Hosts) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    unprivileged = [
        "ip",
        "netns",
        "exec",
        hosts.a,
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    unprivileged += ["--inh-caps=-all", "--bounding-set=-all"]
    ok, reason = NftAccountant(run=nft_runner(unprivileged)).available()
    print(f"\nunprivileged: {reason}")
    assert not ok
    assert "Operation not permitted" in reason


def big_catalog(zones: int = 500, ranges_per_family: int = 8) -> list[ZoneRanges]:
    result, address = [], v4("10.0.0.0")
    for i in range(zones):
        ranges4, ranges6 = [], []
        for j in range(ranges_per_family):
            size = (16, 64, 256, 1024)[(i + j) % 4]
            ranges4.append((address, address + size - 1))
            address += size + (256 if j % 3 == 0 else 0)  # some gaps, some adjacent ranges
            base = v6("fd00::") + (i << 80) + (j << 64)
            ranges6.append((base, base + 2**64 - 1))
        result.append(ZoneRanges(f"部门-{i}", ranges4, ranges6))
    return result


@pytest.mark.netns
def test_five_hundred_zones_apply_in_under_a_second(hosts: Hosts) -> None:
    zones = big_catalog()
    timings: dict[str, float] = {}
    for reset_on_read in (False, True):
        with NftAccountant(run=hosts.nft_in_a(), reset_on_read=reset_on_read) as accountant:
            started = time.perf_counter()
            accountant.apply(zones)
            timings["first apply"] = time.perf_counter() - started
            started = time.perf_counter()
            accountant.apply(zones[3:] + big_catalog(503)[500:])
            timings["update"] = time.perf_counter() - started
            started = time.perf_counter()
            readings = accountant.read()
            timings["read, reset" if reset_on_read else "read, list"] = time.perf_counter() - started
            assert len(readings) == 504
    ranges = sum(len(z.v4) + len(z.v6) for z in zones)
    print(f"\n500 zones, {ranges} ranges: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert timings["first apply"] < 1.0
    assert timings["update"] < 1.0
    assert timings["read, reset"] < 0.1

"""The test network itself: hosts reach each other as a real network would, and nothing outlives it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testnet import (
    FAMILY,
    NETNS_DIR,
    SUBNETS,
    TestNetError,
    TestNetwork,
    iperf3,
    require_root_netns,
    tcp_transfer,
)

pytestmark = pytest.mark.netns

MB = 1_000_000


@pytest.fixture
def net() -> Iterator[TestNetwork]:
    require_root_netns()
    with TestNetwork() as network:
        yield network


def namespaces_with(prefix: str) -> list[str]:
    return [ns for ns in os.listdir(NETNS_DIR) if ns.startswith(prefix)] if NETNS_DIR.exists() else []


def running(pid: int) -> bool:
    """True while `pid` is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_hosts_get_addresses_in_order_and_routes_via_the_router_of_their_first_subnet(
    net: TestNetwork,
) -> None:
    web = net.add_host("web", "extranet")
    gw = net.add_host("gw", "dedicated", "internet")
    assert (web.addr4, web.addr6) == ({"extranet": "10.250.1.10"}, {"extranet": "fd00:250:1::10"})
    assert gw.interfaces == {"dedicated": "eth0", "internet": "eth1"}
    assert gw.addr4 == {"dedicated": "10.250.2.10", "internet": "198.51.100.10"}
    assert net.router.addr6["internet"] == "2001:db8:100::1"
    assert all(ns.startswith(net.prefix + "-") for ns in net.namespaces)
    assert web.route("192.0.2.1").gateway == "10.250.1.1"  # default route; the address is never sent to
    assert gw.route("2001:db8:ffff::1").gateway == "fd00:250:2::1"


def test_ping_on_one_subnet_and_across_the_router_in_both_families(net: TestNetwork) -> None:
    a = net.add_host("a", "extranet")
    b = net.add_host("b", "extranet")
    far = net.add_host("far", "internet")
    for subnet_peer, across in ((b, False), (far, True)):
        subnet = next(iter(subnet_peer.interfaces))
        for address in (subnet_peer.addr4[subnet], subnet_peer.addr6[subnet]):
            assert a.ping(address) == 1, f"a cannot reach {address}"
            assert (a.route(address).gateway is not None) == across
    assert far.ping(a.addr6["extranet"]) == 1
    assert a.ping("10.250.2.99", timeout=0.3) == 0  # a free address on a subnet: nobody answers


def test_multi_homed_host_reaches_each_subnet_through_its_own_interface(net: TestNetwork) -> None:
    gw = net.add_host("gw", "extranet", "dedicated")
    ext = net.add_host("ext", "extranet")
    ded = net.add_host("ded", "dedicated")
    for ipv6 in (False, True):
        assert gw.route(ext.address("extranet", ipv6)).dev == "eth0"
        route = gw.route(ded.address("dedicated", ipv6))
        assert (route.dev, route.gateway) == ("eth1", None)  # directly, not through the router
        assert gw.ping(ded.address("dedicated", ipv6)) == 1
    eth0, eth1 = gw.iface_counters("eth0"), gw.iface_counters("eth1")
    sent = tcp_transfer(ded, gw, "dedicated", 2 * MB)
    assert sent.bytes_sent == sent.bytes_received == 2 * MB
    grew0 = gw.iface_counters("eth0")["tx_bytes"] - eth0["tx_bytes"]
    grew1 = gw.iface_counters("eth1")["tx_bytes"] - eth1["tx_bytes"]
    assert grew1 >= 2 * MB and grew0 < 100_000


@pytest.mark.parametrize(
    ("ipv6", "reverse", "across"),
    [(False, False, False), (True, False, False), (False, True, True)],
    ids=["v4", "v6", "v4-reverse-across-router"],
)
def test_iperf3_moves_data_and_interface_counters_grow_by_as_much(
    net: TestNetwork, ipv6: bool, reverse: bool, across: bool
) -> None:
    server = net.add_host("server", "extranet")
    client = net.add_host("client", "internet" if across else "extranet")
    before = {h: h.iface_counters("eth0") for h in (server, client)}
    result = iperf3(server, client, "extranet", seconds=1, ipv6=ipv6, reverse=reverse)
    after = {h: h.iface_counters("eth0") for h in (server, client)}
    grew = {h: {k: after[h][k] - before[h][k] for k in before[h]} for h in before}
    sender, receiver = (server, client) if reverse else (client, server)
    assert result.bytes_received > 10 * MB and result.seconds > 0.5
    assert result.bytes_sent >= result.bytes_received
    # What was received crossed both interfaces, headers on top. Not so for bytes_sent: part of it may still
    # sit in the sender's socket buffer when iperf3 stops counting.
    assert grew[sender]["tx_bytes"] >= result.bytes_received
    assert grew[receiver]["rx_bytes"] >= result.bytes_received
    assert grew[receiver]["rx_packets"] > 0 and grew[sender]["tx_packets"] > 0
    left = subprocess.run(["ip", "netns", "pids", server.ns], capture_output=True, text=True, check=True)
    assert left.stdout == "", "the iperf3 server outlived its run"


def test_teardown_stops_every_process_and_deletes_every_namespace_even_when_the_test_fails() -> None:
    require_root_netns()
    with pytest.raises(RuntimeError, match="the test failed"), TestNetwork() as net:
        host = net.add_host("h", "extranet", "dedicated")
        tracked = host.popen("sleep", "60")
        # A process the library did not start itself (a shell's background job) goes too.
        stray = int(host.run("sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!").stdout)
        prefix, created = net.prefix, list(net.namespaces)
        assert sorted(namespaces_with(prefix)) == sorted(created) and len(created) == 2
        raise RuntimeError("the test failed")
    assert namespaces_with(prefix) == []
    assert tracked.returncode is not None
    deadline = time.monotonic() + 2
    while running(stray) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running(stray)
    net.close()  # closing again is harmless


def test_two_networks_at_once_share_names_and_addresses_without_seeing_each_other() -> None:
    require_root_netns()
    with TestNetwork() as one, TestNetwork() as two:
        assert one.prefix != two.prefix
        a1, b1 = one.add_host("a", "extranet"), one.add_host("b", "extranet")
        a2 = two.add_host("a", "extranet")
        assert a1.addr4 == a2.addr4 and a1.ns != a2.ns
        assert a1.ping(b1.addr4["extranet"]) == 1
        assert a2.ping(b1.addr4["extranet"], timeout=0.3) == 0  # .11 exists only in the other network
        assert a2.ping(two.router.addr4["extranet"]) == 1
    assert namespaces_with(one.prefix) == namespaces_with(two.prefix) == []


def test_namespaces_left_by_a_crashed_run_are_swept_and_live_ones_kept() -> None:
    require_root_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"{FAMILY}{dead.pid}-abcdef-router"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with TestNetwork() as alive, TestNetwork() as sweeper:
            assert leftover not in os.listdir(NETNS_DIR)
            assert namespaces_with(alive.prefix) and namespaces_with(sweeper.prefix)
    finally:
        if leftover in os.listdir(NETNS_DIR):
            subprocess.run(["ip", "netns", "del", leftover], check=False)


def test_bad_requests_fail_before_anything_is_built(net: TestNetwork) -> None:
    net.add_host("a", "extranet")
    with pytest.raises(ValueError, match="taken"):
        net.add_host("a", "dedicated")
    with pytest.raises(ValueError, match="subnets"):
        net.add_host("b", "intranet")
    with pytest.raises(ValueError, match="whole seconds"):
        iperf3(net.hosts["a"], net.hosts["a"], "extranet", seconds=0.5)
    assert set(SUBNETS) == {"extranet", "dedicated", "internet"}
    assert len(net.namespaces) == 2


def test_without_root_the_tests_skip_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        require_root_netns()
    with pytest.raises(TestNetError, match="not started"):
        TestNetwork().router  # noqa: B018

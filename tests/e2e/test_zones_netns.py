"""The story a network admin tells: the collector owns the zone catalog; an agent on a host that is
on both the extranet and a dedicated network counts every byte per zone; the counts equal what the
host's interfaces carried; and a catalog edit reaches the running agent."""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_json
from fleet import enroll, next_tick, start_collector
from testnet import ROOT, ZONE_CATALOG, TestNetwork, require_root_netns

pytestmark = pytest.mark.netns

ETHERNET_HEADER = 14  # veth counters count it; nftables counts IP bytes


def zone_totals(db: Path, after: int, upto: int) -> dict[str, tuple[int, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT zone, sum(bytes_in), sum(bytes_out) FROM zone_traffic"
            " WHERE time_ms > ? AND time_ms <= ? GROUP BY zone",
            (after, upto),
        ).fetchall()
    finally:
        con.close()
    return {zone: (int(b_in), int(b_out)) for zone, b_in, b_out in rows}


def l3_bytes(counters: dict[str, int], before: dict[str, int], direction: str) -> int:
    """IP bytes the interface carried: frames minus their Ethernet headers."""
    frames = counters[f"{direction}_bytes"] - before[f"{direction}_bytes"]
    packets = counters[f"{direction}_packets"] - before[f"{direction}_packets"]
    return frames - ETHERNET_HEADER * packets


def test_bytes_per_zone_equal_the_interfaces_and_a_catalog_edit_reaches_the_agent(tmp_path: Path) -> None:
    require_root_netns()
    db = tmp_path / "collector.db"
    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        host = net.add_host("agent", "extranet", "dedicated")  # still on its old dedicated network
        peer_extranet = net.add_host("pext", "extranet")
        peer_dedicated = net.add_host("pded", "dedicated")
        peer_internet = net.add_host("pnet", "internet")
        collector, listen = start_collector(central, db, zones, tls=True)
        # Enrolled with a token: every report after this is mTLS, the labels come from the token.
        enroll(
            host, central, db, listen, tmp_path / "agent", "ga-ws-01", department="市公安局", county="高新区"
        )
        agent = host.popen(
            sys.executable, "-m", "agent", "run", "--interval", "1",
            "--state-dir", str(tmp_path / "agent"), "--hostname", "ga-ws-01",
        )  # fmt: skip
        first = next_tick(db, 0, timeout=30)
        # Align on a tick: read the interfaces right after the agent read its counters.
        t0 = next_tick(db, first)
        eth = host.interfaces
        before = {s: host.iface_counters(eth[s]) for s in ("extranet", "dedicated")}
        net.iperf3(peer_extranet, host, "extranet", seconds=2)  # host sends to the extranet
        net.iperf3(peer_dedicated, host, "dedicated", seconds=2, ipv6=True)  # ... and the dedicated network
        net.iperf3(peer_internet, host, "internet", seconds=2, reverse=True)  # the internet sends to the host
        time.sleep(2.5)  # let the last bytes fall into a tick
        t1 = next_tick(db, next_tick(db, t0))
        after = {s: host.iface_counters(eth[s]) for s in ("extranet", "dedicated")}
        counted = zone_totals(db, t0, t1)

        # The dedicated interface carries only the dedicated zone.
        ded_in, ded_out = counted["公安专网"]
        assert ded_out == pytest.approx(l3_bytes(after["dedicated"], before["dedicated"], "tx"), rel=1e-3)
        assert ded_in == pytest.approx(l3_bytes(after["dedicated"], before["dedicated"], "rx"), rel=1e-3)
        assert ded_out > 50_000_000, "the iperf3 run should have moved real volume"
        # The extranet interface carries the extranet zone and, through the router, the internet.
        ext_in, ext_out = counted["市级横向外网"]
        net_in, net_out = counted["互联网"]
        assert ext_out + net_out == pytest.approx(
            l3_bytes(after["extranet"], before["extranet"], "tx"), rel=1e-3
        )
        assert ext_in + net_in == pytest.approx(
            l3_bytes(after["extranet"], before["extranet"], "rx"), rel=1e-3
        )
        assert net_in > 50_000_000 and ext_out > 50_000_000

        # The operator's view: the dedicated network is still in use by this department.
        by_department = cli_json("zonewatch-collector", "traffic", "--db", str(db), "--by", "department",
                                 "--zone", "公安专网", "--since", "10m")  # fmt: skip
        assert [row["group"] for row in by_department] == ["市公安局"]

        # A catalog edit reaches the running agent: the peer's /32 becomes a zone of its own.
        peer = peer_dedicated.addr4["dedicated"]
        new_zone = (
            f"  - name: 公安数据中心\n    kind: dedicated\n    department: 市公安局\n    cidrs: [{peer}/32]\n"
        )
        zones.write_text(ZONE_CATALOG + new_zone, encoding="utf-8")
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while "公安数据中心" not in seen and time.monotonic() < deadline:
            host.ping(peer, count=3, timeout=0.5)
            seen = set(zone_totals(db, t1, 2**62))
        assert "公安数据中心" in seen, f"the new zone never reached the agent (saw {sorted(seen)})"

        assert "table inet zonewatch" in host.run("nft", "list", "tables").stdout
        agent.terminate()
        assert agent.wait(20) == 0
        # The agent removed its table on exit: the host's ruleset is as it found it.
        assert "zonewatch" not in host.run("nft", "list", "tables").stdout
        collector.terminate()
        assert collector.wait(20) == 0


def test_without_nftables_the_capture_counts_every_byte_per_zone(tmp_path: Path) -> None:
    """A host whose nft is missing: the agent says so, counts from its packet capture instead,
    and the counts still equal what the interfaces carried, over IPv4 and IPv6."""
    require_root_netns()
    db = tmp_path / "collector.db"
    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    # A PATH with `ip` (to enter the namespace) and nothing else: no nft, no tcpdump.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ip = shutil.which("ip")
    assert ip is not None
    (bin_dir / "ip").symlink_to(ip)
    env = {**os.environ, "PATH": str(bin_dir), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        host = net.add_host("agent", "extranet", "dedicated")
        peer_extranet = net.add_host("pext", "extranet")
        peer_dedicated = net.add_host("pded", "dedicated")
        collector, listen = start_collector(central, db, zones)
        agent = host.popen(
            sys.executable, "-m", "agent.cli", "run", "--collector", listen, "--interval", "1",
            "--state-dir", str(tmp_path / "agent"), "--hostname", "no-nft-01", "--insecure", env=env,
        )  # fmt: skip
        first = next_tick(db, 0, timeout=30)
        t0 = next_tick(db, first)
        eth = host.interfaces
        before = {s: host.iface_counters(eth[s]) for s in ("extranet", "dedicated")}
        net.iperf3(host, peer_dedicated, "dedicated", seconds=2, ipv6=True)  # the dedicated network sends
        net.iperf3(peer_extranet, host, "extranet", seconds=2)  # the host sends to the extranet
        time.sleep(2.5)
        t1 = next_tick(db, next_tick(db, t0))
        after = {s: host.iface_counters(eth[s]) for s in ("extranet", "dedicated")}
        counted = zone_totals(db, t0, t1)
        ded_in, ded_out = counted["公安专网"]
        ext_in, ext_out = counted["市级横向外网"]
        assert ded_in > 50_000_000 and ext_out > 50_000_000, "the iperf3 runs should have moved real volume"
        assert ded_in == pytest.approx(l3_bytes(after["dedicated"], before["dedicated"], "rx"), rel=1e-3)
        assert ded_out == pytest.approx(l3_bytes(after["dedicated"], before["dedicated"], "tx"), rel=1e-3)
        assert ext_out == pytest.approx(l3_bytes(after["extranet"], before["extranet"], "tx"), rel=1e-3)
        assert ext_in == pytest.approx(l3_bytes(after["extranet"], before["extranet"], "rx"), rel=1e-3)

        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            methods = {
                m for (m,) in con.execute("SELECT DISTINCT method FROM zone_traffic WHERE time_ms > ?", (t0,))
            }
        finally:
            con.close()
        assert methods == {"capture"}
        (row,) = [
            r
            for r in cli_json("zonewatch-collector", "agents", "--db", str(db))
            if r["hostname"] == "no-nft-01"
        ]
        # The agents view lists the fallback with its reason.
        # (Beside it, once judged, the budget: over its RSS figure on this build, see README.)
        assert "zone_accounting: fallback: capture on eth" in row["sensors"], row
        assert "(nftables unavailable: nft not found (is nftables installed?))" in row["sensors"], row
        agent.terminate()
        assert agent.wait(20) == 0
        collector.terminate()
        assert collector.wait(20) == 0


SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = server.accept()
while conn.recv(65536):
    pass
"""
LEGACY_CLIENT = """
import socket, sys, time
# A legacy application that still talks to the dedicated network over a long-lived connection.
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
conn.sendall(b"x" * 200_000)
time.sleep(30)
"""


def test_flows_name_the_program_still_using_the_dedicated_network(tmp_path: Path) -> None:
    require_root_netns()
    db = tmp_path / "collector.db"
    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    client = tmp_path / "ga_legacy_client.py"
    client.write_text(LEGACY_CLIENT, encoding="utf-8")
    config = tmp_path / "agent.toml"
    config.write_text(
        'interval = 1\nflow_idle_timeout = 2\n[labels]\ndepartment = "市公安局"\n', encoding="utf-8"
    )
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        host = net.add_host("agent", "extranet", "dedicated")
        peer = net.add_host("pded", "dedicated")
        _, listen = start_collector(central, db, zones)
        agent = host.popen(
            sys.executable, "-m", "agent.cli", "run", "--insecure", "--config", str(config),
            "--collector", listen, "--state-dir", str(tmp_path / "agent"), "--hostname", "ga-ws-02",
        )  # fmt: skip
        next_tick(db, 0, timeout=30)  # the agent runs, with the catalog
        server = peer.addr4["dedicated"]
        peer.python_popen("-c", SINK, server, "9443")
        time.sleep(0.5)
        host.python_popen(str(client), server, "9443")
        found: list[dict[str, object]] = []
        deadline = time.monotonic() + 40
        while not found and time.monotonic() < deadline:
            time.sleep(1)
            rows = cli_json(
                "zonewatch-collector", "flows", "--db", str(db), "--zone", "公安专网", "--since", "10m"
            )
            found = [r for r in rows if r["remote_port"] == 9443]
        assert found, "no flow to the dedicated network was reported"
        (flow,) = found
        # The planner's answer: which program on which host still uses the dedicated network, and how much.
        assert flow["hostname"] == "ga-ws-02"
        assert "python" in str(flow["process"])
        assert flow["remote_addr"] == server and flow["ip_protocol"] == 6
        assert int(flow["bytes_out"]) >= 200_000  # type: ignore[call-overload]
        agent.terminate()
        assert agent.wait(20) == 0

"""The lean socket table (agent.sensors.sockets) against psutil, on real sockets of this process."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import psutil

from agent.aggregate.flows import TCP, FlowTable, ProcessRef, SocketOwners
from agent.sensors.sockets import Address, Connection, SocketTable
from agent.zonemap import ZoneMap


def _mine(rows: list[Connection], pid: int) -> set[tuple[object, ...]]:
    return {
        (r.type, tuple(r.laddr), tuple(r.raddr), r.status == psutil.CONN_LISTEN) for r in rows if r.pid == pid
    }


def test_it_finds_what_psutil_finds_for_this_process_and_walks_fds_only_for_new_sockets() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    table = SocketTable()
    try:
        rows = table()
        expected = {
            (int(c.type), tuple(c.laddr), tuple(c.raddr), c.status == psutil.CONN_LISTEN)
            for c in psutil.net_connections(kind="inet")
            if c.pid == os.getpid()
        }
        assert _mine(rows, os.getpid()) == expected
        assert len(expected) == 4  # listener, both ends, the UDP socket
        by_inode = {r.inode: r for r in rows}
        listener = by_inode[os.fstat(server.fileno()).st_ino]
        assert listener.status == "LISTEN" and listener.raddr == () and listener.pid == os.getpid()
        assert by_inode[os.fstat(udp.fileno()).st_ino].laddr == ("::1", udp.getsockname()[1])
        assert table.scans == 1
        table()
        assert table.scans == 1, "owners already known were looked up again"
        extra = socket.create_connection(server.getsockname())
        try:
            rows = table()
            assert table.scans == 2
            assert by_inode.keys() < {r.inode for r in rows}
            row = next(r for r in rows if r.inode == os.fstat(extra.fileno()).st_ino)
            assert row.pid == os.getpid() and row.laddr == extra.getsockname()
        finally:
            extra.close()
    finally:
        for s in (client, accepted, server, udp):
            s.close()


def test_a_socket_whose_owner_is_gone_is_remembered_as_ownerless(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    row = (
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n"
    )
    (net / "tcp").write_text(header + row)
    (net / "udp").write_text(header)
    table = SocketTable(proc=str(tmp_path))
    (conn,) = table()
    assert conn.laddr == ("127.0.0.1", 8080) and conn.status == "LISTEN" and conn.pid is None
    table()
    assert table.scans == 1


def test_two_sockets_sharing_a_local_port_towards_different_peers_are_told_apart() -> None:
    # Linux lets connect() reuse a local port towards another peer: the local end alone is ambiguous.
    rows = [
        Connection(1, Address("10.250.1.10", 40000), Address("10.250.2.20", 443), 101, "", 1),
        Connection(1, Address("10.250.1.10", 40000), Address("10.250.2.30", 443), 202, "", 2),
    ]
    owners = SocketOwners(lambda: rows, describe=lambda pid: ProcessRef(pid, f"p{pid}", "root", ""))
    table = FlowTable(ZoneMap())
    local, peer = int(ipaddress.IPv4Address("10.250.1.10")), int(ipaddress.IPv4Address("10.250.2.20"))
    syn = SimpleNamespace(ts_ns=10**9, ip_version=4, src=local, dst=peer, proto=TCP, sport=40000, dport=443,
                          tcp_flags=0x02, length=60, outgoing=True, sampling_rate=1)  # fmt: skip
    table.add([syn])
    (flow,) = table.flush(owners)
    assert flow.process is not None and flow.process.pid == 101

"""Listening sockets against the real kernel: this test's own sockets are seen opening and closing,
with this process as their owner, over IPv4 and IPv6, and nothing is reported twice."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import SensorError
from agent.sensors.listeners import ListenerEvent, ListenerSensor


def ours(events: list[ListenerEvent], port: int) -> list[tuple[str, str, str, int]]:
    return [(e.change, e.protocol, e.local_addr, e.local_port) for e in events if e.local_port == port]


@pytest.fixture
def sensor() -> Iterator[ListenerSensor]:
    s = ListenerSensor()
    s.poll()  # the full listing: what this host listens on before the test's sockets
    yield s


def test_a_tcp_and_a_udp_listener_open_and_close_with_their_process(sensor: ListenerSensor) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    # A connected UDP socket and an accepted TCP connection are not listeners.
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(("127.0.0.1", udp_port))
    conn = socket.create_connection(("127.0.0.1", tcp_port))
    accepted, _ = tcp.accept()
    try:
        events = sensor.poll()
        assert ours(events, tcp_port) == [("opened", "tcp", "127.0.0.1", tcp_port)]
        assert ours(events, udp_port) == [("opened", "udp", "127.0.0.1", udp_port)]
        assert ours(events, client.getsockname()[1]) == []
        for event in events:
            if event.local_port in (tcp_port, udp_port):
                assert event.process is not None and event.process.pid == os.getpid()
                assert event.process.name and event.process.user
                assert "pytest" in event.process.cmdline or "python" in event.process.cmdline
        scans = sensor.scans
        assert ours(sensor.poll(), tcp_port) == [] and ours(sensor.poll(), udp_port) == []
        assert sensor.scans == scans, "nothing new: no /proc/[pid]/fd scan"
    finally:
        for s in (accepted, conn, client, tcp, udp):
            s.close()
    events = sensor.poll()
    assert ours(events, tcp_port) == [("closed", "tcp", "127.0.0.1", tcp_port)]
    assert ours(events, udp_port) == [("closed", "udp", "127.0.0.1", udp_port)]
    (closed,) = [e for e in events if e.local_port == tcp_port]
    assert closed.process is not None and closed.process.pid == os.getpid()  # as it was when opened
    assert ours(sensor.poll(), tcp_port) == []


def test_ipv6_listeners(sensor: ListenerSensor) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/tcp6").exists():
        pytest.skip("no IPv6 in this kernel")
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        tcp.bind(("::1", 0))
    except OSError:
        tcp.close()
        pytest.skip("no ::1 on this host")
    tcp.listen()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::", 0))
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    try:
        events = sensor.poll()
        assert ours(events, tcp_port) == [("opened", "tcp", "::1", tcp_port)]
        assert ours(events, udp_port) == [("opened", "udp", "::", udp_port)]
    finally:
        tcp.close()
        udp.close()
    events = sensor.poll()
    assert ours(events, tcp_port) == [("closed", "tcp", "::1", tcp_port)]
    assert ours(events, udp_port) == [("closed", "udp", "::", udp_port)]


def test_the_first_poll_lists_everything_as_present() -> None:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        events = ListenerSensor().poll()
        assert ours(events, tcp.getsockname()[1]) == [("present", "tcp", "127.0.0.1", tcp.getsockname()[1])]
        assert all(e.change == "present" for e in events)


def test_an_unreadable_table_is_an_error_not_everything_closed(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    with pytest.raises(SensorError, match="net/tcp"):
        ListenerSensor(proc=tmp_path).poll()


def test_lines_from_a_fake_proc_and_a_vanished_owner(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    (net / "tcp").write_text(
        header
        + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        + "  1000 0 4242 1 0 100 0\n"
        + "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000"
        + "  1000 0 4243 1 0 20 4\n"
    )
    (net / "udp").write_text(
        header
        + "  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0 0 77 2 0 0\n"
        + "  11: 0100007F:D000 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0 0 78 2 0 0\n"
    )
    fd = tmp_path / "999" / "fd"
    fd.mkdir(parents=True)
    (fd / "3").symlink_to("socket:[4242]")
    described: list[int] = []
    sensor = ListenerSensor(proc=tmp_path, describe=lambda pid: described.append(pid) or None)
    events = sensor.poll()
    assert [(e.change, e.protocol, e.local_addr, e.local_port, e.inode) for e in events] == [
        ("present", "tcp", "127.0.0.1", 8080, 4242),
        ("present", "udp", "0.0.0.0", 53, 77),
    ]
    assert described == [999]  # found, though gone by the time it was described
    assert all(e.process is None for e in events)

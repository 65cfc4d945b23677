"""Attacks and ordinary services for the detection tests, run inside test hosts:

    python attacks.py syn-scan TARGET FIRST_PORT COUNT THRESHOLD [--source ADDR]  # crafted SYNs (scapy)
    python attacks.py sweep PORT TARGET [TARGET ...]                # one SYN per host, same port
    python attacks.py connect TARGET PORT COUNT                     # real TCP connections, closed at once
    python attacks.py serve PORT                                    # accept and close (a refusing sshd)
    python attacks.py clients TARGET PORT SECONDS                   # an ordinary client, over and over

Each attack prints one JSON line: when it started, and when its THRESHOLD-th packet left (the moment
a rule's threshold is crossed), in ns of the wall clock, so the test can measure detection latency.
Traffic goes only to the addresses given, which the tests take from their own test network.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def _syn_packets(target: str, ports: list[int], source: str | None) -> list[object]:
    from scapy.layers.inet import IP, TCP  # the layers only: scapy.all costs 50 MB and half a second

    ip = IP(dst=target, src=source) if source else IP(dst=target)
    return [ip / TCP(sport=40000 + i % 20000, dport=port, flags="S") for i, port in enumerate(ports)]


def syn_scan(target: str, first: int, count: int, threshold: int, source: str | None = None) -> None:
    from scapy.config import conf

    packets = _syn_packets(target, list(range(first, first + count)), source)
    sock = conf.L3socket()
    started = time.time_ns()
    crossed = 0
    for n, packet in enumerate(packets, start=1):
        sock.send(packet)
        if n == threshold:
            crossed = time.time_ns()
    sock.close()
    print(json.dumps({"started_ns": started, "crossed_ns": crossed, "sent": count}))


def sweep(port: int, targets: list[str]) -> None:
    from scapy.config import conf
    from scapy.layers.inet import IP, TCP

    sock = conf.L3socket()
    started = time.time_ns()
    for i, target in enumerate(targets):
        sock.send(IP(dst=target) / TCP(sport=50000 + i, dport=port, flags="S"))
    crossed = time.time_ns()
    sock.close()
    print(json.dumps({"started_ns": started, "crossed_ns": crossed, "sent": len(targets)}))


def connect(target: str, port: int, count: int) -> None:
    started = time.time_ns()
    refused = 0
    for _ in range(count):
        try:
            with socket.create_connection((target, port), timeout=2):
                pass
        except OSError:
            refused += 1
    print(
        json.dumps({"started_ns": started, "crossed_ns": time.time_ns(), "sent": count, "refused": refused})
    )


def serve(port: int) -> None:
    with socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            conn.close()


def clients(target: str, port: int, seconds: float) -> None:
    """An ordinary client: a request to one service every 200 ms, each on a new connection."""
    deadline = time.monotonic() + seconds
    done = 0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), timeout=2) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                while conn.recv(65536):
                    pass
            done += 1
        except OSError:
            pass
        time.sleep(0.2)
    print(json.dumps({"requests": done}))


def main(argv: list[str]) -> None:
    command, *args = argv
    source = None
    if "--source" in args:
        at = args.index("--source")
        source, args = args[at + 1], args[:at] + args[at + 2 :]
    if command == "syn-scan":
        syn_scan(args[0], int(args[1]), int(args[2]), int(args[3]), source)
    elif command == "sweep":
        sweep(int(args[0]), args[1:])
    elif command == "connect":
        connect(args[0], int(args[1]), int(args[2]))
    elif command == "serve":
        serve(int(args[0]))
    elif command == "clients":
        clients(args[0], int(args[1]), float(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

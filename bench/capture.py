"""Packet capture under load: zonewatch's TPACKET_V3 engine against tcpdump, on the same packets.

    .venv/bin/python bench/capture.py [--rates 25,50,100,150,200] [--seconds 3]

Needs root, iproute2 and tcpdump. It builds two test hosts in network namespaces
(tests/testnet.py; nothing leaves them) and, for each rate in kpps, sends UDP datagrams
of 18 bytes (60-byte frames, 64 on a wire) from host tx to a closed port of host rx for
--seconds. The sender is Python with a PACKET_TX_RING: every millisecond it marks as many
prepared frames as the rate asks for and hands them all to the kernel with one send(), so
it paces like `iperf3 -u -l 18 -b <rate>` but goes further on this machine (iperf3 3.12
topped out near 100 kpps here, its server receiving on the same two cores). On rx's eth0,
at the same time and with the same filter (`udp and dst port P`), run:

- zonewatch: agent.sensors.capture.CaptureEngine with its defaults, in its own process,
  reading summaries as fast as they come and checking each one (protocol, port, length);
- tcpdump: `tcpdump -i eth0 -w /dev/null -n <filter>`, whose "packets received by filter"
  and "packets dropped by kernel" are read from its exit report.

Before that, the parser alone is timed on synthetic ring blocks (no kernel involved).

The last line is machine-readable:
    RESULT drops_at_100kpps=N tcpdump_drops_at_100kpps=N max_lossless_kpps=N target=0
where max_lossless_kpps is the highest rate actually sent (packets / seconds) that the
engine received and summarized completely, with no drop. A 100 kpps run is always made. The script stops
by itself; every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.sensors.capture import (  # noqa: E402
    DEFAULT_BLOCK_COUNT,
    DEFAULT_BLOCK_SIZE,
    CaptureEngine,
    PacketSummary,
    SamplingPolicy,
    summarize_packets,
)

PAYLOAD = 18  # bytes of UDP payload: IP length 46, Ethernet frame 60
IP_LENGTH = 20 + 8 + PAYLOAD
BASE_PORT = 5301
TARGET_DROPS = 0
TICKS = os.sysconf("SC_CLK_TCK")


# --- the engine, run inside rx's namespace -------------------------------------------------------


def engine_child(
    interface: str, expression: str, port: int, max_seconds: float, ring: dict[str, int], stall_ms: int
) -> None:
    """Read summaries until stdin closes (or max_seconds), then drain the ring and print JSON.

    With ``stall_ms``, the reader stops reading for that long once a second, as an agent
    busy elsewhere would.
    """
    # The bench never wants sampling to hide a drop: drops are what it measures.
    engine = CaptureEngine(interface, filter=expression, policy=SamplingPolicy(max_rate=1), **ring)
    print("ready", flush=True)
    cpu_start, deadline = _cpu_seconds(), time.monotonic() + max_seconds
    summaries = exact = read_cpu_ns = 0
    stopping, idle_reads, next_stall = False, 0, time.monotonic() + 1
    while True:
        if stall_ms and not stopping and time.monotonic() >= next_stall:
            time.sleep(stall_ms / 1000)
            next_stall += 1
        before = time.thread_time_ns()
        batch = engine.read(100)
        read_cpu_ns += time.thread_time_ns() - before
        summaries += len(batch)
        exact += sum(1 for s in batch if s.proto == 17 and s.dport == port and s.length == IP_LENGTH)
        if not stopping:
            stdin_closed = select.select([sys.stdin], [], [], 0)[0] and not os.read(sys.stdin.fileno(), 1)
            stopping = bool(stdin_closed) or time.monotonic() > deadline
        else:
            idle_reads = idle_reads + 1 if not batch else 0
            if idle_reads >= 3:  # 300 ms with nothing: every block has been retired and read
                break
    cpu = _cpu_seconds() - cpu_start  # the bench's own checking of each summary included
    stats = engine.stats()
    engine.close()
    figures = {"exact": exact, "summaries": summaries, "process_cpu_s": cpu, "read_cpu_ns": read_cpu_ns}
    print(json.dumps({**stats._asdict(), **figures}))


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --- the sender, run inside tx's namespace ---------------------------------------------------------

_SOL_PACKET, _PACKET_VERSION, _PACKET_TX_RING, _PACKET_QDISC_BYPASS = 263, 10, 13, 20
_TPACKET_V2, _TP_STATUS_AVAILABLE, _TP_STATUS_SEND_REQUEST = 1, 0, 1
_TX_FRAME, _TX_FRAMES, _TX_DATA = (
    256,
    4096,
    32,
)  # frame size, frames, data offset (TPACKET_ALIGN(tpacket2_hdr))


def udp_frame(dst_mac: str, src_mac: str, src: str, dst: str, port: int) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        IP_LENGTH,
        0,
        0x4000,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    words = sum(struct.unpack("!10H", ip))
    words = (words >> 16) + (words & 0xFFFF)
    ip = ip[:10] + struct.pack("!H", ~(words + (words >> 16)) & 0xFFFF) + ip[12:]
    udp = struct.pack("!HHHH", 40000, port, 8 + PAYLOAD, 0)  # checksum 0: none, as IPv4 allows
    return (
        bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", ""))
        + b"\x08\x00"
        + ip
        + udp
        + bytes(PAYLOAD)
    )


def sender_child(interface: str, frame: bytes, kpps: int, seconds: float) -> None:
    """Send `frame` at `kpps` for `seconds` through a TX ring; print {"sent", "seconds"} as JSON."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V2)
    sock.setsockopt(_SOL_PACKET, _PACKET_QDISC_BYPASS, 1)
    request = struct.pack("=IIII", _TX_FRAME * 16, _TX_FRAMES // 16, _TX_FRAME, _TX_FRAMES)
    sock.setsockopt(_SOL_PACKET, _PACKET_TX_RING, request)
    sock.bind((interface, 0))
    ring = mmap.mmap(sock.fileno(), _TX_FRAME * _TX_FRAMES)
    for i in range(_TX_FRAMES):
        ring[i * _TX_FRAME + _TX_DATA : i * _TX_FRAME + _TX_DATA + len(frame)] = frame
    status, request_send = struct.Struct("=I"), struct.Struct("=II")  # tp_status, tp_len
    slot = queued = 0
    started = time.monotonic()
    while (now := time.monotonic()) < started + seconds:
        for _ in range(int((now - started) * kpps * 1000) - queued):
            offset = slot * _TX_FRAME
            if status.unpack_from(ring, offset)[0] != _TP_STATUS_AVAILABLE:
                break  # the ring is full of frames the kernel has not sent yet
            request_send.pack_into(ring, offset, _TP_STATUS_SEND_REQUEST, len(frame))
            slot, queued = (slot + 1) % _TX_FRAMES, queued + 1
        sock.send(b"")  # blocking: the kernel sends every requested frame before returning
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    unsent = sum(
        1 for i in range(_TX_FRAMES) if status.unpack_from(ring, i * _TX_FRAME)[0] != _TP_STATUS_AVAILABLE
    )
    ring.close()
    sock.close()
    print(json.dumps({"sent": queued - unsent, "seconds": elapsed}))


# --- the parser alone -----------------------------------------------------------------------------


def synthetic_block(frames: list[bytes], count: int) -> bytes:
    """`count` tpacket3 records cycling through `frames`, laid out as the kernel lays out a block."""
    records = []
    for i in range(count):
        frame = frames[i % len(frames)]
        size = (82 + len(frame) + 15) // 16 * 16
        header = struct.pack(
            "=IIIIIIHH", 0 if i == count - 1 else size, 1, 2, len(frame), len(frame), 1, 82, 96
        )
        records.append((header + bytes(82 - len(header)) + frame).ljust(size, b"\0"))
    return b"".join(records)


def parser_figures() -> dict[str, float]:
    """ns per packet of summarize_packets on synthetic blocks, best of 20."""
    eth4, eth6 = bytes(12) + b"\x08\x00", bytes(12) + b"\x86\xdd"
    ip4 = struct.pack("!BBHHHBBHII", 0x45, 0, IP_LENGTH, 0, 0, 64, 17, 0, 0x0AFA010A, 0x0AFA010B)
    udp = struct.pack("!HHHH", 40000, BASE_PORT, 8 + PAYLOAD, 0) + bytes(PAYLOAD)
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, 32, 6, 64, bytes(15) + b"\1", bytes(15) + b"\2")
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 0x80, 0x02, 64240, 0, 0) + bytes(12)
    cases = {
        "IPv4 UDP": [eth4 + ip4 + udp],
        "IPv6 TCP": [eth6 + ip6 + tcp],
        "IPv4 UDP, 1 in 64 sampled": [eth4 + ip4 + udp],
    }
    figures = {}
    for name, frames in cases.items():
        rate = 64 if "sampled" in name else 1
        count = 4096
        block = synthetic_block(frames, count)
        best = float("inf")
        for _ in range(20):
            out: list[PacketSummary] = []
            started = time.perf_counter_ns()
            summarize_packets(block, 0, count, rate, 1, out)
            best = min(best, (time.perf_counter_ns() - started) / count)
        figures[name] = best
    return figures


# --- one rate -------------------------------------------------------------------------------------


def wait_for(stream: Any, needle: bytes, timeout: float = 10.0) -> bytes:
    fd, seen = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"did not see {needle!r} within {timeout} s: {seen[-500:]!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"exited before printing {needle!r}: {seen[-500:]!r}")
        seen += chunk
    return seen


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def tcpdump_report(stderr: str) -> tuple[int, int]:
    received = re.search(r"(\d+) packets? received by filter", stderr)
    dropped = re.search(r"(\d+) packets? dropped by kernel", stderr)
    if not (received and dropped):
        raise RuntimeError(f"no statistics in tcpdump's report: {stderr[-500:]!r}")
    return int(received[1]), int(dropped[1])


def mac_address(host: Any, interface: str = "eth0") -> str:
    (link,) = json.loads(host.run("ip", "-j", "link", "show", interface).stdout)
    return str(link["address"])


def run_rate(tx: Any, rx: Any, kpps: int, seconds: int, port: int, ring: list[str]) -> dict[str, Any]:
    expression = f"udp and dst port {port}"
    frame = udp_frame(mac_address(rx), mac_address(tx), tx.address("extranet"), rx.address("extranet"), port)
    engine = rx.python_popen(
        __file__, "--child", "engine", "--port", port, "--filter", expression, "--seconds", seconds + 30,
        *ring,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    dump = None
    try:
        wait_for(engine.stdout, b"ready")
        dump = rx.popen(
            "tcpdump", "-i", "eth0", "-w", "/dev/null", "-n", expression,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(dump.stderr, b"listening on")
        link_before = rx.iface_counters("eth0")["rx_packets"]
        sender = tx.python(
            __file__, "--child", "send", "--frame", frame.hex(), "--kpps", kpps, "--seconds", seconds,
            timeout=seconds + 30,
        )  # fmt: skip
        sent = json.loads(sender.stdout.splitlines()[-1])
        time.sleep(0.3)  # let the last packets reach both readers
        link = rx.iface_counters("eth0")["rx_packets"] - link_before
        tcpdump_cpu = process_cpu_seconds(dump.pid)
        os.kill(dump.pid, signal.SIGINT)  # tcpdump prints its statistics when interrupted
        _, dump_err = dump.communicate(timeout=10)
        tcpdump_received, tcpdump_dropped = tcpdump_report(dump_err.decode())
        out, err = engine.communicate(timeout=30)  # closes its stdin: the engine drains and reports
        if engine.returncode != 0:
            raise RuntimeError(f"engine exited {engine.returncode}: {err.decode()[-2000:]}")
        zonewatch = json.loads(out.decode().splitlines()[-1])
    finally:
        for proc in (dump, engine):
            if proc is not None:
                rx.stop(proc)
    return {
        "kpps": kpps,
        "sent": sent["sent"],
        "sent_kpps": sent["sent"] / sent["seconds"] / 1000,
        "link": link,
        "zw": zonewatch,
        "tcpdump_received": tcpdump_received,
        "tcpdump_dropped": tcpdump_dropped,
        "tcpdump_cpu_s": tcpdump_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,50,100,150,200", help="kpps to send, comma-separated")
    parser.add_argument("--seconds", type=int, default=3, help="seconds of traffic per rate")
    parser.add_argument(
        "--block-kib", type=int, default=DEFAULT_BLOCK_SIZE // 1024, help="engine ring block size (KiB)"
    )
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCK_COUNT, help="engine ring blocks")
    parser.add_argument(
        "--stall-ms", type=int, default=0, help="the engine stops reading this long once a second (default 0)"
    )
    # The bench runs itself inside the test hosts as the engine (rx) and the sender (tx).
    parser.add_argument("--child", choices=("engine", "send"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=BASE_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--filter", default="udp", help=argparse.SUPPRESS)
    parser.add_argument("--frame", default="", help=argparse.SUPPRESS)
    parser.add_argument("--kpps", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "engine":
        ring = {"block_size": args.block_kib * 1024, "block_count": args.blocks}
        engine_child("eth0", args.filter, args.port, args.seconds, ring, args.stall_ms)
        return 0
    if args.child == "send":
        sender_child("eth0", bytes.fromhex(args.frame), args.kpps, args.seconds)
        return 0

    from testnet import TestNetwork

    rates = sorted({int(r) for r in args.rates.split(",") if r.strip()} | {100})
    print("parser alone (synthetic blocks, ns per packet):")
    for name, ns in parser_figures().items():
        print(f"  {name:<28} {ns:6.0f} ns")
    print(
        f"\n{args.seconds} s per rate, {IP_LENGTH + 14}-byte frames, rx eth0, filter 'udp and dst port P';"
        f" engine ring {args.blocks} x {args.block_kib} KiB = {args.blocks * args.block_kib / 1024:g} MiB"
        + (f", reader stalls {args.stall_ms} ms every second" if args.stall_ms else "")
    )
    print(
        f"{'':>30} | {'zonewatch engine':^44} | {'tcpdump -w /dev/null':^26}\n"
        f"{'rate':>5} {'sent':>7} {'kpps':>6} {'link rx':>9} |"
        f" {'recv':>7} {'drop':>5} {'exact':>7} {'read/pkt':>9} {'proc/pkt':>9} |"
        f" {'recv':>7} {'drop':>5} {'proc/pkt':>9}"
    )
    results = []
    with TestNetwork() as net:
        tx, rx = net.add_host("tx", "extranet"), net.add_host("rx", "extranet")
        if not tx.ping(rx.address("extranet")):  # also fills the neighbour caches
            raise SystemExit("the test hosts cannot reach each other")
        for i, kpps in enumerate(rates):
            ring = [
                "--block-kib",
                str(args.block_kib),
                "--blocks",
                str(args.blocks),
                "--stall-ms",
                str(args.stall_ms),
            ]
            r = run_rate(tx, rx, kpps, args.seconds, BASE_PORT + i, ring)
            zw = r["zw"]
            walked = zw["summarized"] + zw["sampled_out"] + zw["skipped"]
            read_cost = zw["read_cpu_ns"] / walked / 1000 if walked else 0.0
            zw_cost = zw["process_cpu_s"] / walked * 1e6 if walked else 0.0
            td_cost = r["tcpdump_cpu_s"] / r["tcpdump_received"] * 1e6 if r["tcpdump_received"] else 0.0
            print(
                f"{kpps:>5} {r['sent']:>7} {r['sent_kpps']:>6.1f} {r['link']:>9} |"
                f" {zw['received']:>7} {zw['dropped']:>5} {zw['exact']:>7}"
                f" {read_cost:>7.2f}us {zw_cost:>7.2f}us |"
                f" {r['tcpdump_received']:>7} {r['tcpdump_dropped']:>5} {td_cost:>7.2f}us",
                flush=True,
            )
            results.append(r)
    print(
        "\nsent: frames the sender's kernel transmitted; link rx: frames rx's eth0 received (IPv6 multicast"
        " too);\nrecv: packets the filter accepted; drop: of those, dropped by the kernel (ring/buffer full);"
        "\nexact: summaries with the expected protocol, port and length; read/pkt: CPU of the thread in"
        " CaptureEngine.read()\nper packet; proc/pkt: the reader's whole process CPU (user+system) per"
        " packet (zonewatch: with the bench's own checks)."
    )
    at_100 = next(r for r in results if r["kpps"] == 100)
    lossless = [
        r["sent_kpps"]
        for r in results
        if r["zw"]["dropped"] == 0 and r["zw"]["received"] >= r["sent"] and r["zw"]["exact"] >= r["sent"]
    ]
    print(
        f"RESULT drops_at_100kpps={at_100['zw']['dropped']}"
        f" tcpdump_drops_at_100kpps={at_100['tcpdump_dropped']}"
        f" max_lossless_kpps={round(max(lossless, default=0))} target={TARGET_DROPS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packet summaries from one interface, for flows and access anomalies, at 100 kpps in Python.

The kernel does the heavy lifting; Python touches each packet once, through ``struct``:

- A packet socket (``AF_PACKET``, ``SOCK_RAW``) bound to one interface sees what the host
  receives *and* what it sends there (``sll_pkttype == PACKET_OUTGOING``), like tcpdump.
- A classic BPF filter runs in the kernel before any copy: packets it rejects cost
  almost nothing, and the accepted ones are cut to ``snaplen`` bytes (128 by default,
  enough for Ethernet, one VLAN tag, IPv6 with 56 bytes of extension headers, and the
  TCP flags). The filter is compiled with ``tcpdump -ddd`` when tcpdump is installed;
  without it only the default ``ip or ip6`` is available, from a built-in program.
- Packets land in a TPACKET_V3 ring shared with the kernel (``mmap``): blocks of many
  packets, handed to us when full or after ``retire_ms``, so there is one ``poll`` per
  block, not one ``recv`` per packet. We walk a block's ``tpacket3_hdr`` chain and give
  the block back by writing ``TP_STATUS_KERNEL`` into its status.

The socket is created listening to no protocol, gets its filter and ring, and only then
is bound to the interface: no packet of another interface, or one the filter would have
refused, is ever queued.

What a summary says (``PacketSummary``): addresses are integers (``ip_version`` says which
family); ``length`` is the IP length (header and payload) from the IP header, so it is
the same figure the nftables zone counters add up. On a TSO/GRO path one summary stands
for the large packet the stack handled, not the segments on the wire. ``proto`` is the
upper-layer protocol after IPv6 extension headers (hop-by-hop, routing, fragment,
destination options, AH). Ports are TCP/UDP/SCTP/UDP-Lite ports; for ICMP and ICMPv6
``sport`` is the type and ``dport`` the code, as Zeek does. Ports and flags are 0 when
the packet is a non-first fragment or its headers lie beyond ``snaplen``. Frames that
hold no IPv4/IPv6 packet (ARP, if a custom filter lets it through) are counted as
``skipped`` and produce no summary. Only Ethernet and loopback interfaces are supported.

Nothing is lost silently. ``stats()`` keeps the kernel's counters (which reset on every
read) as running totals: ``received`` packets matched the filter; ``dropped`` of them
found the ring full; the rest were summarized, sampled out, skipped, or are still
queued in the ring, so ``received == dropped + summarized + sampled_out + skipped``
once the ring has been drained.

Overload: once per ``SamplingPolicy.window_ns`` the engine asks its policy for a
sampling rate N and then summarizes one packet in N (systematically: every N-th
packet walked in the ring, so counts stay exact). The rate doubles, up to
``max_rate``, after a window in which the kernel dropped packets or reading cost more
than ``cpu_budget`` of one core; it halves after ``quiet_windows`` windows without
drops that used at most half the budget (so the doubled cost still fits). Every
summary carries the rate it was sampled at, so a consumer scales per packet
(``bytes += length * sampling_rate``) and never mixes rates. A sampled-out packet costs
one ``struct`` read (about 0.1 us) instead of a full parse (about 0.7 us).

Memory: the ring is mapped into the agent and counts in its RSS (every block is touched as the
kernel cycles through them), so it is kept small. The default 2 MiB (32 blocks of 64 KiB) holds
about 14,000 minimum-size packets (9,000 cut at 128 bytes): 0.15 s of a stalled reader at
100 kpps, and 32 x 50 ms = 1.6 s at low rates, where a block is handed over ``retire_ms``
after its first packet however empty. Measured here (bench/capture.py), a reader that keeps
reading lost nothing at 150 kpps even with 1 MiB; the ring is there for the reader's pauses
(GIL, GC, a busy agent tick), not its speed. 4 MiB cost the agent 2 MB more per interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from agent.errors import SensorError

DEFAULT_FILTER = "ip or ip6"
DEFAULT_SNAPLEN = 128
DEFAULT_BLOCK_SIZE = 64 * 1024
DEFAULT_BLOCK_COUNT = 32
DEFAULT_FRAME_SIZE = 2048
DEFAULT_RETIRE_MS = 50

# <linux/if_packet.h>, <linux/if_ether.h>, <linux/if_arp.h>, <asm-generic/socket.h>
_SOL_PACKET = 263
_PACKET_RX_RING = 5
_PACKET_STATISTICS = 6
_PACKET_VERSION = 10
_TPACKET_V3 = 2
_SO_ATTACH_FILTER = 26
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_TP_STATUS_KERNEL = 0
_TP_STATUS_USER = 1
_SIOCGIFHWADDR = 0x8927
_SIOCGIFINDEX = 0x8933
_ARPHRD_ETHER = 1
_ARPHRD_LOOPBACK = 772
_BPF_RET_K = 0x06
_BPF_MAXINSNS = 4096
_PAGE_SIZE = mmap.PAGESIZE
_TPACKET3_HDRLEN = 68  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)) + sizeof(struct sockaddr_ll)

_BLOCK_HEADER = struct.Struct("=8xIII")  # tpacket_block_desc: block_status, num_pkts, offset_to_first_pkt
_BLOCK_STATUS = struct.Struct("=I")  # at offset 8 of a block
# tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, (tp_status), tp_mac, and the
# sll_pkttype of the sockaddr_ll that follows the 48-byte header.
_PACKET_HEADER = struct.Struct("=IIIII4xH32xB")
_NEXT_OFFSET = struct.Struct("=I")
_STATISTICS = struct.Struct("=III")  # tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt
_RING_REQUEST = struct.Struct("=7I")  # tpacket_req3
_BPF_INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter
_ETHERTYPE = struct.Struct("!H")
_IPV4 = struct.Struct("!BxHxxHxBxxII")  # version+IHL, total length, flags+fragment offset, proto, src, dst
_IPV6 = struct.Struct("!B3xHBx16s16s")  # version, payload length, next header, src, dst
_IPV6_EXTENSION = struct.Struct("!BBH")  # next header, length, (fragment header) offset and flags
_TCP = struct.Struct("!HH9xB")  # ports, flag byte at offset 13
_PORTS = struct.Struct("!HH")
_ICMP = struct.Struct("!BB")

_IPV6_EXTENSIONS = frozenset({0, 43, 44, 51, 60})  # hop-by-hop, routing, fragment, AH, destination opts
_MAX_IPV6_EXTENSIONS = 8
_PORT_PROTOCOLS = frozenset({17, 132, 136})  # UDP, SCTP, UDP-Lite: ports first, no flags

Program = list[tuple[int, int, int, int]]


class PacketSummary(NamedTuple):
    """What flows and anomaly detection need from one IP packet."""

    ts_ns: int  # when the kernel saw it, ns since the epoch
    ip_version: int  # 4 or 6: the family of src and dst
    src: int
    dst: int
    proto: int  # after IPv6 extension headers: 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...
    sport: int  # TCP/UDP/SCTP source port; ICMP type
    dport: int  # destination port; ICMP code
    tcp_flags: int  # FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80; 0 if not TCP
    length: int  # IP header and payload, as the IP header says
    outgoing: bool  # sent by this host on the interface, else received
    sampling_rate: int  # this summary stands for this many packets (1: none was skipped)


class CaptureStats(NamedTuple):
    """Running totals since the engine opened."""

    received: int  # packets the filter accepted, dropped ones included (the kernel's count)
    dropped: int  # of those, packets the kernel dropped because the ring was full
    sampled_out: int  # packets walked but not summarized because of 1-in-N sampling
    sampling_rate: int  # the current N (1: every packet is summarized)
    summarized: int  # summaries returned by read()
    skipped: int  # frames without a parsable IPv4/IPv6 header
    ring_full: int  # times the kernel found every block of the ring taken (tp_freeze_q_cnt)
    cpu_ns: int  # CPU time the reading thread spent walking and parsing the ring


class SamplingPolicy:
    """Chooses 1-in-N: doubles N after a window with drops or over the CPU budget, halves it when quiet.

    ``update`` is called at the end of every window with running totals; the clock is the
    caller's, so tests drive the schedule directly.
    """

    def __init__(
        self,
        *,
        cpu_budget: float = 0.25,
        max_rate: int = 64,
        window_ns: int = 1_000_000_000,
        quiet_windows: int = 5,
        rate: int = 1,
    ) -> None:
        if cpu_budget <= 0 or max_rate < 1 or window_ns <= 0 or quiet_windows < 1:
            raise SensorError("sampling policy: budget, max rate, window and quiet windows must be positive")
        self.cpu_budget = cpu_budget
        self.max_rate = max_rate
        self.window_ns = window_ns
        self.quiet_windows = quiet_windows
        self.rate = min(max(1, rate), max_rate)
        # A floor set from outside (the agent's own CPU budget, agent.selfwatch): the rate never goes
        # below it, whatever this policy would choose. Read once a window, so set from any thread.
        self.min_rate = 1
        self._last: tuple[int, int, int] | None = None  # (now_ns, dropped, cpu_ns) at the last update
        self._quiet = 0

    def update(self, now_ns: int, dropped: int, cpu_ns: int) -> int:
        """The rate for the next window, given the totals at the end of this one (never below min_rate)."""
        return max(self._update(now_ns, dropped, cpu_ns), min(self.min_rate, self.max_rate))

    def _update(self, now_ns: int, dropped: int, cpu_ns: int) -> int:
        last, self._last = self._last, (now_ns, dropped, cpu_ns)
        if last is None or now_ns <= last[0]:
            return self.rate
        elapsed = now_ns - last[0]
        new_drops, busy = dropped - last[1], cpu_ns - last[2]
        if new_drops > 0 or busy > self.cpu_budget * elapsed:
            self.rate = min(self.rate * 2, self.max_rate)
            self._quiet = 0
            return self.rate
        if 2 * busy <= self.cpu_budget * elapsed:
            # Quiet: halving N at most doubles the parsing cost, which would still fit.
            self._quiet += 1
            if self.rate > 1 and self._quiet >= self.quiet_windows:
                self.rate //= 2
                self._quiet = 0
        else:
            self._quiet = 0  # within budget, but not by enough to take on twice the work
        return self.rate


def available(interface: str) -> tuple[bool, str]:
    """Whether this process can capture on ``interface``; the reason is empty when it can."""
    if not sys.platform.startswith("linux"):
        return False, "packet capture needs Linux (AF_PACKET)"
    try:
        with _packet_socket(interface) as sock:
            _check_link_type(sock, interface)
            try:
                sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V3)
            except OSError:
                return False, "this kernel has no TPACKET_V3 ring (Linux 3.2 or later is needed)"
    except SensorError as exc:
        return False, str(exc)
    return True, ""


def compile_filter(
    expression: str, interface: str, snaplen: int = DEFAULT_SNAPLEN, tcpdump: str | None = "tcpdump"
) -> Program:
    """Classic BPF for ``expression`` on ``interface``, accepting at most ``snaplen`` bytes a packet.

    Runs ``tcpdump -ddd`` (in the caller's network namespace); without tcpdump only
    DEFAULT_FILTER compiles, from a built-in program.
    """
    path = shutil.which(tcpdump) if tcpdump else None
    if path is None:
        if expression.strip() == DEFAULT_FILTER:
            # What `tcpdump -ddd 'ip or ip6'` prints for Ethernet: ethertype 0x0800 or 0x86dd.
            return [
                (0x28, 0, 0, 12),
                (0x15, 1, 0, 0x0800),
                (0x15, 0, 1, 0x86DD),
                (0x06, 0, 0, snaplen),
                (0x06, 0, 0, 0),
            ]
        raise SensorError(
            f"capture filter {expression!r} needs tcpdump to compile it, and tcpdump is not installed;"
            f" only the default {DEFAULT_FILTER!r} is built in"
        )
    # -p: tcpdump opens the interface to learn its link type; it must not turn on promiscuous mode.
    command = [path, "-p", "-i", interface, "-s", str(snaplen), "-ddd", "--", expression]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SensorError(f"cannot run tcpdump to compile the capture filter: {exc}") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[0].removeprefix("tcpdump: ") if lines else f"exit status {done.returncode}"
        raise SensorError(f"capture filter {expression!r}: {why}")
    return parse_program(done.stdout, snaplen)


def parse_program(text: str, snaplen: int) -> Program:
    """``tcpdump -ddd`` output (a count, then "code jt jf k" lines) -> instructions, cut at ``snaplen``."""
    rows = [line.split() for line in text.strip().splitlines()]
    program: Program = []
    try:
        if not rows or len(rows[0]) != 1:
            raise ValueError("no instruction count on the first line")
        for row in rows[1:]:
            code, jt, jf, k = map(int, row)
            program.append((code, jt, jf, k))
        if int(rows[0][0]) != len(program) or not 0 < len(program) <= _BPF_MAXINSNS:
            raise ValueError(f"{rows[0][0]} instructions announced, {len(program)} read")
    except ValueError as exc:
        raise SensorError(f"cannot read tcpdump's compiled filter: {exc}") from exc
    # An accepting "ret #k" says how many bytes to keep: never more than snaplen.
    return [(code, jt, jf, min(k, snaplen) if code == _BPF_RET_K and k else k) for code, jt, jf, k in program]


_RECORD_FRAME_OFFSET = 64  # where parse_frame puts the frame after its tpacket3_hdr and sockaddr_ll


def parse_frame(
    frame: bytes, ts_ns: int = 0, outgoing: bool = False, wire_length: int | None = None
) -> PacketSummary | None:
    """Summarize one Ethernet frame exactly as the ring reader would; None if it holds no IP packet."""
    record = bytearray(_RECORD_FRAME_OFFSET + len(frame))
    sec, nsec = divmod(ts_ns, 1_000_000_000)
    wire = len(frame) if wire_length is None else wire_length
    struct.pack_into(
        "=IIIIIIH", record, 0, 0, sec, nsec, len(frame), wire, _TP_STATUS_USER, _RECORD_FRAME_OFFSET
    )
    record[58] = _PACKET_OUTGOING if outgoing else 0
    record[_RECORD_FRAME_OFFSET:] = frame
    summaries: list[PacketSummary] = []
    summarize_packets(record, 0, 1, 1, 1, summaries)
    return summaries[0] if summaries else None


def summarize_packets(
    buf: bytes | bytearray | mmap.mmap,
    pos: int,
    count: int,
    rate: int,
    countdown: int,
    out: list[PacketSummary],
) -> tuple[int, int]:
    """Walk ``count`` tpacket3 records from ``pos``, appending a summary of every ``rate``-th packet.

    ``countdown`` says how many packets remain until the next one to summarize (1: this
    one); it carries the sampling phase from block to block. Returns the new countdown
    and how many of the frames due for a summary held no IP packet. This loop is the per-packet
    cost of capture: keep it flat (locals only, one ``struct`` read per header, tuples
    built with ``tuple.__new__`` rather than the slower NamedTuple constructor).
    """
    read_header, read_next = _PACKET_HEADER.unpack_from, _NEXT_OFFSET.unpack_from
    read_ethertype, read_ipv4, read_ipv6 = _ETHERTYPE.unpack_from, _IPV4.unpack_from, _IPV6.unpack_from
    read_tcp, read_ports, read_icmp = _TCP.unpack_from, _PORTS.unpack_from, _ICMP.unpack_from
    ipv6_extensions, port_protocols, address = _IPV6_EXTENSIONS, _PORT_PROTOCOLS, int.from_bytes
    new, summary, append, skipped = tuple.__new__, PacketSummary, out.append, 0
    for _ in range(count):
        if countdown > 1:
            countdown -= 1
            pos += read_next(buf, pos)[0]
            continue
        countdown = rate
        next_offset, sec, nsec, caplen, wire_length, mac, pkttype = read_header(buf, pos)
        frame = pos + mac
        end = frame + caplen
        pos += next_offset
        l3 = frame + 14
        if l3 > end:
            skipped += 1
            continue
        ethertype = read_ethertype(buf, frame + 12)[0]
        if (ethertype == 0x8100 or ethertype == 0x88A8) and l3 + 4 <= end:  # one 802.1Q/802.1ad tag
            ethertype = read_ethertype(buf, l3 + 2)[0]
            l3 += 4
        if ethertype == 0x0800 and l3 + 20 <= end:
            version_ihl, length, fragment, proto, src, dst = read_ipv4(buf, l3)
            if version_ihl == 0x45:
                l4 = l3 + 20
            elif version_ihl >> 4 == 4 and version_ihl & 0x0F > 5:
                l4 = l3 + (version_ihl & 0x0F) * 4
            else:
                skipped += 1
                continue
            if fragment & 0x1FFF:
                l4 = end  # a non-first fragment carries no transport header
            if not length:  # a GSO packet over 64 KiB (BIG TCP) has no length in its header
                length = wire_length - (l3 - frame)
            version = 4
        elif ethertype == 0x86DD and l3 + 40 <= end:
            first, payload, proto, src_bytes, dst_bytes = read_ipv6(buf, l3)
            if first >> 4 != 6:
                skipped += 1
                continue
            src, dst = address(src_bytes), address(dst_bytes)
            length = payload + 40 if payload else wire_length - (l3 - frame)
            l4 = l3 + 40
            if proto in ipv6_extensions:
                proto, l4 = _skip_ipv6_extensions(buf, proto, l4, end)
            version = 6
        else:
            skipped += 1
            continue
        if proto == 6 and l4 + 14 <= end:
            sport, dport, flags = read_tcp(buf, l4)
        elif proto in port_protocols and l4 + 4 <= end:
            sport, dport = read_ports(buf, l4)
            flags = 0
        elif (proto == 1 or proto == 58) and l4 + 2 <= end:
            sport, dport = read_icmp(buf, l4)
            flags = 0
        else:
            sport = dport = flags = 0
        ts = sec * 1_000_000_000 + nsec
        append(new(summary, (ts, version, src, dst, proto, sport, dport, flags, length, pkttype == 4, rate)))
    return countdown, skipped


def _skip_ipv6_extensions(
    buf: bytes | bytearray | mmap.mmap, proto: int, l4: int, end: int
) -> tuple[int, int]:
    """Follow extension headers to the upper-layer protocol: (proto, its offset, or ``end`` if no ports)."""
    for _ in range(_MAX_IPV6_EXTENSIONS):
        if proto not in _IPV6_EXTENSIONS:
            return proto, l4
        if l4 + 8 > end:
            break
        next_header, size, fragment = _IPV6_EXTENSION.unpack_from(buf, l4)
        if proto == 44:
            if fragment & 0xFFF8:
                return next_header, end  # a non-first fragment carries no transport header
            l4 += 8
        elif proto == 51:
            l4 += (size + 2) * 4  # AH counts 4-byte units, minus 2
        else:
            l4 += (size + 1) * 8
        proto = next_header
    return proto, end


class CaptureEngine:
    """A TPACKET_V3 capture on one interface, read in batches of PacketSummary.

    Use from one thread. ``monotonic_ns`` paces the sampling policy's windows and
    ``cpu_time_ns`` measures the reader's cost; both are injectable for tests.
    """

    def __init__(
        self,
        interface: str,
        *,
        filter: str = DEFAULT_FILTER,
        snaplen: int = DEFAULT_SNAPLEN,
        block_size: int = DEFAULT_BLOCK_SIZE,
        block_count: int = DEFAULT_BLOCK_COUNT,
        frame_size: int = DEFAULT_FRAME_SIZE,
        retire_ms: int = DEFAULT_RETIRE_MS,
        policy: SamplingPolicy | None = None,
        tcpdump: str | None = "tcpdump",
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        cpu_time_ns: Callable[[], int] = time.thread_time_ns,
    ) -> None:
        _check_ring(snaplen, block_size, block_count, frame_size, retire_ms)
        self.interface = interface
        self.policy = policy or SamplingPolicy()
        self._block_size, self._block_count = block_size, block_count
        self.ring_bytes = block_size * block_count  # mapped into the process: part of its RSS
        self._monotonic_ns, self._cpu_time_ns = monotonic_ns, cpu_time_ns
        self._sock = _packet_socket(interface)
        try:
            _check_link_type(self._sock, interface)
            self._ifindex = _interface_index(self._sock, interface)
            program = compile_filter(filter, interface, snaplen, tcpdump)
            self._ring = self._set_up(program, frame_size, retire_ms)
        except BaseException:
            self._sock.close()
            raise
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN | select.POLLERR)
        self._block = 0  # the next block to read, in the kernel's order
        self._rate = self.policy.rate
        self._countdown = 1
        self._received = self._dropped = self._ring_full = 0
        self._summarized = self._sampled_out = self._skipped = self._cpu_ns = 0
        self._next_window_ns = monotonic_ns() + self.policy.window_ns
        self.policy.update(monotonic_ns(), 0, 0)

    def _set_up(self, program: Program, frame_size: int, retire_ms: int) -> mmap.mmap:
        sock, size = self._sock, self._block_size * self._block_count
        try:
            _attach_filter(sock, program)
        except OSError as exc:
            raise SensorError(
                f"capture on {self.interface}: the kernel refused the filter: {_reason(exc)}"
            ) from exc
        try:
            sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V3)
            request = _RING_REQUEST.pack(
                self._block_size, self._block_count, frame_size, size // frame_size, retire_ms, 0, 0
            )
            sock.setsockopt(_SOL_PACKET, _PACKET_RX_RING, request)
            ring = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SensorError(f"capture on {self.interface}: cannot set up the ring: {_reason(exc)}") from exc
        try:
            sock.bind((self.interface, _ETH_P_ALL))
        except OSError as exc:
            ring.close()
            raise SensorError(f"capture on {self.interface}: cannot bind: {_reason(exc)}") from exc
        return ring

    def __enter__(self) -> CaptureEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The socket, readable when a block is ready: for selectors and event loops."""
        return self._sock.fileno()

    def read(self, timeout_ms: int) -> list[PacketSummary]:
        """Summaries of the packets in every ready block, waiting up to ``timeout_ms`` for one.

        Returns an empty list on timeout; a negative timeout waits until a block is ready.
        A block is ready when full or ``retire_ms`` after its first packet. One call reads
        at most the whole ring once, so a busy link cannot keep it from returning.
        """
        if self._ring.closed:
            raise SensorError(f"capture on {self.interface} is closed")
        summaries: list[PacketSummary] = []
        if not self._ready() and timeout_ms != 0:
            self._wait(timeout_ms)
        if self._ready():
            self._drain(summaries)
        if self._monotonic_ns() >= self._next_window_ns:
            self._end_window()
        return summaries

    def stats(self) -> CaptureStats:
        """Running totals, the kernel's latest counts included."""
        if not self._ring.closed:
            self._read_kernel_counters()
        return CaptureStats(
            received=self._received,
            dropped=self._dropped,
            sampled_out=self._sampled_out,
            sampling_rate=self._rate,
            summarized=self._summarized,
            skipped=self._skipped,
            ring_full=self._ring_full,
            cpu_ns=self._cpu_ns,
        )

    def close(self) -> None:
        """Unmap the ring and close the socket; the totals stay readable. Idempotent."""
        if not self._ring.closed:
            with contextlib.suppress(OSError):
                self._read_kernel_counters()
            self._ring.close()
        self._sock.close()

    def _ready(self) -> bool:
        status: int = _BLOCK_STATUS.unpack_from(self._ring, self._block * self._block_size + 8)[0]
        return bool(status & _TP_STATUS_USER)

    def _wait(self, timeout_ms: int) -> None:
        for _fd, events in self._poller.poll(timeout_ms):
            if events & select.POLLERR:
                # The kernel reports ENETDOWN when the interface goes down or away; clear it.
                error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                try:
                    same = _interface_index(self._sock, self.interface) == self._ifindex
                except SensorError:
                    same = False
                if not same:
                    raise SensorError(f"capture on {self.interface}: the interface went away")
                if error not in (0, errno.ENETDOWN):
                    raise SensorError(f"capture on {self.interface}: {_reason(OSError(error, ''))}")

    def _drain(self, out: list[PacketSummary]) -> None:
        ring, size, rate = self._ring, self._block_size, self._rate
        started = self._cpu_time_ns()
        for _ in range(self._block_count):
            offset = self._block * size
            status, count, first = _BLOCK_HEADER.unpack_from(ring, offset)
            if not status & _TP_STATUS_USER:
                break
            before = len(out)
            self._countdown, skipped = summarize_packets(
                ring, offset + first, count, rate, self._countdown, out
            )
            _BLOCK_STATUS.pack_into(ring, offset + 8, _TP_STATUS_KERNEL)  # the block is the kernel's again
            summarized = len(out) - before
            self._summarized += summarized
            self._skipped += skipped
            self._sampled_out += count - summarized - skipped
            self._block = (self._block + 1) % self._block_count
        self._cpu_ns += self._cpu_time_ns() - started

    def _end_window(self) -> None:
        self._read_kernel_counters()
        now = self._monotonic_ns()
        self._rate = self.policy.update(now, self._dropped, self._cpu_ns)
        self._countdown = min(self._countdown, self._rate)
        self._next_window_ns = now + self.policy.window_ns

    def _read_kernel_counters(self) -> None:
        # The kernel zeroes its counters on every read: keep the running totals here.
        try:
            raw = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _STATISTICS.size)
        except OSError as exc:
            raise SensorError(
                f"capture on {self.interface}: cannot read drop counters: {_reason(exc)}"
            ) from exc
        packets, drops, freezes = _STATISTICS.unpack(raw)
        self._received += packets  # includes the drops
        self._dropped += drops
        self._ring_full += freezes


def _check_ring(snaplen: int, block_size: int, block_count: int, frame_size: int, retire_ms: int) -> None:
    """Say in words what the kernel would refuse with a bare EINVAL."""
    if not 64 <= snaplen <= 65535:
        raise SensorError(f"capture snaplen must be 64..65535 bytes, got {snaplen}")
    if block_size <= 0 or block_size % _PAGE_SIZE:
        raise SensorError(
            f"capture block size must be a multiple of the page size ({_PAGE_SIZE}), got {block_size}"
        )
    if block_count < 1:
        raise SensorError(f"capture needs at least one ring block, got {block_count}")
    if frame_size < _TPACKET3_HDRLEN or frame_size % 16 or block_size % frame_size:
        raise SensorError(
            f"capture frame size must be a multiple of 16, at least {_TPACKET3_HDRLEN},"
            f" and divide the block size; got {frame_size}"
        )
    if block_size < 2 * (snaplen + 128):
        raise SensorError(f"capture block size {block_size} is too small for snaplen {snaplen}")
    if not 1 <= retire_ms <= 10_000:
        raise SensorError(f"capture retire timeout must be 1..10000 ms, got {retire_ms}")


def _packet_socket(interface: str) -> socket.socket:
    """A packet socket that receives nothing until bound: filter and ring come first."""
    if not 0 < len(interface.encode()) < 16 or "/" in interface:
        raise SensorError(f"{interface!r} is not an interface name")
    try:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError as exc:
        raise SensorError(
            "opening a packet socket needs CAP_NET_RAW (run as root or grant the capability)"
        ) from exc
    except OSError as exc:
        raise SensorError(f"cannot open a packet socket: {_reason(exc)}") from exc


def _interface_query(sock: socket.socket, interface: str, request: int) -> bytes:
    """An interface ioctl; it resolves the name in the socket's network namespace, not the thread's."""
    try:
        return fcntl.ioctl(sock.fileno(), request, struct.pack("16s16x", interface.encode()))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise SensorError(f"no interface named {interface}") from exc
        raise SensorError(f"cannot query interface {interface}: {_reason(exc)}") from exc


def _interface_index(sock: socket.socket, interface: str) -> int:
    index: int = struct.unpack_from("=i", _interface_query(sock, interface, _SIOCGIFINDEX), 16)[0]
    return index


def _check_link_type(sock: socket.socket, interface: str) -> None:
    (link_type,) = struct.unpack_from("=H", _interface_query(sock, interface, _SIOCGIFHWADDR), 16)
    if link_type not in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK):
        raise SensorError(
            f"interface {interface} has link type {link_type};"
            " capture reads Ethernet and loopback interfaces only"
        )


def _attach_filter(sock: socket.socket, program: Program) -> None:
    instructions = b"".join(_BPF_INSTRUCTION.pack(*instruction) for instruction in program)
    # struct sock_fprog holds a pointer: the kernel copies the instructions during the call.
    buffer = ctypes.create_string_buffer(instructions, len(instructions))
    sock.setsockopt(
        socket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("@HP", len(program), ctypes.addressof(buffer))
    )


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)

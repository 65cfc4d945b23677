"""Access summaries: who came to this host, and whom it went to, per peer and window, with the
connection attempts that failed. The facts behind scan, brute-force and lateral-movement rules.

Fed the same captured packets as the flow tables. Per window and peer there is one record per
direction ("inbound": the peer sent the SYN; "outbound": this host did) and admin service
(attempts to an admin port, e.g. 22 for ssh, get a record of their own; everything else shares
the record with service ""). A record counts attempts (SYNs without ACK), the handshakes that
failed and how (``half_open``: inbound, our SYN-ACK got no ACK in time or was answered by RST,
as an nmap SYN scan of an open port does; outbound, our SYN got no SYN-ACK in time; ``resets``:
inbound, our RST refused an attempt (a closed port); outbound, the peer's RST refused ours),
ICMP unreachables (inbound: sent by us to the peer; outbound: received from it), the ports
and local addresses attempts went to, and the bytes exchanged with the peer.

Bytes are per peer, not per connection: one dict lookup per packet. At the end of the window
they go to one of the peer's records (inbound before outbound, the general record before an
admin one); a peer seen without any attempt in the window (a connection opened earlier) gets
a record whose direction and service are guessed from its first packet: an admin port on
either side, else the lower port is the server's.

Cost. Every packet pays one dict lookup and an addition; packets without SYN or RST that are
not ICMP pay nothing more, except that while handshakes are pending a TCP packet also looks up
its 5-tuple (any packet of a connection completes its handshake, so a completing ACK the
capture missed does not make a false half-open). Only SYN, RST and ICMP unreachable packets
take the slow path.

Memory is bounded per window: beyond ``max_peers`` peers, new peers are folded into one record
per direction, admin service and peer zone with peer_addr "*" (their zone is kept, so a
distributed scan from the internet still reads as one), counted in ``stats().folded``. Beyond
``max_pending`` handshakes in flight, a new one is counted half-open at once
(``stats().untracked``). A record keeps at most 512 ports in a set, then a 8 KiB bitmap, and
counts at most 4096 distinct local addresses. Pending handshakes younger than the timeout
carry over into the next window; older ones are settled when the window closes.

Under overload the capture samples 1 in N and each summary carries N: attempts, resets, ICMP
and bytes are scaled by it, but handshakes are tracked only for packets sampled at 1 (with
sampling the completing ACK is usually not seen, and every handshake would read as half-open).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from agent.aggregate.flows import NS_PER_MS, TCP, UDP, PacketLike
from agent.zonemap import ZoneMap

ICMP, ICMPV6, SCTP, UDPLITE = 1, 58, 132, 136
_PORTED = frozenset((TCP, UDP, SCTP, UDPLITE))
SYN, RST, ACK = 0x02, 0x04, 0x10
INBOUND, OUTBOUND = "inbound", "outbound"
OVERFLOW_PEER = "*"
_PORTS_AS_SET = 512  # beyond this many distinct ports a record keeps a bitmap (8 KiB) instead
_MAX_HOSTS = 4096  # distinct local addresses counted per record


class AccessRecord(NamedTuple):
    time_ms: int  # end of the window
    direction: str  # "inbound" (the peer initiated) or "outbound" (this host did)
    peer_addr: str  # normalized address; "*" for peers beyond max_peers
    peer_zone: str
    local_zone: str  # zone of the (first) local address involved
    attempts: int  # TCP SYNs without ACK
    half_open: int
    resets: int
    icmp_unreachable: int
    distinct_ports: int  # local ports (inbound) or remote ports (outbound) that got attempts
    distinct_hosts: int  # local addresses that got attempts (inbound); 1 for outbound
    ports: tuple[int, ...]  # the first max_ports of those ports, sorted
    service: str  # admin service name, "" for the general record
    service_port: int  # 0 for the general record
    bytes_in: int
    bytes_out: int
    window_ms: int


class AccessStats(NamedTuple):
    peers: int  # peers in the current window
    pending: int  # handshakes in flight
    folded: int  # packets of peers folded into "*" records, since the table was made
    untracked: int  # handshakes counted half-open at once because the pending table was full


# A handshake key: (ip version, local address, local port, peer address, peer port).
Key = tuple[int, int, int, int, int]
# Pending handshake states: the peer's SYN seen (we have not answered), our SYN-ACK sent,
# our SYN sent. Pending values are (first seen ns, state).
_SYN_SEEN, _SYNACK_SENT, _SYN_SENT = range(3)
# Per-peer state, a list for speed: bytes in, bytes out, guessed direction (True: inbound) and
# admin port for byte-only records, first local address, records by (inbound, service port),
# peer zone (looked up when reported, or at once for a folded peer), ip version, address (None
# when folded).
_P_BIN, _P_BOUT, _P_INBOUND, _P_SERVICE, _P_LOCAL, _P_RECORDS, _P_ZONE, _P_VERSION, _P_ADDR = range(9)
# Per-record state: attempts, half_open, resets, icmp_unreachable, ports (set or bitmap), first
# ports, local addresses that got attempts, bytes in, bytes out, first local address.
_ATT, _HALF, _RST, _ICMP, _PORTS, _FIRST, _HOSTS, _BIN, _BOUT, _LOCAL = range(10)


class AccessTable:
    MAX_PEERS = 4096
    MAX_PENDING = 65_536

    def __init__(
        self,
        zones: ZoneMap,
        admin_ports: Mapping[int, str],
        *,
        max_peers: int = MAX_PEERS,
        max_pending: int = MAX_PENDING,
        handshake_timeout_s: float = 1.0,
        max_ports: int = 64,
        start_ns: int | None = None,
    ) -> None:
        self.zones = zones
        self._admin = dict(admin_ports)
        self._max_peers = max_peers
        self._max_pending = max_pending
        self._timeout_ns = int(handshake_timeout_s * 1e9)
        self._max_ports = max_ports
        self._window_start = start_ns
        self._peers: dict[tuple[int, int], list[Any]] = {}
        self._folded_peers: dict[tuple[int, str], list[Any]] = {}  # by ip version and peer zone
        self._pending: dict[Key, tuple[int, int]] = {}
        # ICMP unreachables received per peer while our SYNs were pending: [count, last ns]. A SYN
        # that then times out is counted once (as the unreachable), not a second time as half-open.
        self._unreachable: dict[tuple[int, int], list[int]] = {}
        self._pruned_at = 0
        self._folded = self._untracked = 0

    def add(self, packets: Iterable[PacketLike]) -> None:
        peers = self._peers
        pending = self._pending
        for p in packets:
            flags = p.tcp_flags
            if p.outgoing:
                peer = peers.get((p.ip_version, p.dst)) or self._new_peer(p)
                peer[_P_BOUT] += p.length * p.sampling_rate
            else:
                peer = peers.get((p.ip_version, p.src)) or self._new_peer(p)
                peer[_P_BIN] += p.length * p.sampling_rate
            if flags & 0x06:  # SYN or RST
                self._tcp_control(p, peer, flags)
            elif flags:  # a TCP packet of a connection: it completes a pending handshake
                if pending:
                    if p.outgoing:
                        key = (p.ip_version, p.src, p.sport, p.dst, p.dport)
                    else:
                        key = (p.ip_version, p.dst, p.dport, p.src, p.sport)
                    entry = pending.pop(key, None)
                    if entry is not None and p.ts_ns - entry[0] > self._timeout_ns:
                        self._settle(key, entry)  # completed, but too late
            # Destination unreachable, but not ICMPv4 code 4 (fragmentation needed): that is path MTU
            # discovery at work, routine traffic from routers, not a refusal.
            elif (p.proto == ICMP and p.sport == 3 and p.dport != 4) or (p.proto == ICMPV6 and p.sport == 1):
                self._icmp_unreachable(p, peer)

    def set_limits(self, max_peers: int, max_pending: int) -> None:
        """New bounds (the agent's RSS budget): new peers beyond max_peers fold from now on, and
        handshakes beyond max_pending are counted half-open at once, as when the table is full."""
        self._max_peers, self._max_pending = max(1, max_peers), max(1, max_pending)

    def set_zones(self, zones: ZoneMap) -> None:
        """A new catalog: zones of this window's records are looked up in it when they are reported."""
        self.zones = zones

    def stats(self) -> AccessStats:
        return AccessStats(len(self._peers), len(self._pending), self._folded, self._untracked)

    def collect(self, now_ns: int) -> list[AccessRecord]:
        """Close the window at ``now_ns``: settle handshakes that timed out, report every record."""
        self._expire(now_ns - self._timeout_ns)
        start = now_ns if self._window_start is None else self._window_start
        window_ms = max(0, now_ns - start) // NS_PER_MS
        time_ms = now_ns // NS_PER_MS
        records: list[AccessRecord] = []
        for peer in (*self._peers.values(), *self._folded_peers.values()):
            if peer[_P_BIN] or peer[_P_BOUT]:
                record = _bytes_record(peer[_P_RECORDS]) or self._record(
                    peer, peer[_P_INBOUND], peer[_P_SERVICE], peer[_P_LOCAL]
                )
                record[_BIN] += peer[_P_BIN]
                record[_BOUT] += peer[_P_BOUT]
            records.extend(self._report(peer, time_ms, window_ms))
        self._peers = {}
        self._folded_peers = {}
        self._window_start = now_ns
        self._unreachable = {k: v for k, v in self._unreachable.items() if now_ns - v[1] <= self._timeout_ns}
        return records

    def _new_peer(self, p: PacketLike) -> list[Any]:
        """The state of a peer first seen in this window (or of its "*" record when there are too many)."""
        if p.outgoing:
            peer, local, lport, rport = p.dst, p.src, p.sport, p.dport
        else:
            peer, local, lport, rport = p.src, p.dst, p.dport, p.sport
        # Which record its bytes go to if it makes no attempt this window: guessed from this packet.
        inbound, service = not p.outgoing, 0
        if p.proto in _PORTED:
            if lport in self._admin:
                inbound, service = True, lport
            elif rport in self._admin:
                inbound, service = False, rport
            elif lport != rport:
                inbound = lport < rport  # the server's port is the lower one
        return self._peer(p.ip_version, peer, local, inbound, service)

    def _peer(self, version: int, address: int, local: int, inbound: bool, service: int) -> list[Any]:
        peer = self._peers.get((version, address))
        if peer is not None:
            return peer
        if len(self._peers) < self._max_peers:
            peer = [0, 0, inbound, service, local, {}, None, version, address]
            self._peers[(version, address)] = peer
            return peer
        self._folded += 1
        zone = self.zones.zone_of(version, address)
        peer = self._folded_peers.get((version, zone))
        if peer is None:
            peer = [0, 0, inbound, service, local, {}, zone, version, None]
            self._folded_peers[(version, zone)] = peer
        return peer

    def _record(self, peer: list[Any], inbound: bool, service: int, local: int) -> list[Any]:
        records = peer[_P_RECORDS]
        record = records.get((inbound, service))
        if record is None:
            record = records[(inbound, service)] = [0, 0, 0, 0, set(), [], set(), 0, 0, local]
        return record

    def _tcp_control(self, p: PacketLike, peer: list[Any], flags: int) -> None:
        outgoing = p.outgoing
        if outgoing:
            key = (p.ip_version, p.src, p.sport, p.dst, p.dport)
        else:
            key = (p.ip_version, p.dst, p.dport, p.src, p.sport)
        pending = self._pending
        if flags & SYN:
            if not flags & ACK:
                self._attempt(p, peer, key)
            elif outgoing:  # our SYN-ACK: the handshake now waits for the peer's ACK
                entry = pending.get(key)
                if (entry is None or entry[1] == _SYN_SEEN) and p.sampling_rate == 1:
                    self._track(key, p.ts_ns, _SYNACK_SENT, replace=entry is not None)
            else:  # the peer's SYN-ACK: our attempt got through
                entry = pending.get(key)
                if entry is not None and entry[1] == _SYN_SENT:
                    del pending[key]
                    if p.ts_ns - entry[0] > self._timeout_ns:
                        self._settle(key, entry)
            return
        entry = pending.pop(key, None)
        if entry is None:
            return  # a reset of a connection, not of an attempt
        state = entry[1]
        weight = p.sampling_rate
        if state == _SYN_SEEN and outgoing:  # we refused the peer's attempt: a closed port
            self._record(peer, True, self._service(key[2]), key[1])[_RST] += weight
        elif state == _SYN_SENT and not outgoing:  # the peer refused ours
            self._record(peer, False, self._service(key[4]), key[1])[_RST] += weight
        elif state == _SYNACK_SENT:  # our SYN-ACK answered by RST (either side): never completed
            self._record(peer, True, self._service(key[2]), key[1])[_HALF] += weight

    def _attempt(self, p: PacketLike, peer: list[Any], key: Key) -> None:
        inbound = not p.outgoing
        entry = self._pending.get(key)
        if entry is not None and entry[1] == (_SYN_SEEN if inbound else _SYN_SENT):
            return  # a retransmitted SYN of an attempt already counted, not another attempt
        port = key[2] if inbound else key[4]
        service = self._service(port)
        record = self._record(peer, inbound, service, key[1])
        record[_ATT] += p.sampling_rate
        ports = record[_PORTS]
        if type(ports) is set:
            if port not in ports:
                ports.add(port)
                if len(record[_FIRST]) < self._max_ports:
                    record[_FIRST].append(port)
                if len(ports) >= _PORTS_AS_SET:
                    bitmap = bytearray(8192)
                    for known in ports:
                        bitmap[known >> 3] |= 1 << (known & 7)
                    record[_PORTS] = bitmap
        else:
            ports[port >> 3] |= 1 << (port & 7)  # the first ports were all taken while it was a set
        if inbound:
            hosts = record[_HOSTS]
            if len(hosts) < _MAX_HOSTS:
                hosts.add(key[1])
        if key not in self._pending and p.sampling_rate == 1:
            self._track(key, p.ts_ns, _SYN_SEEN if inbound else _SYN_SENT, replace=False)

    def _track(self, key: Key, ts_ns: int, state: int, *, replace: bool) -> None:
        pending = self._pending
        if not replace and len(pending) >= self._max_pending:
            if ts_ns - self._pruned_at >= self._timeout_ns // 2:
                self._pruned_at = ts_ns
                self._expire(ts_ns - self._timeout_ns)
            if len(pending) >= self._max_pending:
                if state != _SYN_SEEN:  # an unanswered SYN is not a handshake yet: nothing to count
                    self._untracked += 1
                    self._settle(key, (ts_ns, state))
                return
        pending[key] = (ts_ns, state)

    def _expire(self, before_ns: int) -> None:
        """Settle every handshake pending since before ``before_ns``: it timed out."""
        expired = [(k, e) for k, e in self._pending.items() if e[0] < before_ns]
        for key, entry in expired:
            del self._pending[key]
            self._settle(key, entry)

    def _settle(self, key: Key, entry: tuple[int, int]) -> None:
        """A handshake that did not complete in time: half-open, unless it was never answered
        (the peer's SYN) or an ICMP unreachable already said why (our SYN)."""
        version, local, lport, address, rport = key
        state = entry[1]
        if state == _SYN_SEEN:
            return
        if state == _SYN_SENT:
            credit = self._unreachable.get((version, address))
            if credit is not None and credit[0] > 0:
                credit[0] -= 1
                return
        inbound = state == _SYNACK_SENT
        service = self._service(lport if inbound else rport)
        peer = self._peer(version, address, local, inbound, service)
        self._record(peer, inbound, service, local)[_HALF] += 1

    def _icmp_unreachable(self, p: PacketLike, peer: list[Any]) -> None:
        # The summary has no inner header: the port it was about is unknown, so the general record.
        if p.outgoing:  # we told the peer its packet could not be delivered
            self._record(peer, True, 0, p.src)[_ICMP] += p.sampling_rate
            return
        self._record(peer, False, 0, p.dst)[_ICMP] += p.sampling_rate
        if self._pending and len(self._unreachable) < self._max_pending:
            credit = self._unreachable.setdefault((p.ip_version, p.src), [0, 0])
            credit[0] += 1
            credit[1] = p.ts_ns

    def _service(self, port: int) -> int:
        return port if port in self._admin else 0

    def _report(self, peer: list[Any], time_ms: int, window_ms: int) -> list[AccessRecord]:
        version, address = peer[_P_VERSION], peer[_P_ADDR]
        if address is None:
            peer_addr, peer_zone = OVERFLOW_PEER, peer[_P_ZONE]
        else:
            peer_addr = str(
                ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
            )
            peer_zone = self.zones.zone_of(version, address)
        out = []
        for (inbound, service), r in peer[_P_RECORDS].items():
            ports = r[_PORTS]
            distinct = len(ports) if type(ports) is set else int.from_bytes(ports).bit_count()
            out.append(
                AccessRecord(
                    time_ms=time_ms,
                    direction=INBOUND if inbound else OUTBOUND,
                    peer_addr=peer_addr,
                    peer_zone=peer_zone,
                    local_zone=self.zones.zone_of(version, r[_LOCAL]),
                    attempts=r[_ATT],
                    half_open=r[_HALF],
                    resets=r[_RST],
                    icmp_unreachable=r[_ICMP],
                    distinct_ports=distinct,
                    distinct_hosts=max(1, len(r[_HOSTS])) if inbound else 1,
                    ports=tuple(sorted(r[_FIRST])),
                    service=self._admin.get(service, "") if service else "",
                    service_port=service,
                    bytes_in=r[_BIN],
                    bytes_out=r[_BOUT],
                    window_ms=window_ms,
                )
            )
        return out


def _bytes_record(records: dict[tuple[bool, int], list[Any]]) -> list[Any] | None:
    """Which of a peer's records its bytes go to: inbound first, the general record first."""
    for inbound in (True, False):
        record = records.get((inbound, 0))
        if record is None:
            record = next((r for (direction, _), r in records.items() if direction == inbound), None)
        if record is not None:
            return record
    return None

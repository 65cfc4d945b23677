"""Flows: packets folded into bidirectional 5-tuple records with idle and active timeouts,
attributed to the process that owns the local socket.

The table sees every captured packet, so its per-packet work is one dict lookup and a few
integer updates. Memory is bounded: beyond `max_flows` the oldest flow (by creation) is
closed early (counted in `stats.evicted`, never dropped silently). A flow that stays active
is reported every `active_timeout_s` as a continuation, so a long transfer shows up while it
runs, not only when it ends.

The table also keeps bytes and packets per remote zone, cumulative for its whole life: the
capture-based zone accounting that replaces the nftables counters where a host has none.
The zone is looked up once per flow (a bisect), not per packet, and looked up again for
every open flow when the catalog changes. Those tallies count what the capture *saw*;
under sampling each summary also adds its weight to ``estimated_packets``, so the ratio
seen/estimated is the fraction of packets seen, which the collector scales back up by.

Attribution reads the socket table (agent.sensors.sockets: this namespace's tables, and
/proc/[pid]/fd only for sockets not seen before) at most once per reporting interval, when flows
are being closed, and maps the local address and port to the owning process; a listening socket
answers for the connections it accepted whose own entry is gone. A flow whose socket closed before
the interval ended (a short connection) stays unattributed rather than guessed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import psutil

from agent.sensors.accounting import ZoneCounters
from agent.sensors.sockets import SocketTable
from agent.zonemap import ZoneMap

TCP, UDP = 6, 17
NS_PER_MS = 1_000_000


class PacketLike(Protocol):
    """What the table needs of a captured packet (agent.sensors.capture.PacketSummary has it)."""

    @property
    def ts_ns(self) -> int: ...
    @property
    def ip_version(self) -> int: ...
    @property
    def src(self) -> int: ...
    @property
    def dst(self) -> int: ...
    @property
    def proto(self) -> int: ...
    @property
    def sport(self) -> int: ...
    @property
    def dport(self) -> int: ...
    @property
    def tcp_flags(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def outgoing(self) -> bool: ...
    @property
    def sampling_rate(self) -> int: ...


class ProcessRef(NamedTuple):
    pid: int
    name: str
    user: str
    cmdline: str


class FlowRecord(NamedTuple):
    ip_protocol: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    interface: str
    bytes_out: int
    bytes_in: int
    packets_out: int
    packets_in: int
    start_ms: int
    end_ms: int
    tcp_flags: int
    remote_zone: str
    initiated_locally: bool
    process: ProcessRef | None


class FlowStats(NamedTuple):
    active: int
    closed: int
    evicted: int


# A flow key: (ip version, protocol, local address, local port, remote address, remote port).
Key = tuple[int, int, int, int, int, int]
# Mutable per-flow state, a list for speed: first_ns, last_ns, bytes_out, bytes_in,
# packets_out, packets_in, tcp_flags, initiated_locally, remote zone, that zone's tally.
_FIRST, _LAST, _BOUT, _BIN, _POUT, _PIN, _FLAGS, _LOCAL, _ZONE, _TALLY = range(10)
# A zone's tally, cumulative: bytes and packets seen each way, packets they stand for.
_T_BIN, _T_BOUT, _T_PIN, _T_POUT, _T_EST = range(5)


class FlowTable:
    MAX_FLOWS = 65_536

    def __init__(
        self,
        zones: ZoneMap,
        interface: str = "",
        *,
        idle_timeout_s: float = 30.0,
        active_timeout_s: float = 120.0,
        max_flows: int = MAX_FLOWS,
    ) -> None:
        self.zones = zones
        self.interface = interface
        self._idle_ns = int(idle_timeout_s * 1e9)
        self._active_ns = int(active_timeout_s * 1e9)
        self._max = max_flows
        self._flows: dict[Key, list[Any]] = {}
        self._closed = self._evicted = 0
        self._pending: list[FlowRecord] = []  # closed early (evicted), reported at the next expire
        self._tallies: dict[str, list[int]] = {}

    def add(self, packets: Iterable[PacketLike]) -> None:
        flows = self._flows
        for p in packets:
            if p.outgoing:
                key = (p.ip_version, p.proto, p.src, p.sport, p.dst, p.dport)
            else:
                key = (p.ip_version, p.proto, p.dst, p.dport, p.src, p.sport)
            state = flows.get(key)
            if state is None:
                if len(flows) >= self._max:
                    self._evict_one()
                zone = self.zones.zone_of(key[0], key[4])
                state = flows[key] = [p.ts_ns, p.ts_ns, 0, 0, 0, 0, 0, p.outgoing, zone, self._tally(zone)]
            state[_LAST] = p.ts_ns
            # Under overload the capture samples 1 in N: each summary stands for N packets.
            weight = p.sampling_rate
            tally = state[_TALLY]
            if p.outgoing:
                state[_BOUT] += p.length * weight
                state[_POUT] += weight
                tally[_T_BOUT] += p.length
                tally[_T_POUT] += 1
            else:
                state[_BIN] += p.length * weight
                state[_PIN] += weight
                tally[_T_BIN] += p.length
                tally[_T_PIN] += 1
            tally[_T_EST] += weight
            state[_FLAGS] |= p.tcp_flags

    def set_zones(self, zones: ZoneMap) -> None:
        """A new catalog: open flows are looked up again, and count to their new zone from now on."""
        self.zones = zones
        for key, state in self._flows.items():
            state[_ZONE] = zone = zones.zone_of(key[0], key[4])
            state[_TALLY] = self._tally(zone)

    def zone_counters(self) -> dict[str, ZoneCounters]:
        """What the capture saw per remote zone since the table was made (zones of old catalogs too)."""
        return {zone: ZoneCounters(*t) for zone, t in self._tallies.items()}

    def _tally(self, zone: str) -> list[int]:
        tally = self._tallies.get(zone)
        if tally is None:
            tally = self._tallies[zone] = [0, 0, 0, 0, 0]
        return tally

    def expire(self, now_ns: int, owners: SocketOwners | None = None) -> list[FlowRecord]:
        """Close idle flows and report long ones as continuations; attribute what is reported."""
        done = self._pending
        self._pending = []
        for key, state in list(self._flows.items()):
            if now_ns - state[_LAST] >= self._idle_ns:
                del self._flows[key]
                if state[_POUT] or state[_PIN]:  # a continuation that saw nothing more was already reported
                    done.append(self._record(key, state, None))
            elif now_ns - state[_FIRST] >= self._active_ns:
                done.append(self._record(key, state, None))
                # Continue the flow from here: the next report covers what follows.
                self._flows[key] = [state[_LAST], state[_LAST], 0, 0, 0, 0, 0, *state[_LOCAL:]]
        self._closed += len(done)
        if done and owners is not None:
            owners.refresh()
            done = [r._replace(process=owners.owner(r)) for r in done]
        return done

    def flush(self, owners: SocketOwners | None = None) -> list[FlowRecord]:
        """Close every flow now (the agent is stopping)."""
        return self.expire(2**63, owners)

    def stats(self) -> FlowStats:
        return FlowStats(len(self._flows), self._closed, self._evicted)

    def set_max_flows(self, max_flows: int) -> None:
        """A new bound, applied now: the oldest flows beyond it are closed early (reported, as evicted)."""
        self._max = max(1, max_flows)
        while len(self._flows) > self._max:
            self._evict_one()

    def _evict_one(self) -> None:
        # The oldest flow by creation (the dict's first key), in O(1): a scan or flood beyond the bound
        # must not cost a pass over every open flow per packet. Long-lived flows are reported as
        # continuations every active timeout, so closing one early loses nothing.
        key = next(iter(self._flows))
        self._pending.append(self._record(key, self._flows.pop(key), None))
        self._evicted += 1

    def _record(self, key: Key, state: list[Any], process: ProcessRef | None) -> FlowRecord:
        version, proto, local, lport, remote, rport = key
        return FlowRecord(
            ip_protocol=proto,
            local_addr=str(ipaddress.ip_address(local) if version == 4 else ipaddress.IPv6Address(local)),
            local_port=lport,
            remote_addr=str(ipaddress.ip_address(remote) if version == 4 else ipaddress.IPv6Address(remote)),
            remote_port=rport,
            interface=self.interface,
            bytes_out=state[_BOUT],
            bytes_in=state[_BIN],
            packets_out=state[_POUT],
            packets_in=state[_PIN],
            start_ms=state[_FIRST] // NS_PER_MS,
            end_ms=state[_LAST] // NS_PER_MS,
            tcp_flags=state[_FLAGS],
            remote_zone=state[_ZONE],
            initiated_locally=bool(state[_LOCAL]),
            process=process,
        )


class SocketOwners:
    """The socket table, read at most once per `min_interval_s`; who owns which local port."""

    def __init__(
        self,
        connections: Callable[[], list[Any]] | None = None,
        describe: Callable[[int], ProcessRef | None] | None = None,
        monotonic: Callable[[], float] | None = None,
        min_interval_s: float = 5.0,
    ) -> None:
        import time

        # Not psutil.net_connections: it maps every socket of every process on the host first, and
        # the agent's RSS kept megabytes of that (agent.sensors.sockets).
        self._connections = connections or SocketTable()
        self._describe = describe or describe_process
        self._monotonic = monotonic or time.monotonic
        self._min_interval = min_interval_s
        self._read_at: float | None = None
        self._by_socket: dict[tuple[int, str, int], int] = {}
        # Connected sockets by both ends too: Linux lets connect() reuse a local port towards another
        # peer, so on a busy host the local end alone can name two processes' sockets.
        self._by_peer: dict[tuple[int, str, int, str, int], int] = {}
        self._by_listener: dict[tuple[int, int], int] = {}
        self._processes: dict[int, ProcessRef | None] = {}
        self.reads = 0

    def refresh(self) -> None:
        now = self._monotonic()
        if self._read_at is not None and now - self._read_at < self._min_interval:
            return
        self._read_at = now
        self.reads += 1
        by_socket: dict[tuple[int, str, int], int] = {}
        by_listener: dict[tuple[int, int], int] = {}
        by_peer: dict[tuple[int, str, int, str, int], int] = {}
        for c in self._connections():
            if not c.pid or not c.laddr:
                continue
            proto = TCP if c.type == 1 else UDP  # socket.SOCK_STREAM == 1
            by_socket[(proto, _normal(c.laddr.ip), c.laddr.port)] = c.pid
            if c.raddr:
                by_peer[(proto, _normal(c.laddr.ip), c.laddr.port, _normal(c.raddr.ip), c.raddr.port)] = c.pid
            if c.status == psutil.CONN_LISTEN or (proto == UDP and not c.raddr):
                by_listener[(proto, c.laddr.port)] = c.pid
        self._by_socket, self._by_listener, self._by_peer = by_socket, by_listener, by_peer
        live = set(by_socket.values())
        self._processes = {pid: ref for pid, ref in self._processes.items() if pid in live}

    def owner(self, flow: FlowRecord) -> ProcessRef | None:
        local = (flow.ip_protocol, _normal(flow.local_addr), flow.local_port)
        pid = self._by_peer.get((*local, _normal(flow.remote_addr), flow.remote_port))
        if pid is None:
            pid = self._by_socket.get(local)
        if pid is None and not flow.initiated_locally:
            pid = self._by_listener.get((flow.ip_protocol, flow.local_port))
        if pid is None:
            return None
        if pid not in self._processes:
            self._processes[pid] = self._describe(pid)
        return self._processes[pid]


def describe_process(pid: int) -> ProcessRef | None:
    """Name, user and command line of a process; None when it is gone or hidden from us."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return ProcessRef(pid, p.name(), p.username(), " ".join(p.cmdline())[:1024])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _normal(address: str) -> str:
    """Addresses as the socket table shows them: an IPv4-mapped IPv6 socket address is the IPv4 one."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address

"""Exact bytes and packets per zone and direction, counted by the kernel with nftables.

The agent installs one table, ``inet zonewatch``, and from then on the kernel does all
the work: every IP packet this host receives or sends is looked up once in an interval
map from address range to a *named counter*, and that counter is incremented. Reading
is one ``nft -j list counters`` call per interval, so the agent spends no CPU per
packet and misses nothing, whatever the rate.

What the table looks like (``apply`` writes it in one ``nft -f -`` transaction)::

    table inet zonewatch {
        counter unknown_in {}  counter unknown_out {}
        counter z0_in {}       counter z0_out {}        # one pair per zone
        map in4  { type ipv4_addr : counter; flags interval; elements = { 10.1.0.0/16 : "z0_in", ... } }
        map out4 ...; map in6 ...; map out6 ...
        chain input  { type filter hook input  priority -300; policy accept;
                       iifname { "lo" } return
                       counter name ip saddr map @in4
                       counter name ip6 saddr map @in6 }
        chain output { ... oifname ..., ip daddr map @out4, ip6 daddr map @out6 }
    }

Why it never changes what the host lets through: the chains hold no verdict but the
implicit ``accept`` (and ``return``, which ends only our chain), and an accept in one
base chain does not stop the other tables' chains on the same hook from being
evaluated; only a drop is final. Another table's drop keeps dropping.

What is counted, precisely:

- "in" is traffic delivered to this host (hook ``input``, keyed by source address),
  "out" is traffic this host sends (hook ``output``, keyed by destination). Forwarded
  traffic is not counted: agents run on hosts, not routers.
- Bytes are IP bytes (L3: IP header and payload, no link header). On a TSO/GSO path a
  packet is counted once as the large packet the stack handles, not as the segments on
  the wire, so packet counts are "packets the IP stack handled", and bytes miss the
  headers the NIC replicates when it segments. A veth agrees with us exactly: its
  counters see the same unsegmented packets plus a 14-byte Ethernet header each.
- The input hook sees reassembled datagrams and the output hook sees datagrams before
  fragmentation, so a fragmented datagram counts as one packet of its full length.
- Priority -300 runs before the usual filter chains (priority 0): packets another table
  drops on input are still counted (they did arrive from that zone), and "out" sees the
  destination the application chose, before any NAT on the output hook rewrites it.
- ARP is not IP and never reaches these hooks, so it is not counted. IPv6 neighbour
  discovery and MLD *are* IP (ICMPv6) and are counted, in the zone of their addresses:
  solicited-node multicast (ff02::1:ff00:0/104) and link-local (fe80::/10) fall into
  ``unknown`` unless the catalog names them.
- Interfaces in ``exclude_interfaces`` (loopback by default: a host talking to itself
  is no zone's traffic) are skipped; names may end in ``*`` as nft allows.

Every address belongs to exactly one zone: the catalog's ranges (already flattened by
longest prefix, so disjoint) and their complement, which maps to ``unknown``. With full
coverage a lookup never misses, so no packet goes uncounted.

Catalog updates lose nothing: after the first ``apply`` the table is never recreated.
An update re-declares every counter with ``add`` (a no-op for one that exists, so it
keeps its value), flushes and refills the maps and the chains, all in one transaction:
each packet sees either the old catalog or the new one, and the counters of zones in
both keep counting. A zone dropped from the catalog keeps its counter (no longer fed)
for the life of the accountant, so what it counted before the update is still read; a
zone that comes back resumes its counter. The first ``apply`` of an accountant replaces
any table of the same name, which is what a crashed run leaves behind.

nft object names must be ASCII, zone names need not be (``市公安局专网``), so counters
are named ``z<n>_in``/``z<n>_out`` and the mapping stays in Python.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from agent.errors import SensorError

UNKNOWN_ZONE = "unknown"
PRIORITY = -300
V4_MAX = 2**32 - 1
V6_MAX = 2**128 - 1

Run = Callable[[list[str], "str | None"], str]
"""Runs ``nft`` with these arguments and optional stdin; returns stdout or raises SensorError."""

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
# IFNAMSIZ is 16 with the NUL; a trailing "*" is nft's wildcard.
_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}\*?")


class ZoneRanges(NamedTuple):
    """One zone of the catalog: disjoint inclusive integer address ranges per family."""

    name: str
    v4: list[tuple[int, int]]
    v6: list[tuple[int, int]]


class ZoneLike(Protocol):
    """Anything shaped like ZoneRanges, such as the collector catalog's own record."""

    @property
    def name(self) -> str: ...
    @property
    def v4(self) -> Sequence[tuple[int, int]]: ...
    @property
    def v6(self) -> Sequence[tuple[int, int]]: ...


class ZoneCounters(NamedTuple):
    """Cumulative counts of one zone since its counters were created."""

    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    # Capture-based accounting: the packets (both ways) those seen stand for, with the
    # ones sampling skipped. 0 when every packet was counted (kernel counters).
    estimated_packets: int = 0


class ZoneDelta(NamedTuple):
    """What one zone exchanged with this host over one interval; every count is >= 0."""

    zone: str
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    interval_ms: int = 0
    counter_reset: bool = False  # a counter restarted; the counts cover only the time since
    # The fraction of packets the counts saw (1.0: all); capture under overload samples.
    sampling_rate: float = 1.0


def nft_runner(prefix: Sequence[str] = (), nft: str = "nft", timeout: float = 10.0) -> Run:
    """Return a Run that executes ``[*prefix, nft, *args]``, e.g. prefix ``ip netns exec NS``."""

    def run(args: list[str], stdin: str | None) -> str:
        command = [*prefix, nft, *args]
        try:
            done = subprocess.run(
                command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise SensorError(f"{exc.filename or command[0]} not found (is nftables installed?)") from exc
        except subprocess.TimeoutExpired as exc:
            raise SensorError(f"nft {' '.join(args)} did not finish within {timeout:g} s") from exc
        except OSError as exc:
            raise SensorError(f"cannot run nft: {exc.strerror or exc}") from exc
        if done.returncode != 0:
            message = done.stderr.strip() or f"exit status {done.returncode}"
            raise SensorError(f"nft {' '.join(args)}: {message}")
        return done.stdout

    return run


run_nft = nft_runner()


def complement(ranges: Iterable[tuple[int, int]], top: int) -> list[tuple[int, int]]:
    """The ranges of [0, top] that none of ``ranges`` (disjoint, any order) covers."""
    gaps: list[tuple[int, int]] = []
    start = 0
    for low, high in sorted(ranges):
        if low > start:
            gaps.append((start, low - 1))
        start = max(start, high + 1)
    if start <= top:
        gaps.append((start, top))
    return gaps


def check_ranges(zones: Sequence[ZoneLike]) -> None:
    """Raise SensorError unless the zones' ranges are valid, and disjoint across all zones."""
    names: set[str] = set()
    for zone in zones:
        if zone.name == UNKNOWN_ZONE:
            raise SensorError(f"zone name {UNKNOWN_ZONE!r} is reserved for addresses in no zone")
        if zone.name in names:
            raise SensorError(f"zone {zone.name!r} appears twice in the catalog")
        names.add(zone.name)
    for family, top in (("v4", V4_MAX), ("v6", V6_MAX)):
        owned = sorted((low, high, zone.name) for zone in zones for low, high in getattr(zone, family))
        previous: tuple[int, int, str] | None = None
        for low, high, name in owned:
            if not 0 <= low <= high <= top:
                raise SensorError(f"zone {name!r}: {family} range ({low}, {high}) is not within [0, {top}]")
            if previous is not None and low <= previous[1]:
                raise SensorError(
                    f"zones {previous[2]!r} and {name!r} overlap at {_address(family, low)};"
                    " the catalog must be flattened by longest prefix first"
                )
            previous = (low, high, name)


def build_script(
    table: str,
    zones: Sequence[ZoneLike],
    counter_of: Mapping[str, str],
    exclude_interfaces: Collection[str] = ("lo",),
    replace: bool = False,
) -> str:
    """The nft transaction that makes ``table`` count ``zones``.

    ``counter_of`` maps every zone name to its counter prefix (``unknown`` included, and
    zones no longer in the catalog, whose counters are kept). ``replace`` first deletes a
    table left by an earlier run; otherwise existing counters keep their values.
    """
    t = f"inet {table}"
    lines = [f"add table {t}"]
    if replace:
        lines += [f"delete table {t}", f"add table {t}"]
    for prefix in counter_of.values():
        lines += [f"add counter {t} {prefix}_in", f"add counter {t} {prefix}_out"]
    for family, addr_type, top in (("4", "ipv4_addr", V4_MAX), ("6", "ipv6_addr", V6_MAX)):
        owned = [(r, counter_of[zone.name]) for zone in zones for r in getattr(zone, "v" + family)]
        owned += [(r, counter_of[UNKNOWN_ZONE]) for r in complement((r for r, _ in owned), top)]
        owned.sort()
        for direction in ("in", "out"):
            name = f"{direction}{family}"
            lines += [
                f"add map {t} {name} {{ type {addr_type} : counter; flags interval; }}",
                f"flush map {t} {name}",
            ]
            elements = ", ".join(
                f'{_interval("v" + family, low, high)} : "{prefix}_{direction}"'
                for (low, high), prefix in owned
            )
            lines.append(f"add element {t} {name} {{ {elements} }}")
    excluded = ", ".join(f'"{name}"' for name in sorted(exclude_interfaces))
    # The chains are named after their hooks; "in" is keyed by who sent, "out" by who receives.
    for hook, device, address, direction in (
        ("input", "iifname", "saddr", "in"),
        ("output", "oifname", "daddr", "out"),
    ):
        lines += [
            f"add chain {t} {hook} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}",
            f"flush chain {t} {hook}",
        ]
        if excluded:
            lines.append(f"add rule {t} {hook} {device} {{ {excluded} }} return")
        lines += [
            f"add rule {t} {hook} counter name ip {address} map @{direction}4",
            f"add rule {t} {hook} counter name ip6 {address} map @{direction}6",
        ]
    return "\n".join(lines) + "\n"


def parse_counters(output: str, table: str) -> dict[str, tuple[int, int]]:
    """``nft -j list counters`` output -> {counter name: (bytes, packets)} of ``table``."""
    try:
        document = json.loads(output)
        counters: dict[str, tuple[int, int]] = {}
        for item in document["nftables"]:
            counter = item.get("counter")
            if counter is None or counter.get("table") != table or counter.get("family") != "inet":
                continue
            counters[str(counter["name"])] = (int(counter["bytes"]), int(counter["packets"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SensorError(f"cannot parse nft's counter listing: {exc!r}") from exc
    return counters


class NftAccountant:
    """Owns the ``inet <table>`` nftables table: installs it, reads it, removes it.

    Why ``reset_on_read``: nft 1.0.x fills its cache with every element of every map
    before any ``list`` command, even ``list counters``, so a plain read costs CPU in
    proportion to the catalog's ranges (measured with nft 1.0.6: 75 ms of CPU for 500
    zones with 8,000 ranges, 18 ms with 500 ranges; at a 10 s interval that alone is
    more than the agent's CPU budget), while ``reset counters`` skips that cache (8 ms
    at any catalog size). With ``reset_on_read`` each read takes the counts and zeroes the
    counters in the kernel (the kernel subtracts what it reported, so packets counted
    meanwhile are kept) and the totals are kept here, so ``read`` is still cumulative and
    even survives the table being deleted and recreated. The price: other readers (an
    administrator's ``nft list counters``) see only what was counted since the last read,
    and counts the kernel reported but nft failed to print (nft killed by the timeout, a
    dump interrupted by a concurrent ruleset change, which libmnl discards) are lost.
    """

    def __init__(self, run: Run = run_nft, table: str = "zonewatch", reset_on_read: bool = False) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"invalid nft table name {table!r}")
        self._run = run
        self._table = table
        self._reset_on_read = reset_on_read
        self._counter_of: dict[str, str] = {UNKNOWN_ZONE: UNKNOWN_ZONE}
        self._next_index = 0
        self._installed = False
        # reset_on_read: what the kernel handed over so far, per counter name.
        self._totals: dict[str, tuple[int, int]] = {}

    @property
    def table(self) -> str:
        return self._table

    @property
    def reset_on_read(self) -> bool:
        return self._reset_on_read

    def available(self) -> tuple[bool, str]:
        """(True, "") when nft runs, speaks JSON, and the kernel accepts our kind of table.

        The check commits nothing (``nft --check``), so it is safe while counting runs.
        Typical reasons otherwise: nft not installed, no CAP_NET_ADMIN ("Operation not
        permitted"), nft built without JSON, a kernel without nf_tables objref maps.
        """
        probe = build_script(self._table + "_probe", [], {UNKNOWN_ZONE: UNKNOWN_ZONE}, ("lo",), replace=False)
        try:
            self._run(["-j", "list", "tables"], None)
            self._run(["--check", "-f", "-"], probe)
        except SensorError as exc:
            reason = _first_error_line(str(exc))
            if "Operation not permitted" in reason:
                reason += " (needs root or CAP_NET_ADMIN)"
            return False, reason
        return True, ""

    def apply(self, zones: Iterable[ZoneLike], exclude_interfaces: Collection[str] = ("lo",)) -> None:
        """Make the kernel count ``zones`` from now on, in one transaction.

        The first call replaces a leftover table; later calls keep every counter counting.
        """
        zones = list(zones)
        check_ranges(zones)
        for name in exclude_interfaces:
            if not _INTERFACE_NAME.fullmatch(name):
                raise SensorError(f"invalid interface name {name!r}")
        counter_of = dict(self._counter_of)
        next_index = self._next_index
        for zone in zones:
            if zone.name not in counter_of:
                counter_of[zone.name] = f"z{next_index}"
                next_index += 1
        script = build_script(self._table, zones, counter_of, exclude_interfaces, replace=not self._installed)
        self._run(["-f", "-"], script)
        # Only a committed transaction changes what we believe the kernel holds.
        self._counter_of, self._next_index, self._installed = counter_of, next_index, True

    def read(self) -> dict[str, ZoneCounters]:
        """Cumulative counts per zone name, ``unknown`` and retired zones included; one nft call.

        Raises SensorError when the table is gone (an administrator deleted it, say):
        ``apply`` again to recreate it. The recreated counters start at 0, which
        ZoneTrafficSampler reports as a reset; with ``reset_on_read`` the totals kept here
        simply go on growing.
        """
        verb = "reset" if self._reset_on_read else "list"
        try:
            output = self._run(["-j", verb, "counters", "table", "inet", self._table], None)
        except SensorError as exc:
            raise SensorError(f"cannot read table inet {self._table}: {_first_error_line(str(exc))}") from exc
        raw = parse_counters(output, self._table)
        if self._reset_on_read:
            for name, (count_bytes, count_packets) in raw.items():
                total_bytes, total_packets = self._totals.get(name, (0, 0))
                self._totals[name] = (total_bytes + count_bytes, total_packets + count_packets)
            raw = self._totals
        readings: dict[str, ZoneCounters] = {}
        for zone, prefix in self._counter_of.items():
            received, sent = raw.get(prefix + "_in"), raw.get(prefix + "_out")
            if received is None or sent is None:
                continue  # created by a later apply than this accountant's, or deleted by hand
            readings[zone] = ZoneCounters(received[0], sent[0], received[1], sent[1])
        return readings

    def remove(self) -> None:
        """Delete the table; no error when it does not exist."""
        # "add" makes the delete unconditional without parsing nft's error text
        # (``destroy`` would do it in one word, but needs nft >= 1.0.8).
        t = f"inet {self._table}"
        self._run(["-f", "-"], f"add table {t}\ndelete table {t}\n")
        self._installed = False

    def __enter__(self) -> NftAccountant:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class ZoneTrafficSampler:
    """Turns successive cumulative readings into per-interval deltas per zone.

    The first call only primes. A zone that was not in the previous reading had its
    counters created since then (at 0), so all it holds is new. A counter that went
    backwards was reset (its table deleted and recreated) and all it holds is counted
    since the reset; nft counters are 64-bit and do not wrap. A reset followed by more
    traffic than the old value before the next reading looks like growth and is
    under-counted; readings from ``NftAccountant(reset_on_read=True)`` never go
    backwards and have no such blind spot.

    Idle zones are left out unless ``include_idle``: with hundreds of zones on thousands
    of hosts, reporting zeros would be most of the collector's load.
    """

    def __init__(
        self,
        read: Callable[[], Mapping[str, ZoneCounters]],
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        include_idle: bool = False,
    ) -> None:
        self._read = read
        self._monotonic_ns = monotonic_ns
        self._include_idle = include_idle
        self._previous: dict[str, ZoneCounters] | None = None
        self._previous_ns = 0

    def sample(self) -> list[ZoneDelta]:
        current = dict(self._read())
        now_ns = self._monotonic_ns()
        previous, elapsed_ns = self._previous, now_ns - self._previous_ns
        self._previous, self._previous_ns = current, now_ns
        if previous is None:
            return []
        interval_ms = max(0, round(elapsed_ns / 1e6))
        zero = ZoneCounters(0, 0, 0, 0)
        deltas = []
        for zone, new in sorted(current.items()):
            old = previous.get(zone, zero)
            bytes_in, packets_in, reset_in = _direction_delta(
                old.bytes_in, old.packets_in, new.bytes_in, new.packets_in
            )
            bytes_out, packets_out, reset_out = _direction_delta(
                old.bytes_out, old.packets_out, new.bytes_out, new.packets_out
            )
            reset = reset_in or reset_out
            estimated = new.estimated_packets - (0 if reset else old.estimated_packets)
            seen = packets_in + packets_out
            rate = seen / estimated if estimated > seen > 0 else 1.0
            if reset or self._include_idle or packets_in or packets_out:
                deltas.append(
                    ZoneDelta(zone, bytes_in, bytes_out, packets_in, packets_out, interval_ms, reset, rate)
                )
        return deltas


def _direction_delta(
    old_bytes: int, old_packets: int, new_bytes: int, new_packets: int
) -> tuple[int, int, bool]:
    # One nft counter holds both figures, so they reset together.
    if new_bytes < old_bytes or new_packets < old_packets:
        return new_bytes, new_packets, True
    return new_bytes - old_bytes, new_packets - old_packets, False


def _address(family: str, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if family == "v4" else ipaddress.IPv6Address(value))


def _interval(family: str, low: int, high: int) -> str:
    if low == high:
        return _address(family, low)
    return f"{_address(family, low)}-{_address(family, high)}"


def _first_error_line(message: str) -> str:
    for line in message.splitlines():
        if "Error:" in line:
            return line.strip()
    return message.splitlines()[0].strip() if message.strip() else message

"""The host's network inventory: addresses, routes with the policy rules that select their tables,
DNS resolvers, hostname and OS. Migration evidence: "does this host still have an address or a route
in its dedicated network?"

Read from `ip -j` (iproute2, present on every host we run on; JSON output needs iproute2 >= 4.17),
one process per address family: ``ip -4 -j -batch -`` and ``ip -6 -j -batch -``, each running
``addr show``, ``route show table all`` and ``rule show``. Per family, not one call for both: a
route's JSON does not say its family, and ``default`` must become 0.0.0.0/0 or ::/0.

Cost, measured on this 2-core machine (iproute2 6.1; 10 addresses, 25 routes, 9 rules; CPU of the
agent's thread plus its `ip` children): five separate ``ip -j`` calls ~6 ms a read; the two batches
2.5 ms; a whole read (both batches, parsing, resolv.conf, os-release) 3.5 ms at the median and
5-6 ms at p99, whether in a bare interpreter or one with the agent's imports (40 MB). That is at
the 5 ms budget, not under it, and a host with thousands of routes costs more (5,000 routes: 67 ms).
So `ip` runs only when the kernel says something changed: a netlink socket subscribed to link,
address, route and rule notifications is drained at every tick (with the small files, 0.055 ms at
the median, 0.12 ms at p99), and `ip` runs at the next tick after a notification, and for the full
report every hour. Where that socket cannot be opened, `ip` runs at every tick, and the status
says so.

Which routes are kept, and why. Only unicast routes: they say "this destination is reachable over
that interface or gateway", which is what the migration evidence is about. Left out:

- the ``local`` table (255), and route types ``local``, ``broadcast``, ``anycast`` and
  ``multicast`` wherever they are: the kernel makes them for the host's own addresses (reported as
  addresses) and for multicast (ff00::/8 on every IPv6 interface); they say nothing about reaching
  a network;
- ``blackhole``, ``unreachable``, ``prohibit`` and ``throw``: they say a destination is *not*
  reachable (or that lookup goes on in the next table). A Route fact has no type: reported, they
  would read as the very reachability they deny.

Link-local routes and addresses (fe80::/64) and loopback addresses are kept as they are: the
collector decides what matters. A multipath route becomes one Route per next hop.

Policy routing: every ``ip rule`` that looks up a table other than main and local is written as
``ip rule`` prints it ("from 10.250.2.0/24 lookup 100", priority left out) and put in the
``policy`` of each route of that table (several rules joined by "; ", in priority order). Routes of
a non-main table that no rule selects get an empty policy: the kernel never uses them.

Reports: a full inventory at start and every hour (a collector that lost state converges), in
between a diff of addresses and routes when something changed, nothing when nothing did. Every
report carries the current resolvers, hostname and OS. If `ip` is missing or fails, nothing is
reported (a partial "full" inventory would erase what the collector knows): the sensor raises
SensorError and the agent shows "off: <why>".
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import SensorError

MAIN_TABLE = 254
LOCAL_TABLE = 255
_TABLE_NAMES = {"unspec": 0, "default": 253, "main": MAIN_TABLE, "local": LOCAL_TABLE}
# Where iproute2 keeps table names ("100 dedicated"); later files win, as in iproute2.
RT_TABLES = (
    "/usr/share/iproute2/rt_tables",
    "/usr/lib/iproute2/rt_tables",
    "/etc/iproute2/rt_tables",
)
RT_TABLES_D = ("/usr/share/iproute2/rt_tables.d", "/etc/iproute2/rt_tables.d")
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
RESOLVED_STUB = "127.0.0.53"
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")

# The collector's bounds (collector/validate.py): beyond them it would refuse the whole batch.
MAX_ITEMS = 4096  # addresses, and routes, per report
MAX_RESOLVERS = 32
MAX_TEXT = 128  # OS name and version
MAX_POLICY = 1024
FULL_EVERY_S = 3600.0
_IP_TIMEOUT_S = 5.0
_BATCH = "addr show\nroute show table all\nrule show\n"


class Address(NamedTuple):
    interface: str
    cidr: str  # "10.1.2.3/24", "fd00::1/64"


class Route(NamedTuple):
    destination: str  # CIDR; 0.0.0.0/0 or ::/0 for a default route
    gateway: str  # "" for a route straight onto the link
    interface: str
    table: int
    metric: int
    policy: str  # the ip rules that select the table; "" for main


class Snapshot(NamedTuple):
    """The host's inventory at one moment."""

    addresses: frozenset[Address]
    routes: frozenset[Route]
    dns_resolvers: tuple[str, ...]
    hostname: str
    os_name: str
    os_version: str


class InventoryReport(NamedTuple):
    """What to send: everything (``full``, all in the added lists) or what changed since the last."""

    full: bool
    addresses_added: tuple[Address, ...]
    addresses_removed: tuple[Address, ...]
    routes_added: tuple[Route, ...]
    routes_removed: tuple[Route, ...]
    dns_resolvers: tuple[str, ...]
    hostname: str
    os_name: str
    os_version: str


class IpDump(NamedTuple):
    """What ``ip -j`` said about one address family."""

    family: int  # 4 or 6
    links: list[dict[str, Any]]  # addr show
    routes: list[dict[str, Any]]  # route show table all
    rules: list[dict[str, Any]]  # rule show


def run_ip(family: int) -> IpDump:
    """Run ``ip -<family> -j -batch -`` for addresses, routes of every table and rules."""
    args = ["ip", f"-{family}", "-j", "-batch", "-"]
    try:
        result = subprocess.run(args, input=_BATCH, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    except FileNotFoundError:
        raise SensorError("the ip command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise SensorError(f"ip -{family} -j did not answer within {_IP_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise SensorError(f"cannot run ip: {exc.strerror or exc}") from exc
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[0]
        raise SensorError(f"ip -{family} -j failed: {why[:200]}")
    return parse_batch_output(family, result.stdout)


def parse_batch_output(family: int, text: str) -> IpDump:
    """The three JSON documents ``ip -j -batch`` prints, one per command."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    at = 0
    try:
        while len(documents) < 3:
            while at < len(text) and text[at].isspace():
                at += 1
            document, at = decoder.raw_decode(text, at)
            documents.append(document)
    except ValueError:
        raise SensorError(
            f"ip -{family} -j printed no JSON for command {len(documents) + 1} of 3"
            " (iproute2 older than 4.17?)"
        ) from None
    if not all(isinstance(d, list) for d in documents):
        raise SensorError(f"ip -{family} -j printed JSON of an unexpected shape")
    return IpDump(family, *documents)


# --- parsing -------------------------------------------------------------------------------------


def parse_addresses(links: Iterable[Mapping[str, Any]]) -> set[Address]:
    """Every address of every interface, as "address/prefix" (normalized by ipaddress)."""
    found = set()
    for link in links:
        name = link.get("ifname")
        if not isinstance(name, str) or not _is_name(name):
            continue
        for info in link.get("addr_info") or ():
            try:
                found.add(Address(name, str(ip_interface(f"{info['local']}/{info['prefixlen']}"))))
            except (KeyError, TypeError, ValueError):
                continue  # an entry without a usable local address (or one ip printed oddly)
    return found


def parse_routes(
    family: int,
    routes: Iterable[Mapping[str, Any]],
    policies: Mapping[int, str],
    table_names: Callable[[str], int | None],
) -> set[Route]:
    """The unicast routes of every table but local, one per next hop (see the module docstring)."""
    default = "0.0.0.0/0" if family == 4 else "::/0"
    found = set()
    for route in routes:
        if route.get("type", "unicast") != "unicast":
            continue
        table = table_number(str(route.get("table", "main")), table_names)
        if table is None or table == LOCAL_TABLE:
            continue
        dst = route.get("dst")
        try:
            destination = default if dst == "default" else str(ip_network(str(dst), strict=False))
            metric = int(route.get("metric", 0))
        except (TypeError, ValueError):
            continue
        policy = "" if table == MAIN_TABLE else policies.get(table, "")
        for hop in route.get("nexthops") or (route,):
            interface = str(hop.get("dev", ""))
            if interface and not _is_name(interface):
                continue
            found.add(Route(destination, _gateway(hop), interface, table, metric, policy))
    return found


def _gateway(hop: Mapping[str, Any]) -> str:
    # "via": a gateway of the other family (an IPv4 route via an IPv6 next hop, RFC 5549).
    value = hop.get("gateway") or (hop.get("via") or {}).get("host") or ""
    try:
        return str(ip_address(value)) if value else ""
    except ValueError:
        return ""


def parse_rules(
    rules: Iterable[Mapping[str, Any]], table_names: Callable[[str], int | None]
) -> dict[int, str]:
    """Table -> the rules that look it up, as ``ip rule`` writes them; main and local left out."""
    selected: dict[int, list[str]] = {}
    for rule in sorted(rules, key=lambda r: int(r.get("priority", 0))):
        if "table" not in rule or "l3mdev" in rule:
            continue  # goto, nop, blackhole, unreachable, prohibit: no table; l3mdev: per VRF
        table = table_number(str(rule["table"]), table_names)
        if table is None or table in (MAIN_TABLE, LOCAL_TABLE):
            continue
        selected.setdefault(table, []).append(rule_text(rule))
    return {table: _bounded("; ".join(texts), MAX_POLICY) for table, texts in selected.items()}


# Keys of `ip -j rule show` that rule_text writes (or that carry no selector).
_RULE_KEYS = {
    "priority", "not", "src", "srclen", "dst", "dstlen", "tos", "fwmark", "fwmask", "iif", "iif_detached",
    "oif", "oif_detached", "uid_start", "uid_end", "ipproto", "sport", "sport_start", "sport_end", "dport",
    "dport_start", "dport_end", "tun_id", "table", "suppress_prefixlen", "suppress_ifgroup", "protocol",
    "flags",
}  # fmt: skip


def rule_text(rule: Mapping[str, Any]) -> str:
    """The rule as ``ip rule show`` prints it, without the priority (iproute2's print_rule order)."""
    words = ["not"] if "not" in rule else []
    words.append(f"from {_prefix(rule, 'src', 'srclen')}")
    if "dst" in rule:
        words.append(f"to {_prefix(rule, 'dst', 'dstlen')}")
    if "tos" in rule:
        words.append(f"tos {rule['tos']}")
    if "fwmark" in rule:
        words.append(f"fwmark {rule['fwmark']}" + (f"/{rule['fwmask']}" if "fwmask" in rule else ""))
    for name in ("iif", "oif"):
        if name in rule:
            words.append(f"{name} {rule[name]}" + (" [detached]" if f"{name}_detached" in rule else ""))
    if "uid_start" in rule:
        words.append(f"uidrange {rule['uid_start']}-{rule.get('uid_end', rule['uid_start'])}")
    if "ipproto" in rule:
        words.append(f"ipproto {rule['ipproto']}")
    for name in ("sport", "dport"):
        if name in rule:
            words.append(f"{name} {rule[name]}")
        elif f"{name}_start" in rule:
            words.append(f"{name} {rule[f'{name}_start']}-{rule.get(f'{name}_end', rule[f'{name}_start'])}")
    if "tun_id" in rule:
        words.append(f"tun_id {rule['tun_id']}")
    # A selector this code does not know (a newer iproute2) is still shown, never dropped.
    words += [f"{key} {value}" for key, value in rule.items() if key not in _RULE_KEYS]
    words.append(f"lookup {rule['table']}")
    if "suppress_prefixlen" in rule:
        words.append(f"suppress_prefixlength {rule['suppress_prefixlen']}")
    if "suppress_ifgroup" in rule:
        words.append(f"suppress_ifgroup {rule['suppress_ifgroup']}")
    return " ".join(words)


def _prefix(rule: Mapping[str, Any], address: str, length: str) -> str:
    # ip leaves the length out for a host (/32, /128) and writes "all" for no address at all.
    value = rule.get(address, "all")
    return f"{value}/{rule[length]}" if length in rule else str(value)


def table_number(name: str, table_names: Callable[[str], int | None]) -> int | None:
    """A routing table's number from what ip prints: a number, a built-in name or one of rt_tables."""
    if name.isdigit():
        return int(name)
    return _TABLE_NAMES[name] if name in _TABLE_NAMES else table_names(name)


def parse_rt_tables(text: str) -> dict[str, int]:
    """``100 dedicated`` lines of an iproute2 rt_tables file."""
    names = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            try:
                names[fields[1]] = int(fields[0], 0)
            except ValueError:
                continue
    return names


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ip_address(fields[1])))
            except ValueError:
                continue
    return found


def resolvers(read_text: Callable[[str], str | None]) -> tuple[str, ...]:
    """The resolvers of /etc/resolv.conf; behind systemd-resolved's stub, its upstreams too."""
    found = parse_resolv_conf(read_text(RESOLV_CONF) or "")
    if RESOLVED_STUB in found:
        found += parse_resolv_conf(read_text(RESOLVED_UPSTREAM) or "")
    return tuple(dict.fromkeys(found))[:MAX_RESOLVERS]


def parse_os_release(text: str) -> tuple[str, str]:
    """(NAME, VERSION_ID) of an os-release file; "" for what it does not say."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key not in ("NAME", "VERSION_ID"):
            continue
        try:
            words = shlex.split(value)
            values[key] = " ".join(words)
        except ValueError:  # unbalanced quotes: take the text as it stands
            values[key] = value.strip("\"'")
    return _bounded(values.get("NAME", ""), MAX_TEXT), _bounded(values.get("VERSION_ID", ""), MAX_TEXT)


def read_text_file(path: str) -> str | None:
    """A small file's text, or None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _is_name(value: str) -> bool:
    # What the collector takes as an interface name (the kernel's are at most 15 bytes anyway).
    return 0 < len(value) <= 64 and value.isprintable()


def _bounded(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the sensor ----------------------------------------------------------------------------------

# rtnetlink multicast groups (legacy bitmask: 1 << (RTNLGRP_x - 1)): links, IPv4/IPv6 addresses,
# routes and rules. Everything `ip` would show differently sends a message to one of them.
_RTMGRP_LINK = 1 << 0
_RTMGRP_IPV4_IFADDR = 1 << 4
_RTMGRP_IPV4_ROUTE = 1 << 6
_RTMGRP_IPV4_RULE = 1 << 7
_RTMGRP_IPV6_IFADDR = 1 << 8
_RTMGRP_IPV6_ROUTE = 1 << 10
_RTMGRP_IPV6_RULE = 1 << 18
_GROUPS = (
    _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV4_RULE | _RTMGRP_IPV6_IFADDR
    | _RTMGRP_IPV6_ROUTE | _RTMGRP_IPV6_RULE
)  # fmt: skip


def diff(previous: Snapshot, current: Snapshot) -> InventoryReport | None:
    """What changed from ``previous`` to ``current``; None when nothing did."""
    if previous == current:
        return None
    return InventoryReport(
        False,
        tuple(sorted(current.addresses - previous.addresses)),
        tuple(sorted(previous.addresses - current.addresses)),
        tuple(sorted(current.routes - previous.routes)),
        tuple(sorted(previous.routes - current.routes)),
        *current[2:],
    )


def full(current: Snapshot) -> InventoryReport:
    return InventoryReport(
        True, tuple(sorted(current.addresses)), (), tuple(sorted(current.routes)), (), *current[2:]
    )


class NetlinkWatch:
    """Whether the kernel announced a change of links, addresses, routes or rules since the last ask.

    A netlink socket subscribed to those groups, never read but drained: each message is only a
    sign that `ip` would now print something else. It watches the network namespace of the thread
    that opens it. OSError when it cannot be opened.
    """

    def __init__(self) -> None:
        self._socket = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        try:
            self._socket.bind((0, _GROUPS))
        except OSError:
            self._socket.close()
            raise

    def changed(self) -> bool:
        """Drain the socket; True when anything came (or the kernel had to drop messages)."""
        changed = False
        while True:
            try:
                changed |= bool(self._socket.recv(65536))
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: the queue overflowed, so much has changed
                    raise
                changed = True

    def close(self) -> None:
        self._socket.close()


class InventorySensor:
    """Reads the inventory and says what to report: full, a diff, or nothing.

    `ip` runs only when it is worth it: for the full report (at start and every hour) and when
    the kernel announced a change on the netlink socket (a read costs ~4 ms of CPU, the drained
    socket a few microseconds). Without that socket (``watch`` fails) `ip` runs at every call.
    Resolvers, hostname and OS come from small files and are read at every call.

    The OS is injectable (``read_ip``, ``read_text``, ``hostname``, ``watch``), and so is the
    monotonic clock that says when the next full report is due.
    """

    def __init__(
        self,
        read_ip: Callable[[int], IpDump] = run_ip,
        read_text: Callable[[str], str | None] = read_text_file,
        hostname: Callable[[], str] = lambda: os.uname().nodename,
        watch: Callable[[], NetlinkWatch] = NetlinkWatch,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        full_every_s: float = FULL_EVERY_S,
    ) -> None:
        self._read_ip = read_ip
        self._read_text = read_text
        self._hostname = hostname
        self._open_watch = watch
        self._monotonic_ns = monotonic_ns
        self._full_every_ns = int(full_every_s * 1e9)
        self._watch: NetlinkWatch | None = None
        self._why_unwatched = ""
        self._previous: Snapshot | None = None
        self._last_full_ns = 0
        self._unread = False
        self._table_names: dict[str, int] | None = None
        self._notes: list[str] = []

    def status(self) -> str:
        notes = [*self._notes]
        if self._why_unwatched:
            notes.append(f"read at every interval (no netlink notifications: {self._why_unwatched})")
        return "on" + (f": {'; '.join(notes)}" if notes else "")

    def report(self) -> InventoryReport | None:
        """What to send now; SensorError (and nothing sent) when the inventory cannot be read."""
        changed = self._changed()  # drained before reading: a change from now on is seen next time
        now = self._monotonic_ns()
        previous = self._previous
        due = previous is None or now - self._last_full_ns >= self._full_every_ns
        if previous is None or due or changed or self._unread:
            self._unread = True  # until a read succeeds: a failed one must not lose the change
            addresses, routes = self._read_network()
            self._unread = False
        else:
            addresses, routes = previous.addresses, previous.routes
        current = self._with_host(addresses, routes)
        self._previous = current
        if previous is None or due:
            self._last_full_ns = now
            return full(current)
        return diff(previous, current)

    def snapshot(self) -> Snapshot:
        """The inventory now, read in full."""
        return self._with_host(*self._read_network())

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _changed(self) -> bool:
        if self._watch is None and not self._why_unwatched:
            try:
                self._watch = self._open_watch()  # in this thread's network namespace: the one read
            except OSError as exc:
                self._why_unwatched = exc.strerror or str(exc)
        if self._watch is None:
            return True
        try:
            return self._watch.changed()
        except OSError as exc:
            self.close()
            self._why_unwatched = exc.strerror or str(exc)
            return True

    def _read_network(self) -> tuple[frozenset[Address], frozenset[Route]]:
        addresses: set[Address] = set()
        routes: set[Route] = set()
        self._table_names = None  # rt_tables read again, once, if a name turns up
        for family in (4, 6):
            dump = self._read_ip(family)
            addresses |= parse_addresses(dump.links)
            policies = parse_rules(dump.rules, self._table_name)
            routes |= parse_routes(family, dump.routes, policies, self._table_name)
        self._notes = []
        return (
            frozenset(self._bounded_set("addresses", addresses, key=lambda a: a)),
            frozenset(self._bounded_set("routes", routes, key=lambda r: (r.table != MAIN_TABLE, r))),
        )

    def _with_host(self, addresses: frozenset[Address], routes: frozenset[Route]) -> Snapshot:
        """The snapshot with resolvers, hostname and OS read now."""
        os_release = next((t for t in map(self._read_text, OS_RELEASE) if t is not None), "")
        name, version = parse_os_release(os_release)
        return Snapshot(
            addresses, routes, resolvers(self._read_text), _bounded(self._hostname(), 253), name, version
        )

    def _bounded_set(self, what: str, items: set[Any], key: Callable[[Any], Any]) -> list[Any]:
        if len(items) <= MAX_ITEMS:
            return list(items)
        # Beyond what the collector takes per fact: the first ones, always the same, and say so.
        self._notes.append(f"{len(items)} {what}, only the first {MAX_ITEMS} reported")
        return sorted(items, key=key)[:MAX_ITEMS]

    def _table_name(self, name: str) -> int | None:
        if self._table_names is None:
            self._table_names = {}
            for path in RT_TABLES:
                self._table_names.update(parse_rt_tables(self._read_text(path) or ""))
            for directory in RT_TABLES_D:
                try:
                    confs = sorted(p for p in os.listdir(directory) if p.endswith(".conf"))
                except OSError:
                    continue
                for conf in confs:
                    self._table_names.update(parse_rt_tables(self._read_text(f"{directory}/{conf}") or ""))
        return self._table_names.get(name)

"""The zone catalog: which network (zone) every address belongs to.

The collector owns it (``zones.yaml``) and serves it to agents inside their policy, versioned by a hash
of its content. Longest-prefix match decides an address's zone, so a broad zone (the internet, ``0.0.0.0/0``)
may sit under everything more specific.

IPv4-mapped IPv6 addresses (``::ffff:10.1.2.3``, what a dual-stack socket reports for an IPv4 peer) are
looked up as the IPv4 address they carry: the peer *is* that IPv4 host. For the same reason the catalog
refuses CIDRs inside ``::ffff:0:0/96`` (write the IPv4 form), and ``flatten(6)`` shows the IPv4 answer there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from collector.errors import CollectorError
from collector.model import zone_allowed

ZONE_KINDS = ("extranet", "dedicated", "internet", "classified", "local")
DIRECTIONS = ("vertical", "horizontal")
ZONE_KEYS = ("name", "kind", "direction", "department", "cidrs", "capacity", "admin")
TOP_KEYS = ("zones", "access")
MAX_NAME_CHARS = 64
# Agents report peers outside every zone as "unknown"; a zone of that name would be indistinguishable.
RESERVED_NAMES = ("unknown",)
MAX_CAPACITY_BPS = 2**63 - 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_BITS = {4: 32, 6: 128}
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_BASE = int(_MAPPED.network_address)
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class Zone:
    name: str
    kind: str
    # "vertical" (city <-> province/nation) or "horizontal" (between departments); "" unless extranet.
    direction: str
    # The department that owns a dedicated network; "" unless dedicated.
    department: str
    networks: tuple[Network, ...]
    # The link's capacity in bits per second; 0 = not stated.
    capacity_bps: int = 0
    # Where the zone is defined in its file (1-based); 0 when not from a file.
    line: int = 0
    # Administrators work from here: admin services (SSH, RDP, databases) may be reached from it.
    admin: bool = False


class CatalogError(CollectorError):
    """The zone catalog cannot be read or is wrong; names the file and, when known, the line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.line = line
        self.message = message


class ZoneCatalog:
    """Zones with their longest-prefix index; immutable once built.

    ``access`` is the reachability policy: host role -> the zones (names or kinds) hosts of that role
    may reach, with ``"*"`` for roles not listed. Without an entry for a role (and no ``"*"``) every
    zone may be reached. Classified zones never may, whatever the policy says.
    """

    def __init__(self, zones: Iterable[Zone], access: dict[str, tuple[str, ...]] | None = None) -> None:
        self.zones: tuple[Zone, ...] = tuple(zones)
        self.access: dict[str, tuple[str, ...]] = dict(access or {})
        self._by_name: dict[str, Zone] = {}
        # Per family: (prefix length, mask, {network as int: zone}), longest prefix first.
        self._index: dict[int, list[tuple[int, int, dict[int, Zone]]]] = {4: [], 6: []}
        tables: dict[int, dict[int, dict[int, Zone]]] = {4: {}, 6: {}}
        for zone in self.zones:
            if zone.name in self._by_name:
                raise ValueError(f"zone name {zone.name!r} is used twice")
            self._by_name[zone.name] = zone
            for net in zone.networks:
                if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
                    raise ValueError(f"{net} is IPv4-mapped; give it in IPv4 form")
                table = tables[net.version].setdefault(net.prefixlen, {})
                key = int(net.network_address)
                if key in table:
                    raise ValueError(f"{net} is in both {table[key].name!r} and {zone.name!r}")
                table[key] = zone
        for family, by_length in tables.items():
            bits = _BITS[family]
            for length in sorted(by_length, reverse=True):
                mask = ((1 << length) - 1) << (bits - length)
                self._index[family].append((length, mask, by_length[length]))
        self._version = _content_hash(self.zones, self.access)

    @property
    def version(self) -> str:
        """A short content hash: the same zones give the same version, however the file is written."""
        return self._version

    def __len__(self) -> int:
        return len(self.zones)

    def __repr__(self) -> str:
        return f"ZoneCatalog({len(self.zones)} zones, version {self._version})"

    def by_name(self, name: str) -> Zone | None:
        return self._by_name.get(name)

    def allows(self, role: str, zone_name: str) -> bool:
        """May a host of this role reach this zone? Unknown peers are not judged (True)."""
        zone = self._by_name.get(zone_name)
        return zone_allowed(self.access, role, zone_name, zone.kind if zone else None)

    def zone_of(self, address: str | Address) -> Zone | None:
        """The zone of the longest prefix holding ``address``; None when no zone does.

        Raises ValueError for a string that is not an IP address.
        """
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        value = int(addr)
        family = addr.version
        if family == 6 and value >> 32 == 0xFFFF:
            value &= 0xFFFFFFFF
            family = 4
        for _length, mask, table in self._index[family]:
            zone = table.get(value & mask)
            if zone is not None:
                return zone
        return None

    def flatten(self, family: int) -> list[tuple[int, int, Zone | None]]:
        """The whole address space of ``family`` (4 or 6) as sorted, disjoint, inclusive ranges.

        Each range [first, last] is owned by its longest-prefix zone (None where no zone covers it);
        neighbours never share an owner. Interval maps (nftables) refuse overlapping elements, so the
        agent's kernel accounting needs exactly this shape.
        """
        if family not in _BITS:
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        spans = self._spans(family)
        if family == 6:
            # The mapped block answers like IPv4 (see zone_of); no catalog CIDR lies inside it.
            spans.append((_MAPPED_BASE, _MAPPED_BASE + 0xFFFFFFFF, None))
            spans.extend((_MAPPED_BASE + first, _MAPPED_BASE + last, z) for first, last, z in self._spans(4))
        return _flatten(spans, (1 << _BITS[family]) - 1)

    def _spans(self, family: int) -> list[tuple[int, int, Zone | None]]:
        spans: list[tuple[int, int, Zone | None]] = []
        bits = _BITS[family]
        for length, _mask, table in self._index[family]:
            size = 1 << (bits - length)
            spans.extend((first, first + size - 1, zone) for first, zone in table.items())
        return spans


def _flatten(spans: list[tuple[int, int, Zone | None]], top: int) -> list[tuple[int, int, Zone | None]]:
    """Cut nested-or-disjoint intervals (CIDRs always are) into disjoint ranges owned by the innermost.

    One sweep in address order with a stack of the intervals still open: O(n log n).
    """
    out: list[tuple[int, int, Zone | None]] = []

    def emit(first: int, last: int, owner: Zone | None) -> None:
        if first > last:
            return
        if out and out[-1][2] is owner:
            out[-1] = (out[-1][0], last, owner)
        else:
            out.append((first, last, owner))

    open_spans: list[tuple[int, Zone | None]] = []  # (last, owner), innermost on top
    cursor = 0
    # At the same start the wider span comes first, so it ends up beneath the narrower one.
    for first, last, owner in sorted(spans, key=lambda s: (s[0], -s[1])):
        while open_spans and open_spans[-1][0] < first:
            end, outer = open_spans.pop()
            emit(cursor, end, outer)
            cursor = end + 1
        emit(cursor, first - 1, open_spans[-1][1] if open_spans else None)
        open_spans.append((last, owner))
        cursor = first
    while open_spans:
        end, outer = open_spans.pop()
        emit(cursor, end, outer)
        cursor = end + 1
    emit(cursor, top, None)
    return out


def _content_hash(zones: Iterable[Zone], access: dict[str, tuple[str, ...]] | None = None) -> str:
    # Zones sorted by name: their order in the file does not change any lookup, so not the version either.
    canonical: Any = [
        {
            "name": z.name,
            "kind": z.kind,
            "direction": z.direction,
            "department": z.department,
            "networks": sorted(str(n) for n in z.networks),
            "capacity_bps": z.capacity_bps,
            # Only when set: catalogs written before the flag existed keep their version.
            **({"admin": True} if z.admin else {}),
        }
        for z in sorted(zones, key=lambda z: z.name)
    ]
    if access:  # a new policy is a new version (the collector judges by it); none keeps old versions
        canonical = {"zones": canonical, "access": {role: sorted(v) for role, v in access.items()}}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_CAPACITY = re.compile(r"([0-9][0-9_]*(?:\.[0-9_]+)?)\s*([kKmMgGtT]?)(bit/s|bits|bit|bps|b/s)?")


def parse_capacity(value: int | str) -> int:
    """A link capacity in bits per second: 1000000000, "500M", "1G", "10Gbit", "100Mbps", "2.5G".

    Units are decimal SI (k = 10^3, M = 10^6, G = 10^9, T = 10^12) and always bits, never bytes.
    Raises ValueError with a message an operator understands.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"capacity must be a number of bits per second like 1G, not {value!r}")
    if isinstance(value, int):
        bps = value
    else:
        text = value.strip()
        match = _CAPACITY.fullmatch(text)
        if match is None:
            if text.startswith("-"):
                raise ValueError(f"capacity {value!r} is negative")
            if "B" in text:
                raise ValueError(f"capacity {value!r}: B means bytes; give bits per second (1 GB/s = 8G)")
            raise ValueError(
                f"capacity {value!r} is not understood; give bits per second like 1000000000, "
                "500M, 1G, 10Gbit or 100Mbps"
            )
        try:
            exact = Decimal(match[1].replace("_", "")) * _UNITS[match[2].lower()]
        except InvalidOperation:
            raise ValueError(f"capacity {value!r} is not a number") from None
        if exact != exact.to_integral_value():
            raise ValueError(f"capacity {value!r} is not a whole number of bits per second")
        bps = int(exact)
    if bps < 0:
        raise ValueError(f"capacity {value!r} is negative")
    if bps > MAX_CAPACITY_BPS:
        raise ValueError(f"capacity {value!r} is implausibly large")
    return bps


def load_catalog(path: Path, known_zones: Iterable[str] = ()) -> ZoneCatalog:
    """Read and check a zone catalog file (UTF-8 YAML); every problem is a CatalogError naming the line.

    ``known_zones``: zones defined elsewhere (a lower tier's upstream catalog) that ``access`` may name.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(str(path), None, f"no zone catalog at {path}") from None
    except OSError as exc:
        raise CatalogError(str(path), None, f"cannot read the zone catalog: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CatalogError(str(path), line, "the file is not UTF-8; save it as UTF-8") from None
    return parse_catalog(text, str(path), known_zones)


def parse_catalog(text: str, path: str = "<string>", known_zones: Iterable[str] = ()) -> ZoneCatalog:
    """Parse and check a zone catalog given as YAML text; ``path`` only names it in errors."""
    return _Parser(path, known_zones).catalog(text)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _Parser:
    """Walks the YAML node tree (not plain Python objects) so every error knows its line."""

    def __init__(self, path: str, known_zones: Iterable[str] = ()) -> None:
        self.path = path
        self.known_zones = frozenset(known_zones)

    def fail(self, line: int | None, message: str) -> CatalogError:
        return CatalogError(self.path, line, message)

    def catalog(self, text: str) -> ZoneCatalog:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            detail = "; ".join(p for p in (exc.context, exc.problem) if p)
            raise self.fail(mark.line + 1 if mark else None, f"invalid YAML: {detail}") from None
        except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow
            position = getattr(exc, "position", None)
            line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
            raise self.fail(line, f"invalid YAML: {exc}") from None
        if root is None:
            raise self.fail(None, "the catalog is empty; it needs a top-level 'zones:' list")
        if not isinstance(root, MappingNode):
            raise self.fail(_line(root), "the top level must be a mapping with a 'zones:' list")
        top = self.mapping(root, TOP_KEYS, "at the top level")
        if "zones" not in top:
            raise self.fail(_line(root), "the top level has no 'zones:' list")
        _key, items = top["zones"]
        if not isinstance(items, SequenceNode) or self.is_null(items):
            raise self.fail(_line(items), "'zones' must be a list of zones, each starting with '- name:'")
        if not items.value:
            raise self.fail(_line(items), "'zones' is empty; define at least one zone")
        zones: list[Zone] = []
        names: dict[str, Zone] = {}
        seen: dict[Network, tuple[Zone | None, int]] = {}  # network -> (zone, line of the CIDR)
        for item in items.value:
            zone = self.zone(item, names, seen)
            names[zone.name] = zone
            for net in zone.networks:
                seen[net] = (zone, seen[net][1])
            zones.append(zone)
        access = self.access(top["access"][1], names) if "access" in top else {}
        return ZoneCatalog(zones, access)

    def access(self, node: Node, names: dict[str, Zone]) -> dict[str, tuple[str, ...]]:
        """``access:`` maps a host role (or "*") to the zones, by name or kind, its hosts may reach."""
        if not isinstance(node, MappingNode):
            raise self.fail(
                _line(node), "'access' must map a host role (or \"*\") to a list of zone names or kinds"
            )
        policy: dict[str, tuple[str, ...]] = {}
        for key, value in node.value:
            role = self.text(key, "a role in 'access'").strip()
            if role in policy:
                raise self.fail(_line(key), f"role {role!r} is given twice in 'access'")
            if not isinstance(value, SequenceNode):
                raise self.fail(
                    _line(value), f"access for role {role!r} must be a list of zone names or kinds"
                )
            allowed = []
            for item in value.value:
                target = self.text(item, f"a zone in access for role {role!r}")
                if target not in names and target not in self.known_zones and target not in ZONE_KINDS:
                    raise self.fail(
                        _line(item),
                        f"{target!r} in access for role {role!r} is neither a zone of this catalog nor a "
                        f"kind ({', '.join(ZONE_KINDS)})",
                    )
                allowed.append(target)
            policy[role] = tuple(allowed)
        return policy

    @staticmethod
    def is_null(node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _NULL_TAG

    def mapping(self, node: MappingNode, known: tuple[str, ...], where: str) -> dict[str, tuple[Node, Node]]:
        found: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name not in known:
                shown = repr(name) if name is not None else "a non-text key"
                raise self.fail(_line(key), f"unknown key {shown} {where}; known keys: {', '.join(known)}")
            assert name is not None
            if name in found:
                first = _line(found[name][0])
                raise self.fail(_line(key), f"key {name!r} is given twice {where} (first at line {first})")
            found[name] = (key, value)
        return found

    def text(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode):
            raise self.fail(_line(node), f"{what} must be a single value, not a list or mapping")
        return "" if node.tag == _NULL_TAG else str(node.value)

    def zone(self, node: Node, names: dict[str, Zone], seen: dict[Network, tuple[Zone | None, int]]) -> Zone:
        if not isinstance(node, MappingNode):
            raise self.fail(
                _line(node), "each zone must be a mapping of keys like 'name:', 'kind:', 'cidrs:'"
            )
        line = _line(node)
        fields = self.mapping(node, ZONE_KEYS, "in a zone")
        if "name" not in fields:
            raise self.fail(line, "the zone has no 'name:'")
        name_node = fields["name"][1]
        name = self.name(self.text(name_node, "name"), _line(name_node))
        if name in names:
            first = names[name].line
            raise self.fail(line, f"zone name {name!r} is used twice: line {first} and line {line}")
        where = f"zone {name!r}"

        if "kind" not in fields:
            raise self.fail(line, f"{where} has no 'kind:'; allowed: {', '.join(ZONE_KINDS)}")
        kind_node = fields["kind"][1]
        kind = self.text(kind_node, "kind")
        if kind not in ZONE_KINDS:
            raise self.fail(
                _line(kind_node), f"unknown kind {kind!r} for {where}; allowed: {', '.join(ZONE_KINDS)}"
            )

        direction = ""
        if kind == "extranet":
            if "direction" not in fields:
                raise self.fail(line, f"extranet {where} needs 'direction:' {' or '.join(DIRECTIONS)}")
            dir_node = fields["direction"][1]
            direction = self.text(dir_node, "direction")
            if direction not in DIRECTIONS:
                raise self.fail(
                    _line(dir_node),
                    f"unknown direction {direction!r} for {where}; allowed: {', '.join(DIRECTIONS)}",
                )
        elif "direction" in fields:
            raise self.fail(
                _line(fields["direction"][0]),
                f"'direction:' applies only to extranet zones; {where} is {kind}",
            )

        department = ""
        if kind == "dedicated":
            if "department" not in fields:
                raise self.fail(line, f"dedicated {where} needs 'department:', the department that owns it")
            dept_node = fields["department"][1]
            department = self.text(dept_node, "department").strip()
            if not department:
                raise self.fail(_line(dept_node), f"'department:' of {where} is empty")
        elif "department" in fields:
            raise self.fail(
                _line(fields["department"][0]),
                f"'department:' applies only to dedicated zones; {where} is {kind}",
            )

        if "cidrs" not in fields:
            raise self.fail(line, f"{where} has no 'cidrs:' list")
        networks = self.cidrs(fields["cidrs"][1], where, seen)

        capacity = 0
        if "capacity" in fields:
            cap_node = fields["capacity"][1]
            cap_text = self.text(cap_node, "capacity")
            if not cap_text:
                raise self.fail(
                    _line(cap_node), f"'capacity:' of {where} is empty; remove it or give e.g. 1G"
                )
            try:
                capacity = parse_capacity(cap_text)
            except ValueError as exc:
                raise self.fail(_line(cap_node), f"{where}: {exc}") from None
        admin = False
        if "admin" in fields:
            admin_node = fields["admin"][1]
            flag = self.text(admin_node, "admin").lower()
            if flag not in ("true", "false", "yes", "no"):
                raise self.fail(_line(admin_node), f"'admin:' of {where} must be true or false, got {flag!r}")
            admin = flag in ("true", "yes")
        return Zone(name, kind, direction, department, networks, capacity, line, admin)

    def name(self, name: str, line: int) -> str:
        if not name.strip():
            raise self.fail(line, "the zone name is empty")
        if len(name) > MAX_NAME_CHARS:
            raise self.fail(
                line, f"zone name {name[:20]!r}... is {len(name)} characters; at most {MAX_NAME_CHARS}"
            )
        if any(unicodedata.category(ch) == "Cc" for ch in name):
            raise self.fail(line, f"zone name {name!r} contains control characters")
        if name != name.strip():
            raise self.fail(line, f"zone name {name!r} begins or ends with spaces")
        if name in RESERVED_NAMES:
            raise self.fail(line, f"zone name {name!r} is reserved for peers outside every zone")
        return name

    def cidrs(
        self, node: Node, where: str, seen: dict[Network, tuple[Zone | None, int]]
    ) -> tuple[Network, ...]:
        if not isinstance(node, SequenceNode):
            raise self.fail(_line(node), f"'cidrs:' of {where} must be a list, e.g. cidrs: [10.0.0.0/8]")
        if not node.value:
            raise self.fail(_line(node), f"'cidrs:' of {where} is empty; give at least one CIDR")
        networks: list[Network] = []
        for item in node.value:
            line = _line(item)
            text = self.text(item, "a CIDR").strip()
            try:
                net = ipaddress.ip_network(text)
            except ValueError as exc:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise self.fail(
                        line, f"{text!r} in {where} is not a valid CIDR ({exc}); e.g. 10.0.0.0/8 or fd00::/8"
                    ) from None
                raise self.fail(line, f"{text} has host bits set; did you mean {loose}?") from None
            if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
                raise self.fail(
                    line,
                    f"{net} is IPv4-mapped IPv6; write it as IPv4 (mapped addresses are looked up as IPv4)",
                )
            if net in seen:
                other, other_line = seen[net]
                owner = f"zone {other.name!r}" if other else where
                raise self.fail(line, f"{net} is listed twice: in {owner} (line {other_line}) and in {where}")
            seen[net] = (None, line)  # the caller fills in the zone once it is built
            networks.append(net)
        return tuple(networks)

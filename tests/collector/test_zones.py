"""The zone catalog: the sample loads, lookups take the longest prefix, flatten tiles the address space,
the version follows content only, and every mistake in zones.yaml is named with its line."""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import random
import textwrap
import time
from pathlib import Path

import pytest

from collector.errors import CollectorError
from collector.zones import (
    ZONE_KINDS,
    CatalogError,
    Zone,
    ZoneCatalog,
    load_catalog,
    parse_capacity,
    parse_catalog,
)

SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "zones.sample.yaml"
G = 1_000_000_000


def catalog(text: str) -> ZoneCatalog:
    return parse_catalog(textwrap.dedent(text))


def brute_zone(zones: tuple[Zone, ...], address: str | int, family: int) -> Zone | None:
    """The longest prefix holding ``address``, by trying every network; IPv4-mapped IPv6 looked up as IPv4."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else _addr(address, family)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    best: tuple[int, Zone] | None = None
    for zone in zones:
        for net in zone.networks:
            if net.version == addr.version and addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, zone)
    return best[1] if best else None


def _addr(value: int, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)


def check_flatten(
    cat: ZoneCatalog, family: int, rng: random.Random, samples: int = 300, brute: bool = True
) -> None:
    ranges = cat.flatten(family)
    top = (1 << (32 if family == 4 else 128)) - 1
    assert ranges[0][0] == 0
    assert ranges[-1][1] == top
    for (_f1, last, owner), (first, _l2, next_owner) in itertools.pairwise(ranges):
        assert first == last + 1, "a gap or an overlap between neighbouring ranges"
        assert owner is not next_owner, "neighbours with the same owner were not merged"
    for first, last, owner in ranges:
        assert first <= last
        for probe in {first, last, (first + last) // 2}:
            assert cat.zone_of(_addr(probe, family)) is owner
            assert not brute or brute_zone(cat.zones, probe, family) is owner
    starts = [r[0] for r in ranges]
    for _ in range(samples):
        value = rng.randint(0, top)
        index = bisect.bisect_right(starts, value) - 1
        expected = brute_zone(cat.zones, value, family)
        assert ranges[index][2] is expected
        assert cat.zone_of(_addr(value, family)) is expected


# ---------------------------------------------------------------- the sample


def test_sample_loads_with_every_kind() -> None:
    cat = load_catalog(SAMPLE)
    assert {z.kind for z in cat.zones} == set(ZONE_KINDS)
    vertical = cat.by_name("省电子政务外网（纵向）")
    horizontal = cat.by_name("市电子政务外网（横向）")
    assert vertical is not None and horizontal is not None
    assert (vertical.direction, vertical.capacity_bps) == ("vertical", 1 * G)
    assert (horizontal.direction, horizontal.capacity_bps) == ("horizontal", 10 * G)
    departments = {z.name: z.department for z in cat.zones if z.kind == "dedicated"}
    assert departments == {"公安专网": "市公安局", "社保专网": "市人社局", "医保专网": "市医保局"}
    assert all(z.direction == "" for z in cat.zones if z.kind != "extranet")
    assert all(z.department == "" for z in cat.zones if z.kind != "dedicated")
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    for zone in cat.zones:
        assert f"name: {zone.name}" in lines[zone.line - 1]
    assert cat.by_name("no such zone") is None


def test_sample_lookups_and_flatten() -> None:
    cat = load_catalog(SAMPLE)

    def name(address: str) -> str | None:
        zone = cat.zone_of(address)
        return zone.name if zone else None

    assert name("10.32.7.9") == "市电子政务外网（横向）"
    assert name("fd5e:2a00:1::8") == "省电子政务外网（纵向）"
    assert name("172.20.0.1") == "公安专网"
    assert name("192.168.200.200") == "涉密网"
    assert name("8.8.8.8") == "互联网"
    assert name("2001:db8::1") == "互联网"
    assert name("127.0.0.1") == name("::1") == name("fe80::1") == "本机与链路本地"
    rng = random.Random(20261128)
    check_flatten(cat, 4, rng)
    check_flatten(cat, 6, rng)


# ---------------------------------------------------------------- lookups

OVERLAPS = """\
zones:
  - name: 外网
    kind: extranet
    direction: horizontal
    cidrs: [10.0.0.0/8, "fd00::/8"]
  - name: 公安专网
    kind: dedicated
    department: 市公安局
    cidrs: [10.20.0.0/16, "fd00:20::/32"]
  - name: 机房
    kind: local
    cidrs: [10.20.30.0/24, 10.20.30.40/32, "fd00:20:30::/48"]
"""


def test_zone_of_takes_the_longest_prefix() -> None:
    cat = parse_catalog(OVERLAPS)
    outer, dedicated, room = cat.zones
    assert cat.zone_of("10.1.2.3") is outer
    assert cat.zone_of("10.20.1.1") is dedicated
    assert cat.zone_of("10.20.30.1") is room
    assert cat.zone_of("10.20.30.40") is room
    assert cat.zone_of("10.21.0.0") is outer
    assert cat.zone_of("10.19.255.255") is outer
    assert cat.zone_of("fd00:1::1") is outer
    assert cat.zone_of("fd00:20:1::1") is dedicated
    assert cat.zone_of("fd00:20:30::ffff") is room
    assert cat.zone_of(ipaddress.ip_address("10.20.30.1")) is room
    assert cat.zone_of(ipaddress.IPv6Address("fd00:20::1")) is dedicated


def test_zone_of_unknown_without_an_internet_zone() -> None:
    cat = parse_catalog(OVERLAPS)
    assert cat.zone_of("11.0.0.0") is None
    assert cat.zone_of("9.255.255.255") is None
    assert cat.zone_of("2001:db8::1") is None
    assert cat.zone_of("fe00::1") is None


def test_ipv4_mapped_addresses_are_looked_up_as_ipv4() -> None:
    cat = parse_catalog(OVERLAPS + '  - name: 互联网\n    kind: internet\n    cidrs: ["::/0"]\n')
    assert cat.zone_of("::ffff:10.20.30.1") is cat.by_name("机房")
    # Not in any IPv4 zone: the IPv6 default route does not claim it.
    assert cat.zone_of("::ffff:11.0.0.1") is None
    assert cat.zone_of("2001:db8::1") is cat.by_name("互联网")


def test_zone_of_refuses_a_non_address() -> None:
    with pytest.raises(ValueError):
        parse_catalog(OVERLAPS).zone_of("10.0.0")


def test_catalog_built_in_code_refuses_duplicates() -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    a = Zone("a", "internet", "", "", (net,))
    with pytest.raises(ValueError, match="twice"):
        ZoneCatalog([a, Zone("a", "local", "", "", (ipaddress.ip_network("::1/128"),))])
    with pytest.raises(ValueError, match="both"):
        ZoneCatalog([a, Zone("b", "local", "", "", (net,))])


# ---------------------------------------------------------------- version


def test_version_ignores_formatting_comments_and_order() -> None:
    reformatted = """\
# the same zones, written differently
zones:
- cidrs:
  - 10.20.30.40/32      # the jump host
  - fd00:20:30::/48
  - 10.20.30.0/24
  kind: local
  name: 机房
- {name: 外网, cidrs: [fd00::/8, 10.0.0.0/8], direction: horizontal, kind: extranet}
- department: 市公安局
  name: "公安专网"
  cidrs: ["fd00:20::/32", '10.20.0.0/16']
  kind: dedicated
"""
    original = parse_catalog(OVERLAPS)
    assert len(original.version) == 16
    int(original.version, 16)
    assert parse_catalog(reformatted).version == original.version
    assert parse_catalog(OVERLAPS, "other/path.yaml").version == original.version


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("10.20.30.0/24", "10.20.31.0/24"),
        ("name: 机房", "name: 机房2"),
        ("kind: local", "kind: classified"),
        ("direction: horizontal", "direction: vertical"),
        ("department: 市公安局", "department: 市人社局"),
        ('"fd00::/8"]', '"fd00::/8"]\n    capacity: 1G'),
    ],
)
def test_version_changes_with_content(old: str, new: str) -> None:
    assert old in OVERLAPS
    assert parse_catalog(OVERLAPS.replace(old, new)).version != parse_catalog(OVERLAPS).version


def test_capacity_changes_version() -> None:
    one = parse_catalog(OVERLAPS.replace('"fd00::/8"]', '"fd00::/8"]\n    capacity: 1G'))
    same = parse_catalog(OVERLAPS.replace('"fd00::/8"]', '"fd00::/8"]\n    capacity: 1000000000'))
    two = parse_catalog(OVERLAPS.replace('"fd00::/8"]', '"fd00::/8"]\n    capacity: 2G'))
    assert one.version == same.version != two.version


# ---------------------------------------------------------------- flatten


def test_flatten_hand_checked() -> None:
    cat = parse_catalog(OVERLAPS)
    outer, dedicated, room = cat.zones

    def ip(text: str) -> int:
        return int(ipaddress.IPv4Address(text))

    assert cat.flatten(4) == [
        (0, ip("9.255.255.255"), None),
        (ip("10.0.0.0"), ip("10.19.255.255"), outer),
        (ip("10.20.0.0"), ip("10.20.29.255"), dedicated),
        (ip("10.20.30.0"), ip("10.20.30.255"), room),
        (ip("10.20.31.0"), ip("10.20.255.255"), dedicated),
        (ip("10.21.0.0"), ip("10.255.255.255"), outer),
        (ip("11.0.0.0"), 2**32 - 1, None),
    ]


def test_flatten_of_an_empty_family_is_one_unowned_range() -> None:
    cat = catalog(
        """\
        zones:
          - name: 本机
            kind: local
            cidrs: ["::1/128"]
        """
    )
    assert cat.flatten(4) == [(0, 2**32 - 1, None)]
    with pytest.raises(ValueError, match="4 or 6"):
        cat.flatten(5)


def test_flatten_6_of_an_ipv4_only_catalog_holds_only_the_mapped_ipv4_zones() -> None:
    cat = catalog(
        """\
        zones:
          - name: 本机
            kind: local
            cidrs: [127.0.0.0/8]
        """
    )
    first = int(ipaddress.IPv6Address("::ffff:127.0.0.0"))
    assert cat.flatten(6) == [
        (0, first - 1, None),
        (first, first + 2**24 - 1, cat.zones[0]),
        (first + 2**24, 2**128 - 1, None),
    ]


def test_flatten_merges_neighbours_of_one_zone() -> None:
    cat = catalog(
        """\
        zones:
          - name: 外网
            kind: extranet
            direction: vertical
            cidrs: [10.0.0.0/9, 10.128.0.0/9, 0.0.0.0/0]
        """
    )
    assert cat.flatten(4) == [(0, 2**32 - 1, cat.zones[0])]


def random_catalog(rng: random.Random, count: int) -> ZoneCatalog:
    """Nested and disjoint networks around a few hot spots, so overlaps of every depth occur."""
    names = [f"zone-{i}" for i in range(12)]
    networks: dict[str, list[str]] = {n: [] for n in names}
    used: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    hot4 = [rng.getrandbits(32) for _ in range(4)]
    hot6 = [rng.getrandbits(128) for _ in range(4)]
    while len(used) < count:
        if rng.random() < 0.5:
            base, bits = rng.choice(hot4) ^ rng.getrandbits(rng.choice((0, 4, 12))), 32
            net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
                (base, rng.randint(0, 32)), strict=False
            )
        else:
            base, bits = rng.choice(hot6) ^ rng.getrandbits(rng.choice((0, 8, 40))), 128
            net = ipaddress.IPv6Network((base, rng.randint(0, bits)), strict=False)
            if net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
                continue
        if net not in used:
            used.add(net)
            networks[rng.choice(names)].append(str(net))
    lines = ["zones:"]
    for name in names:
        if networks[name]:
            cidrs = ", ".join(f'"{c}"' for c in networks[name])
            lines += [f"  - name: {name}", "    kind: internet", f"    cidrs: [{cidrs}]"]
    return parse_catalog("\n".join(lines) + "\n")


@pytest.mark.parametrize("seed", range(8))
def test_flatten_agrees_with_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    cat = random_catalog(rng, 60)
    check_flatten(cat, 4, rng)
    check_flatten(cat, 6, rng)


def test_flatten_splices_ipv4_into_the_mapped_block() -> None:
    cat = parse_catalog(OVERLAPS + '  - name: 互联网\n    kind: internet\n    cidrs: ["::/0"]\n')
    check_flatten(cat, 6, random.Random(7))
    mapped = int(ipaddress.IPv6Address("::ffff:0.0.0.0"))
    room = cat.by_name("机房")
    first = mapped + int(ipaddress.IPv4Address("10.20.30.0"))
    assert (first, first + 255, room) in cat.flatten(6)


def test_flatten_is_fast_for_thousands_of_networks() -> None:
    rng = random.Random(99)
    cat = random_catalog(rng, 3000)
    started = time.perf_counter()
    ranges = cat.flatten(4) + cat.flatten(6)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"flatten took {elapsed:.2f}s"
    assert len(ranges) > 3000
    check_flatten(cat, 4, rng, samples=50, brute=False)
    check_flatten(cat, 6, rng, samples=50, brute=False)


# ---------------------------------------------------------------- errors in zones.yaml

ZONE = "  - name: 外网\n    kind: extranet\n    direction: vertical\n    cidrs: [10.0.0.0/8]\n"  # lines 2-5


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # YAML itself
        ("zones:\n  - name: [unclosed\n", 3, "invalid YAML"),
        ("zones:\n  - name: a\n   kind: local\n", 3, "invalid YAML"),
        ("zones:\n  - name: a\n\tkind: local\n", 3, "invalid YAML"),
        # top level
        ("", None, "empty"),
        ("# nothing but a comment\n", None, "empty"),
        ("- name: a\n", 1, "top level must be a mapping"),
        ("just text\n", 1, "top level must be a mapping"),
        ("zone:\n" + ZONE, 1, "unknown key 'zone' at the top level; known keys: zones"),
        ("version: 2\nzones:\n" + ZONE, 1, "unknown key 'version'"),
        ("zones:\n" + ZONE + "zones:\n" + ZONE, 6, "key 'zones' is given twice"),
        ("zones: 10.0.0.0/8\n", 1, "'zones' must be a list"),
        ("zones:\n", 1, "'zones' must be a list"),
        ("zones: {name: a}\n", 1, "'zones' must be a list"),
        ("zones: []\n", 1, "'zones' is empty"),
        # a zone's shape
        ("zones:\n  - 外网\n", 2, "each zone must be a mapping"),
        ("zones:\n" + ZONE + "  - [a, b]\n", 6, "each zone must be a mapping"),
        (
            "zones:\n" + ZONE + "    capacty: 1G\n",
            6,
            "unknown key 'capacty' in a zone; known keys: name, kind,",
        ),
        ("zones:\n" + ZONE + "    kind: local\n", 6, "key 'kind' is given twice in a zone (first at line 3)"),
        # names
        ("zones:\n  - kind: local\n    cidrs: [127.0.0.0/8]\n", 2, "has no 'name:'"),
        ("zones:\n  - name:\n    kind: local\n    cidrs: [127.0.0.0/8]\n", 2, "name is empty"),
        ('zones:\n  - name: "  "\n    kind: local\n    cidrs: [127.0.0.0/8]\n', 2, "name is empty"),
        (
            "zones:\n  - name: [a]\n    kind: local\n    cidrs: [127.0.0.0/8]\n",
            2,
            "name must be a single value",
        ),
        (f"zones:\n  - name: {'网' * 65}\n    kind: local\n    cidrs: [127.0.0.0/8]\n", 2, "65 characters"),
        ('zones:\n  - name: "a\\tb"\n    kind: local\n    cidrs: [127.0.0.0/8]\n', 2, "control characters"),
        ('zones:\n  - name: "a\\x07"\n    kind: local\n    cidrs: [127.0.0.0/8]\n', 2, "control characters"),
        ('zones:\n  - name: " 外网"\n    kind: local\n    cidrs: [127.0.0.0/8]\n', 2, "begins or ends"),
        ("zones:\n  - name: unknown\n    kind: local\n    cidrs: [127.0.0.0/8]\n", 2, "reserved"),
        ("zones:\n" + ZONE + ZONE.replace("10.0", "11.0"), 6, "'外网' is used twice: line 2 and line 6"),
        # kind, direction, department
        (
            "zones:\n  - name: a\n    cidrs: [127.0.0.0/8]\n",
            2,
            "has no 'kind:'; allowed: extranet, dedicated",
        ),
        (
            "zones:\n  - name: a\n    kind: special\n    cidrs: [127.0.0.0/8]\n",
            3,
            "unknown kind 'special' for zone 'a'; allowed: extranet, dedicated, internet, classified, local",
        ),
        (
            "zones:\n  - name: a\n    kind: extranet\n    cidrs: [10.0.0.0/8]\n",
            2,
            "needs 'direction:' vertical",
        ),
        (
            "zones:\n  - name: a\n    kind: extranet\n    direction: up\n    cidrs: [10.0.0.0/8]\n",
            4,
            "unknown direction 'up' for zone 'a'; allowed: vertical, horizontal",
        ),
        (
            "zones:\n  - name: a\n    kind: internet\n    direction: vertical\n    cidrs: [0.0.0.0/0]\n",
            4,
            "'direction:' applies only to extranet zones; zone 'a' is internet",
        ),
        ("zones:\n  - name: a\n    kind: dedicated\n    cidrs: [10.0.0.0/8]\n", 2, "needs 'department:'"),
        (
            "zones:\n  - name: a\n    kind: dedicated\n    department:\n    cidrs: [10.0.0.0/8]\n",
            4,
            "is empty",
        ),
        (
            "zones:\n  - name: a\n    kind: local\n    department: 市公安局\n    cidrs: [127.0.0.0/8]\n",
            4,
            "'department:' applies only to dedicated zones; zone 'a' is local",
        ),
        # cidrs
        ("zones:\n  - name: a\n    kind: local\n", 2, "zone 'a' has no 'cidrs:'"),
        ("zones:\n  - name: a\n    kind: local\n    cidrs: 127.0.0.0/8\n", 4, "must be a list"),
        ("zones:\n  - name: a\n    kind: local\n    cidrs:\n", 4, "must be a list"),
        ("zones:\n  - name: a\n    kind: local\n    cidrs: []\n", 4, "'cidrs:' of zone 'a' is empty"),
        (
            "zones:\n  - name: a\n    kind: local\n    cidrs:\n      - 127.0.0.0/8\n      - 127.0.0.300/32\n",
            6,
            "'127.0.0.300/32' in zone 'a' is not a valid CIDR",
        ),
        ("zones:\n  - name: a\n    kind: local\n    cidrs: [10.0.0.0/33]\n", 4, "not a valid CIDR"),
        ("zones:\n  - name: a\n    kind: local\n    cidrs: [localhost]\n", 4, "not a valid CIDR"),
        ("zones:\n  - name: a\n    kind: local\n    cidrs: [[10.0.0.0/8]]\n", 4, "must be a single value"),
        (
            "zones:\n  - name: a\n    kind: local\n    cidrs: [10.1.2.3/8]\n",
            4,
            "10.1.2.3/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            'zones:\n  - name: a\n    kind: local\n    cidrs: ["fd00::1/64"]\n',
            4,
            "fd00::1/64 has host bits set; did you mean fd00::/64?",
        ),
        ('zones:\n  - name: a\n    kind: local\n    cidrs: ["::ffff:10.0.0.0/104"]\n', 4, "write it as IPv4"),
        (
            "zones:\n  - name: a\n    kind: local\n    cidrs:\n      - 127.0.0.0/8\n      - 127.0.0.0/8\n",
            6,
            "127.0.0.0/8 is listed twice: in zone 'a' (line 5) and in zone 'a'",
        ),
        (
            "zones:\n" + ZONE + "  - name: b\n    kind: internet\n    cidrs: [0.0.0.0/0, 10.0.0.0/8]\n",
            8,
            "10.0.0.0/8 is listed twice: in zone '外网' (line 5) and in zone 'b'",
        ),
        (
            'zones:\n  - name: a\n    kind: local\n    cidrs: ["fd00::/8"]\n'
            '  - name: b\n    kind: local\n    cidrs: ["FD00:0::/8"]\n',
            7,
            "fd00::/8 is listed twice: in zone 'a' (line 4)",
        ),
        # capacity
        ("zones:\n" + ZONE + "    capacity: -1G\n", 6, "zone '外网': capacity '-1G' is negative"),
        ("zones:\n" + ZONE + "    capacity: -5\n", 6, "negative"),
        ("zones:\n" + ZONE + "    capacity: fast\n", 6, "capacity 'fast' is not understood"),
        ("zones:\n" + ZONE + "    capacity: 1GB\n", 6, "B means bytes"),
        ("zones:\n" + ZONE + "    capacity:\n", 6, "'capacity:' of zone '外网' is empty"),
        ("zones:\n" + ZONE + "    capacity: [1G]\n", 6, "capacity must be a single value"),
    ],
)
def test_catalog_errors_name_the_line(text: str, line: int | None, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "zones.yaml")
    error = caught.value
    assert error.line == line, str(error)
    assert message in error.message, str(error)
    assert error.path == "zones.yaml"
    assert str(error) == (f"zones.yaml:{line}: {error.message}" if line else f"zones.yaml: {error.message}")


def test_the_error_is_a_collector_error_for_the_cli() -> None:
    with pytest.raises(CollectorError, match=r"^<string>:1: "):
        parse_catalog("zones: []\n")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "zones.yaml"
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    assert str(caught.value) == f"{path}: no zone catalog at {path}"
    assert caught.value.line is None


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read the zone catalog"):
        load_catalog(tmp_path)


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "zones.yaml"
    path.write_bytes("zones:\n  - name: 公安专网\n".encode("gbk"))
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    assert caught.value.line == 2
    assert "not UTF-8" in caught.value.message


def test_utf8_file_with_bom_and_chinese_names(tmp_path: Path) -> None:
    path = tmp_path / "zones.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + OVERLAPS.encode("utf-8"))
    cat = load_catalog(path)
    assert [z.name for z in cat.zones] == ["外网", "公安专网", "机房"]
    assert [z.line for z in cat.zones] == [2, 6, 10]
    assert cat.version == parse_catalog(OVERLAPS).version


# ---------------------------------------------------------------- capacity


@pytest.mark.parametrize(
    ("value", "bps"),
    [
        (0, 0),
        (1_000_000_000, G),
        ("1000000000", G),
        ("1_000_000", 1_000_000),
        ("500M", 500_000_000),
        ("500m", 500_000_000),
        ("1G", G),
        ("2.5G", 2_500_000_000),
        ("10Gbit", 10 * G),
        ("10 Gbit/s", 10 * G),
        ("100Mbps", 100_000_000),
        ("64kbps", 64_000),
        ("64K", 64_000),
        ("1T", 10**12),
        (" 1G ", G),
    ],
)
def test_parse_capacity(value: int | str, bps: int) -> None:
    assert parse_capacity(value) == bps


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "negative"),
        ("-1G", "negative"),
        ("", "not understood"),
        ("G", "not understood"),
        ("1X", "not understood"),
        ("1.5", "whole number"),
        ("1.0000000001G", "whole number"),
        ("100MBps", "bytes"),
        ("1GB", "bytes"),
        ("99999999999T", "implausibly large"),
        (True, "bits per second"),
        (1.5, "bits per second"),
    ],
)
def test_parse_capacity_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_capacity(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- admin zones and the access policy

ACCESS = """\
zones:
  - {name: 运维区, kind: extranet, direction: horizontal, admin: true, cidrs: [10.9.0.0/16]}
  - {name: 横向, kind: extranet, direction: horizontal, cidrs: [10.0.0.0/8]}
  - {name: 公安专网, kind: dedicated, department: 市公安局, cidrs: [172.20.0.0/16]}
  - {name: 互联网, kind: internet, cidrs: [0.0.0.0/0]}
  - {name: 涉密网, kind: classified, cidrs: [192.168.200.0/24]}
access:
  office: [extranet, 公安专网]
  "*": [extranet, internet, classified]
"""


def test_admin_zones_and_the_access_policy_are_read() -> None:
    cat = parse_catalog(ACCESS)
    assert [z.name for z in cat.zones if z.admin] == ["运维区"]
    assert cat.allows("office", "横向") and cat.allows("office", "公安专网")
    assert not cat.allows("office", "互联网")
    assert cat.allows("server", "互联网")  # "*" answers for roles not listed
    assert not cat.allows("server", "公安专网")
    assert not cat.allows("server", "涉密网")  # classified never, whatever the policy says
    assert cat.allows("office", "unknown")  # peers in no zone are not judged


def test_without_an_access_policy_everything_but_classified_may_be_reached() -> None:
    cat = parse_catalog(ACCESS.split("access:")[0])
    assert cat.allows("office", "互联网") and not cat.allows("office", "涉密网")


def test_the_admin_flag_changes_the_version_only_when_set() -> None:
    plain = ACCESS.split("access:")[0].replace(", admin: true", "")
    flagged = ACCESS.split("access:")[0]
    off = plain.replace("horizontal, cidrs: [10.9", "horizontal, admin: false, cidrs: [10.9")
    assert parse_catalog(plain).version == parse_catalog(off).version != parse_catalog(flagged).version


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (ACCESS.replace("admin: true", "admin: maybe"), 2, "must be true or false"),
        (ACCESS.replace("office: [extranet, 公安专网]", "office: [extranet, 无此区]"), 8, "neither a zone"),
        (ACCESS.replace("office: [extranet, 公安专网]", "office: extranet"), 8, "must be a list"),
        (ACCESS.replace('  "*": [extranet, internet, classified]', "  office: [local]"), 9, "given twice"),
        (
            ACCESS.replace("access:\n", "access: everything\n").split("\n  office")[0],
            7,
            "must map a host role",
        ),
    ],
)
def test_access_policy_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "zones.yaml")
    assert caught.value.line == line and message in caught.value.message, caught.value

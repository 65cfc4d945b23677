"""The inventory sensor: real `ip -j` output parsed, diffs, resolvers and OS, the agent's tick, and a
real run in a test host where the test changes addresses, routes and rules and the sensor reports
exactly that."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from testnet import TestNetwork, in_netns, require_root_netns

from agent.config import AgentConfig
from agent.errors import SensorError
from agent.runner import Agent
from agent.sensors.interfaces import InterfaceSampler, RawCounters
from agent.sensors.inventory import (
    Address,
    InventoryReport,
    InventorySensor,
    IpDump,
    Route,
    parse_addresses,
    parse_batch_output,
    parse_os_release,
    parse_resolv_conf,
    parse_routes,
    parse_rules,
    resolvers,
    rule_text,
    run_ip,
)
from agent.wire import inventory_fact
from protos.zonewatch.v1 import agent_pb2

# `ip -4 -j -batch -` and `ip -6 -j -batch -` ("addr show", "route show table all", "rule show"),
# captured on this machine (iproute2 6.1) in a network namespace set up as a host on the extranet
# (eth0) that still has its dedicated network (eth1) behind policy routing:
#   ip addr add 10.250.1.10/24 dev eth0; ip addr add fd00:250:1::10/64 dev eth0 nodad
#   ip addr add 10.250.2.10/24 dev eth1; ip addr add fd00:250:2::10/64 dev eth1 nodad
#   ip route add default via 10.250.1.1 dev eth0; ip -6 route add default via fd00:250:1::1 dev eth0
#   ip route add default via 10.250.2.1 dev eth1 table 100
#   ip route add 10.9.0.0/16 via 10.250.2.1 dev eth1 table 100 metric 5
#   ip route add unreachable 10.67.0.0/16 table 100
#   ip rule add from 10.250.2.0/24 lookup 100 pref 100
#   ip rule add to 10.9.0.0/16 fwmark 0x10/0xff lookup 100 pref 101
#   ip rule add from 10.3.0.0/16 blackhole pref 60
#   ip -6 route add default via fd00:250:2::1 dev eth1 table 200
#   ip -6 rule add from fd00:250:2::/64 lookup 200 pref 200
#   ip route add blackhole 10.66.0.0/16
#   ip route add 10.68.0.0/16 nexthop via 10.250.1.1 dev eth0 weight 1 \
#       nexthop via 10.250.2.1 dev eth1 weight 2
#   ip route add 10.70.0.5 dev eth1
IP4_BATCH = (
    '[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","'
    'operstate":"UNKNOWN","group":"default","txqlen":1000,"addr_info":[{"family":"inet","local":"127.'
    '0.0.1","prefixlen":8,"scope":"host","label":"lo","valid_life_time":4294967295,"preferred_life_ti'
    'me":4294967295}]},{"ifindex":2,"link_index":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","'
    'UP","LOWER_UP"],"mtu":1500,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"l'
    'ink_netnsid":0,"addr_info":[{"family":"inet","local":"10.250.1.10","prefixlen":24,"scope":"globa'
    'l","label":"eth0","valid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":3,'
    '"link_index":3,"ifname":"eth1","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"qdi'
    'sc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_netnsid":0,"addr_info":[{"f'
    'amily":"inet","local":"10.250.2.10","prefixlen":24,"scope":"global","label":"eth1","valid_life_t'
    'ime":4294967295,"preferred_life_time":4294967295}]}]\n[{"dst":"default","gateway":"10.250.2.1","d'
    'ev":"eth1","table":"100","flags":[]},{"dst":"10.9.0.0/16","gateway":"10.250.2.1","dev":"eth1","t'
    'able":"100","metric":5,"flags":[]},{"type":"unreachable","dst":"10.67.0.0/16","table":"100","fla'
    'gs":[]},{"dst":"default","gateway":"10.250.1.1","dev":"eth0","flags":[]},{"type":"blackhole","ds'
    't":"10.66.0.0/16","flags":[]},{"dst":"10.68.0.0/16","flags":[],"nexthops":[{"gateway":"10.250.1.'
    '1","dev":"eth0","weight":1,"flags":[]},{"gateway":"10.250.2.1","dev":"eth1","weight":2,"flags":['
    ']}]},{"dst":"10.70.0.5","dev":"eth1","scope":"link","flags":[]},{"dst":"10.250.1.0/24","dev":"et'
    'h0","protocol":"kernel","scope":"link","prefsrc":"10.250.1.10","flags":[]},{"dst":"10.250.2.0/24'
    '","dev":"eth1","protocol":"kernel","scope":"link","prefsrc":"10.250.2.10","flags":[]},{"type":"l'
    'ocal","dst":"10.250.1.10","dev":"eth0","table":"local","protocol":"kernel","scope":"host","prefs'
    'rc":"10.250.1.10","flags":[]},{"type":"broadcast","dst":"10.250.1.255","dev":"eth0","table":"loc'
    'al","protocol":"kernel","scope":"link","prefsrc":"10.250.1.10","flags":[]},{"type":"local","dst"'
    ':"10.250.2.10","dev":"eth1","table":"local","protocol":"kernel","scope":"host","prefsrc":"10.250'
    '.2.10","flags":[]},{"type":"broadcast","dst":"10.250.2.255","dev":"eth1","table":"local","protoc'
    'ol":"kernel","scope":"link","prefsrc":"10.250.2.10","flags":[]},{"type":"local","dst":"127.0.0.0'
    '/8","dev":"lo","table":"local","protocol":"kernel","scope":"host","prefsrc":"127.0.0.1","flags":'
    '[]},{"type":"local","dst":"127.0.0.1","dev":"lo","table":"local","protocol":"kernel","scope":"ho'
    'st","prefsrc":"127.0.0.1","flags":[]},{"type":"broadcast","dst":"127.255.255.255","dev":"lo","ta'
    'ble":"local","protocol":"kernel","scope":"link","prefsrc":"127.0.0.1","flags":[]}]\n[{"priority":'
    '0,"src":"all","table":"local"},{"priority":60,"src":"10.3.0.0","srclen":16,"action":"blackhole"}'
    ',{"priority":100,"src":"10.250.2.0","srclen":24,"table":"100"},{"priority":101,"src":"all","dst"'
    ':"10.9.0.0","dstlen":16,"fwmark":"0x10","fwmask":"0xff","table":"100"},{"priority":32766,"src":"'
    'all","table":"main"},{"priority":32767,"src":"all","table":"default"}]\n'
)

IP6_BATCH = (
    '[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"operstate":"UNKNOW'
    'N","txqlen":1000,"addr_info":[{"family":"inet6","local":"::1","prefixlen":128,"scope":"host","va'
    'lid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":2,"ifname":"eth0","flag'
    's":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"operstate":"UP","txqlen":1000,"addr_inf'
    'o":[{"family":"inet6","local":"fd00:250:1::10","prefixlen":64,"scope":"global","nodad":true,"val'
    'id_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fe80::300d'
    ':59ff:fe49:90bf","prefixlen":64,"scope":"link","tentative":true,"valid_life_time":4294967295,"pr'
    'eferred_life_time":4294967295}]},{"ifindex":3,"ifname":"eth1","flags":["BROADCAST","MULTICAST","'
    'UP","LOWER_UP"],"mtu":1500,"operstate":"UP","txqlen":1000,"addr_info":[{"family":"inet6","local"'
    ':"fd00:250:2::10","prefixlen":64,"scope":"global","nodad":true,"valid_life_time":4294967295,"pre'
    'ferred_life_time":4294967295},{"family":"inet6","local":"fe80::2889:50ff:feeb:84db","prefixlen":'
    '64,"scope":"link","tentative":true,"valid_life_time":4294967295,"preferred_life_time":4294967295'
    '}]}]\n[{"dst":"default","gateway":"fd00:250:2::1","dev":"eth1","table":"200","metric":1024,"flags'
    '":[],"pref":"medium"},{"dst":"fd00:250:1::/64","dev":"eth0","protocol":"kernel","metric":256,"fl'
    'ags":[],"pref":"medium"},{"dst":"fd00:250:2::/64","dev":"eth1","protocol":"kernel","metric":256,'
    '"flags":[],"pref":"medium"},{"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"fl'
    'ags":[],"pref":"medium"},{"dst":"fe80::/64","dev":"eth1","protocol":"kernel","metric":256,"flags'
    '":[],"pref":"medium"},{"dst":"default","gateway":"fd00:250:1::1","dev":"eth0","metric":1024,"fla'
    'gs":[],"pref":"medium"},{"type":"local","dst":"::1","dev":"lo","table":"local","protocol":"kerne'
    'l","metric":0,"flags":[],"pref":"medium"},{"type":"local","dst":"fd00:250:1::10","dev":"eth0","t'
    'able":"local","protocol":"kernel","metric":0,"flags":[],"pref":"medium"},{"type":"local","dst":"'
    'fd00:250:2::10","dev":"eth1","table":"local","protocol":"kernel","metric":0,"flags":[],"pref":"m'
    'edium"},{"type":"multicast","dst":"ff00::/8","dev":"eth0","table":"local","protocol":"kernel","m'
    'etric":256,"flags":[],"pref":"medium"},{"type":"multicast","dst":"ff00::/8","dev":"eth1","table"'
    ':"local","protocol":"kernel","metric":256,"flags":[],"pref":"medium"}]\n[{"priority":0,"src":"all'
    '","table":"local"},{"priority":200,"src":"fd00:250:2::","srclen":64,"table":"200"},{"priority":3'
    '2766,"src":"all","table":"main"}]\n'
)

RULES_JSON = (
    '[{"priority":0,"src":"all","table":"local"},{"priority":50,"src":"all","goto":32766},{"priority"'
    ':60,"src":"10.3.0.0","srclen":16,"action":"blackhole"},{"priority":98,"not":null,"src":"10.1.0.0'
    '","srclen":16,"uid_start":1000,"uid_end":2000,"ipproto":"tcp","dport":443,"table":"300"},{"prior'
    'ity":99,"src":"all","dst":"10.9.0.0","dstlen":16,"fwmark":"0x10","fwmask":"0xff","iif":"d0","tab'
    'le":"100"},{"priority":100,"src":"10.250.2.0","srclen":24,"table":"100"},{"priority":200,"src":"'
    'all","oif":"d1","table":"100"},{"priority":201,"src":"all","tos":"0x10","table":"100"},{"priorit'
    'y":202,"src":"10.5.0.0","srclen":16,"table":"100","suppress_prefixlen":0},{"priority":203,"src":'
    '"all","iif":"lo","table":"100"},{"priority":204,"src":"all","sport_start":1000,"sport_end":2000,'
    '"table":"100"},{"priority":205,"src":"all","l3mdev":null},{"priority":32766,"src":"all","table":'
    '"main"},{"priority":32767,"src":"all","table":"default"}]\n'
)

# `ip -j rule show` with every kind of selector, and what `ip rule show` printed for the same rules.
RULES_TEXT = """\
0:	from all lookup local
50:	from all goto 32766
60:	from 10.3.0.0/16 blackhole
98:	not from 10.1.0.0/16 uidrange 1000-2000 ipproto tcp dport 443 lookup 300
99:	from all to 10.9.0.0/16 fwmark 0x10/0xff iif d0 lookup 100
100:	from 10.250.2.0/24 lookup 100
200:	from all oif d1 lookup 100
201:	from all tos 0x10 lookup 100
202:	from 10.5.0.0/16 lookup 100 suppress_prefixlength 0
203:	from all iif lo lookup 100
204:	from all sport 1000-2000 lookup 100
205:	from all lookup [l3mdev-table]
32766:	from all lookup main
32767:	from all lookup default
"""

DEDICATED_POLICY = "from 10.250.2.0/24 lookup 100; from all to 10.9.0.0/16 fwmark 0x10/0xff lookup 100"
ADDRESSES = {
    Address("lo", "127.0.0.1/8"),
    Address("lo", "::1/128"),
    Address("eth0", "10.250.1.10/24"),
    Address("eth0", "fd00:250:1::10/64"),
    Address("eth0", "fe80::300d:59ff:fe49:90bf/64"),
    Address("eth1", "10.250.2.10/24"),
    Address("eth1", "fd00:250:2::10/64"),
    Address("eth1", "fe80::2889:50ff:feeb:84db/64"),
}
# Unicast routes only: the unreachable, blackhole, local, broadcast and multicast ones are left out.
ROUTES = {
    Route("0.0.0.0/0", "10.250.2.1", "eth1", 100, 0, DEDICATED_POLICY),
    Route("10.9.0.0/16", "10.250.2.1", "eth1", 100, 5, DEDICATED_POLICY),
    Route("0.0.0.0/0", "10.250.1.1", "eth0", 254, 0, ""),
    Route("10.68.0.0/16", "10.250.1.1", "eth0", 254, 0, ""),  # one per next hop
    Route("10.68.0.0/16", "10.250.2.1", "eth1", 254, 0, ""),
    Route("10.70.0.5/32", "", "eth1", 254, 0, ""),
    Route("10.250.1.0/24", "", "eth0", 254, 0, ""),
    Route("10.250.2.0/24", "", "eth1", 254, 0, ""),
    Route("::/0", "fd00:250:2::1", "eth1", 200, 1024, "from fd00:250:2::/64 lookup 200"),
    Route("fd00:250:1::/64", "", "eth0", 254, 256, ""),
    Route("fd00:250:2::/64", "", "eth1", 254, 256, ""),
    Route("fe80::/64", "", "eth0", 254, 256, ""),
    Route("fe80::/64", "", "eth1", 254, 256, ""),
    Route("::/0", "fd00:250:1::1", "eth0", 254, 1024, ""),
}

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
KYLIN = (
    'NAME="Kylin Linux Advanced Server"\nVERSION="V10 (Lance)"\nID="kylin"\nVERSION_ID="V10"\n'
    'PRETTY_NAME="Kylin Linux Advanced Server V10 (Lance)"\n'
)
UOS = 'PRETTY_NAME="UnionTech OS Server 20"\nNAME="UnionTech OS Server 20"\nVERSION_ID="20"\nID=uos\n'


def dumps(**changes: Any) -> dict[int, IpDump]:
    """The captured dumps, with lists of either family replaced (e.g. ``routes4=[...]``)."""
    out = {}
    for family, text in ((4, IP4_BATCH), (6, IP6_BATCH)):
        dump = parse_batch_output(family, text)
        out[family] = dump._replace(
            **{name: changes[f"{name}{family}"] for name in dump._fields[1:] if f"{name}{family}" in changes}
        )
    return out


class Host:
    """What the sensor reads, changeable by the test."""

    def __init__(self) -> None:
        self.dumps = dumps()
        self.files = {"/etc/os-release": DEBIAN, "/etc/resolv.conf": "nameserver 10.10.0.53\n"}
        self.hostname = "web-01"
        self.failure = ""
        self.reads = 0
        self.watch = Watch()

    def change(self, **lists: Any) -> None:
        """Change addresses, routes or rules (as dumps() does) and notify, as the kernel would."""
        self.dumps = dumps(**lists)
        self.watch.pending = True

    def read_ip(self, family: int) -> IpDump:
        self.reads += 1
        if self.failure:
            raise SensorError(self.failure)
        return self.dumps[family]

    def sensor(self, **kwargs: Any) -> InventorySensor:
        kwargs.setdefault("watch", lambda: self.watch)
        return InventorySensor(
            read_ip=self.read_ip, read_text=self.files.get, hostname=lambda: self.hostname, **kwargs
        )


class Watch:
    """The netlink socket, as the sensor sees it."""

    def __init__(self) -> None:
        self.pending = False
        self.closed = False

    def changed(self) -> bool:
        pending, self.pending = self.pending, False
        return pending

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def host() -> Host:
    return Host()


# --- parsing real output -------------------------------------------------------------------------


def test_addresses_of_every_interface_in_both_families_link_local_and_loopback_included() -> None:
    found = parse_addresses(dumps()[4].links) | parse_addresses(dumps()[6].links)
    assert found == ADDRESSES


def test_unicast_routes_of_every_table_but_local_with_the_rules_that_select_their_table(
    host: Host,
) -> None:
    snapshot = host.sensor().snapshot()
    assert snapshot.routes == ROUTES
    assert snapshot.addresses == ADDRESSES


def test_each_rule_is_written_as_ip_rule_prints_it() -> None:
    printed = dict(line.split(":\t", 1) for line in RULES_TEXT.splitlines())
    rules = json.loads(RULES_JSON)
    with_table = [rule for rule in rules if "table" in rule]
    assert len(with_table) == 11
    for rule in with_table:
        assert rule_text(rule) == printed[str(rule["priority"])]


def test_policies_per_table_leave_main_and_local_out_and_keep_priority_order() -> None:
    policies = parse_rules(json.loads(RULES_JSON), lambda name: None)
    assert policies == {
        300: "not from 10.1.0.0/16 uidrange 1000-2000 ipproto tcp dport 443 lookup 300",
        100: "; ".join(
            [
                "from all to 10.9.0.0/16 fwmark 0x10/0xff iif d0 lookup 100",
                "from 10.250.2.0/24 lookup 100",
                "from all oif d1 lookup 100",
                "from all tos 0x10 lookup 100",
                "from 10.5.0.0/16 lookup 100 suppress_prefixlength 0",
                "from all iif lo lookup 100",
                "from all sport 1000-2000 lookup 100",
            ]
        ),
        253: "from all lookup default",
    }


def test_a_selector_newer_than_this_code_is_still_shown() -> None:
    rule = {"priority": 5, "src": "all", "dscp": "EF", "table": "100"}
    assert rule_text(rule) == "from all dscp EF lookup 100"
    assert rule_text({"priority": 7, "src": "10.250.2.99", "table": "100"}) == "from 10.250.2.99 lookup 100"


def test_a_table_named_in_rt_tables_is_known_by_its_number(host: Host) -> None:
    named = [dict(r, table="zhuanwang") if r.get("table") == "100" else r for r in host.dumps[4].routes]
    rules = [dict(r, table="zhuanwang") if r.get("table") == "100" else r for r in host.dumps[4].rules]
    host.dumps = dumps(routes4=named, rules4=rules)
    host.files["/etc/iproute2/rt_tables"] = "# reserved\n255\tlocal\n254\tmain\n100\tzhuanwang # 专网\n"
    routes = host.sensor().snapshot().routes
    policy = "from 10.250.2.0/24 lookup zhuanwang; from all to 10.9.0.0/16 fwmark 0x10/0xff lookup zhuanwang"
    assert Route("0.0.0.0/0", "10.250.2.1", "eth1", 100, 0, policy) in routes
    assert {r.table for r in routes} == {100, 200, 254}


def test_a_gateway_of_the_other_family_and_a_host_route() -> None:
    routes = [
        {
            "dst": "10.69.0.0/16",
            "via": {"family": "inet6", "host": "fd00:250:2::1"},
            "dev": "eth1",
            "flags": [],
        },
        {"dst": "10.70.0.5", "dev": "eth1", "scope": "link", "flags": []},
        {"type": "throw", "dst": "10.71.0.0/16", "table": "100", "flags": []},
        {"type": "prohibit", "dst": "10.72.0.0/16", "flags": []},
    ]
    assert parse_routes(4, routes, {}, lambda name: None) == {
        Route("10.69.0.0/16", "fd00:250:2::1", "eth1", 254, 0, ""),
        Route("10.70.0.5/32", "", "eth1", 254, 0, ""),
    }


def test_ip_batch_output_must_hold_three_json_documents() -> None:
    assert [len(part) for part in parse_batch_output(4, IP4_BATCH)[1:]] == [3, 16, 6]
    with pytest.raises(SensorError, match="no JSON for command 3 of 3"):
        parse_batch_output(4, "[]\n[]\n")
    with pytest.raises(SensorError, match=r"older than 4\.17"):
        parse_batch_output(4, "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536\n")


def test_without_the_ip_command_the_sensor_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SensorError, match=r"^the ip command \(iproute2\) is not installed$"):
        run_ip(4)


def test_an_ip_too_old_for_json_is_reported_with_its_own_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "ip"  # what iproute2 before 4.13 answers to -j
    fake.write_text('#!/bin/sh\necho \'Option "-j" is unknown, try "ip -help".\' >&2\nexit 255\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SensorError, match=r'^ip -6 -j failed: Option "-j" is unknown, try "ip -help"\.$'):
        run_ip(6)


# --- resolvers, OS -------------------------------------------------------------------------------


def test_resolv_conf_nameservers_in_order_without_comments_options_or_junk() -> None:
    text = (
        "# Generated by NetworkManager\n; old comment\nsearch gov.cn\nnameserver 10.10.0.53 # primary\n"
        "options ndots:2 timeout:1\nnameserver fd00:53::1\nnameserver not-an-address\n"
        "nameserver fe80::1%eth0\n  nameserver   10.10.0.54\nnameserver\n"
    )
    assert parse_resolv_conf(text) == ["10.10.0.53", "fd00:53::1", "fe80::1%eth0", "10.10.0.54"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"/etc/resolv.conf": "nameserver 10.10.0.53\nnameserver 10.10.0.53\n"}, ("10.10.0.53",)),
        (  # systemd-resolved's stub: its upstreams too
            {
                "/etc/resolv.conf": "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n",
                "/run/systemd/resolve/resolv.conf": "nameserver 10.10.0.53\nnameserver 2001:db8::53\n",
            },
            ("127.0.0.53", "10.10.0.53", "2001:db8::53"),
        ),
        ({"/etc/resolv.conf": "nameserver 127.0.0.53\n"}, ("127.0.0.53",)),  # resolved not running
        (  # not the stub: resolved's file is not read
            {
                "/etc/resolv.conf": "nameserver 10.1.1.1\n",
                "/run/systemd/resolve/resolv.conf": "nameserver 9.9.9.9\n",
            },
            ("10.1.1.1",),
        ),
        ({}, ()),
    ],
)
def test_resolvers(files: dict[str, str], expected: tuple[str, ...]) -> None:
    assert resolvers(files.get) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEBIAN, ("Debian GNU/Linux", "12")),
        (KYLIN, ("Kylin Linux Advanced Server", "V10")),
        (UOS, ("UnionTech OS Server 20", "20")),
        ("NAME=Ubuntu\nVERSION_ID=22.04\n", ("Ubuntu", "22.04")),
        ('NAME="unbalanced\n', ("unbalanced", "")),
        ("", ("", "")),
    ],
)
def test_os_name_and_version(text: str, expected: tuple[str, str]) -> None:
    assert parse_os_release(text) == expected


def test_os_release_falls_back_to_usr_lib(host: Host) -> None:
    del host.files["/etc/os-release"]
    host.files["/usr/lib/os-release"] = KYLIN
    snapshot = host.sensor().snapshot()
    assert (snapshot.os_name, snapshot.os_version, snapshot.hostname) == (
        "Kylin Linux Advanced Server",
        "V10",
        "web-01",
    )


# --- full, diffs, cadence ------------------------------------------------------------------------


def test_full_at_start_then_diffs_when_something_changed_and_nothing_otherwise(host: Host) -> None:
    clock = Clock()
    sensor = host.sensor(monotonic_ns=clock)
    first = sensor.report()
    assert first == InventoryReport(
        True, tuple(sorted(ADDRESSES)), (), tuple(sorted(ROUTES)), (), ("10.10.0.53",), "web-01",
        "Debian GNU/Linux", "12",
    )  # fmt: skip
    clock.ns += 10 * 10**9
    assert sensor.report() is None
    # eth1's dedicated address and its table go; a new extranet address comes.
    links = [
        dict(link, addr_info=[a for a in link["addr_info"] if a["local"] != "10.250.2.10"])
        for link in host.dumps[4].links
    ]
    links[1]["addr_info"].append({"family": "inet", "local": "10.250.1.11", "prefixlen": 24})
    routes = [r for r in host.dumps[4].routes if r.get("table") != "100"]
    host.change(links4=links, routes4=routes)
    clock.ns += 10 * 10**9
    gone = tuple(sorted(r for r in ROUTES if r.table == 100))
    assert sensor.report() == InventoryReport(
        False, (Address("eth0", "10.250.1.11/24"),), (Address("eth1", "10.250.2.10/24"),), (), gone,
        ("10.10.0.53",), "web-01", "Debian GNU/Linux", "12",
    )  # fmt: skip
    assert sensor.report() is None


def test_a_change_of_resolvers_hostname_or_os_alone_is_reported(host: Host) -> None:
    sensor = host.sensor()
    sensor.report()
    host.files["/etc/resolv.conf"] = "nameserver 10.10.0.54\n"
    report = sensor.report()
    assert report is not None and not report.full
    assert report[1:5] == ((), (), (), ())
    assert report.dns_resolvers == ("10.10.0.54",)
    host.hostname = "web-02"
    report = sensor.report()
    assert report is not None and report.hostname == "web-02"


def test_a_full_inventory_again_every_hour_read_afresh(host: Host) -> None:
    clock = Clock()
    sensor = host.sensor(monotonic_ns=clock)
    assert sensor.report().full  # type: ignore[union-attr]
    clock.ns += 3599 * 10**9
    assert sensor.report() is None
    clock.ns += 10**9
    reads = host.reads
    again = sensor.report()
    assert again is not None and again.full and set(again.routes_added) == ROUTES
    assert host.reads == reads + 2  # read again, not taken from memory
    clock.ns += 10 * 10**9
    assert sensor.report() is None


def test_ip_runs_only_after_a_kernel_notification_but_the_files_are_read_every_time(host: Host) -> None:
    sensor = host.sensor()
    sensor.report()
    reads = host.reads
    host.dumps = dumps(routes6=[])  # not notified (cannot happen): not seen
    assert sensor.report() is None and host.reads == reads
    host.files["/etc/resolv.conf"] = "nameserver 10.10.0.54\n"
    report = sensor.report()
    assert report is not None and report.dns_resolvers == ("10.10.0.54",) and host.reads == reads
    host.watch.pending = True
    report = sensor.report()
    assert report is not None and len(report.routes_removed) == 6 and host.reads == reads + 2
    assert sensor.status() == "on"
    sensor.close()
    assert host.watch.closed


def test_without_netlink_notifications_ip_runs_every_time_and_the_status_says_why(host: Host) -> None:
    def refused() -> Watch:
        raise PermissionError(1, "Operation not permitted")

    sensor = host.sensor(watch=refused)
    sensor.report()
    assert sensor.status() == "on: read at every interval (no netlink notifications: Operation not permitted)"
    for reads in (4, 6):
        assert sensor.report() is None and host.reads == reads
    host.dumps = dumps(routes6=[])
    report = sensor.report()
    assert report is not None and len(report.routes_removed) == 6


def test_a_watch_that_fails_later_falls_back_to_reading_every_time(host: Host) -> None:
    sensor = host.sensor()
    sensor.report()

    def broken() -> bool:
        raise OSError(9, "Bad file descriptor")

    host.watch.changed = broken  # type: ignore[method-assign]
    host.dumps = dumps(routes6=[])
    report = sensor.report()
    assert report is not None and len(report.routes_removed) == 6
    assert host.watch.closed and "no netlink notifications: Bad file descriptor" in sensor.status()


def test_beyond_4096_routes_the_first_are_reported_and_the_status_says_so(host: Host) -> None:
    many = [
        {"dst": f"10.{i // 256}.{i % 256}.0/24", "gateway": "10.250.1.1", "dev": "eth0"} for i in range(5000)
    ]
    host.dumps = dumps(routes4=many)
    sensor = host.sensor()
    report = sensor.report()
    assert report is not None and len(report.routes_added) == 4096
    assert sensor.status() == "on: 5006 routes, only the first 4096 reported"
    # Always the same ones: the main table's first, in order.
    assert report.routes_added[0] == Route("10.0.0.0/24", "10.250.1.1", "eth0", 254, 0, "")
    assert all(r.table == 254 for r in report.routes_added)
    assert sensor.report() is None


def test_when_ip_fails_nothing_is_reported_and_the_next_read_is_a_diff(host: Host) -> None:
    sensor = host.sensor()
    sensor.report()
    host.failure = "ip -4 -j failed: Cannot open netlink socket: Permission denied"
    host.change(routes6=[])
    with pytest.raises(SensorError, match="Permission denied"):
        sensor.report()
    host.failure = ""
    report = sensor.report()  # the notification is gone, the change is not: read again
    assert report is not None and not report.full
    assert set(report.routes_removed) == {r for r in ROUTES if ":" in r.destination}


# --- in the agent --------------------------------------------------------------------------------


def make_agent(tmp_path: Path, sensor: Callable[[], InventorySensor], **config: Any) -> Agent:
    raw = {"eth0": RawCounters(0, 0, 0, 0, 0, 0, 0, 0, 1000, True)}
    clock = iter(range(0, 10**12, 10**9))
    sampler = InterfaceSampler(read=lambda: dict(raw), monotonic_ns=lambda: next(clock))
    sampler.sample()
    cfg = AgentConfig(
        collector="127.0.0.1:1", state_dir=tmp_path / "state", interfaces=("eth0",), zone_accounting="off",
        flows=False, **config,
    )  # fmt: skip
    return Agent(cfg, sampler=sampler, inventory=sensor, clock_ms=lambda: 1_795_000_000_000)


def last_batch(agent: Agent) -> agent_pb2.Batch:
    (spooled,) = agent.spool.pending()[-1:]
    return agent_pb2.ReportRequest.FromString(spooled.payload).batch


def kinds_and_sensors(agent: Agent) -> tuple[list[str | None], dict[str, str]]:
    batch = last_batch(agent)
    (health,) = [f.agent_health for f in batch.facts if f.WhichOneof("kind") == "agent_health"]
    return [f.WhichOneof("kind") for f in batch.facts], dict(health.sensor_status)


def test_the_first_batch_carries_the_full_inventory_and_later_ones_only_changes(
    tmp_path: Path, host: Host
) -> None:
    agent = make_agent(tmp_path, host.sensor)
    agent.tick()
    assert kinds_and_sensors(agent)[1]["inventory"] == "starting"  # not started outside run()
    agent.start_inventory()
    agent.tick()
    kinds, sensors = kinds_and_sensors(agent)
    assert kinds == ["interface_sample", "inventory", "agent_health"] and sensors["inventory"] == "on"
    fact = last_batch(agent).facts[1]
    assert fact.inventory.full and fact.time_ms == 1_795_000_000_000
    sent = fact.inventory.routes_added
    assert {Route(r.destination, r.gateway, r.interface, r.table, r.metric, r.policy) for r in sent} == ROUTES
    agent.tick()
    assert kinds_and_sensors(agent)[0] == ["interface_sample", "agent_health"]
    host.change(routes6=[])
    agent.tick()
    (diff,) = [f.inventory for f in last_batch(agent).facts if f.WhichOneof("kind") == "inventory"]
    assert not diff.full and len(diff.routes_removed) == 6 and not diff.routes_added
    assert list(diff.dns_resolvers) == ["10.10.0.53"] and diff.os_name == "Debian GNU/Linux"


def test_without_ip_the_agent_says_why_and_keeps_reporting(tmp_path: Path, host: Host) -> None:
    host.failure = "the ip command (iproute2) is not installed"
    agent = make_agent(tmp_path, host.sensor)
    agent.start_inventory()
    agent.tick()
    kinds, sensors = kinds_and_sensors(agent)
    assert kinds == ["interface_sample", "agent_health"]
    assert sensors["inventory"] == "off: the ip command (iproute2) is not installed"
    host.failure = ""
    agent.tick()
    kinds, sensors = kinds_and_sensors(agent)
    assert kinds == ["interface_sample", "inventory", "agent_health"] and sensors["inventory"] == "on"


def test_inventory_can_be_disabled(tmp_path: Path, host: Host) -> None:
    agent = make_agent(tmp_path, host.sensor, inventory=False)
    assert agent.sensors["inventory"] == "off: disabled in the agent's configuration"


def test_the_wire_fact_has_every_field(host: Host) -> None:
    report = host.sensor().report()
    assert report is not None
    fact = inventory_fact(report, 1_795_000_000_000)
    inv = fact.inventory
    assert [(a.interface, a.cidr) for a in inv.addresses_added] == [tuple(a) for a in report.addresses_added]
    assert [
        (r.destination, r.gateway, r.interface, r.table, r.metric, r.policy) for r in inv.routes_added
    ] == [tuple(r) for r in report.routes_added]
    assert (inv.full, list(inv.dns_resolvers), inv.hostname, inv.os_name, inv.os_version) == (
        True, ["10.10.0.53"], "web-01", "Debian GNU/Linux", "12",
    )  # fmt: skip


# --- a real host ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> Iterator[TestNetwork]:
    require_root_netns(iperf3=False)
    with TestNetwork() as network:
        network.add_host("web", "extranet")
        yield network


def settled(sensor: InventorySensor, namespace: str) -> None:
    """Read until nothing changes any more (IPv6 link-local addresses come up on their own)."""
    for _ in range(50):
        if in_netns(namespace, sensor.report) is None:
            return
        time.sleep(0.1)
    raise AssertionError("the test host's inventory does not settle")


@pytest.mark.netns
def test_in_a_test_host_the_sensor_reports_exactly_what_changed(net: TestNetwork) -> None:
    web = net.hosts["web"]
    reads: list[int] = []

    def read_ip(family: int) -> IpDump:
        reads.append(family)
        return run_ip(family)

    sensor = InventorySensor(read_ip=read_ip)  # its netlink socket opens in the namespace, at the first read
    first = in_netns(web.ns, sensor.report)
    assert first is not None and first.full
    assert {Address("eth0", "10.250.1.10/24"), Address("eth0", "fd00:250:1::10/64")} <= set(
        first.addresses_added
    )
    assert {
        Route("0.0.0.0/0", "10.250.1.1", "eth0", 254, 0, ""),
        Route("::/0", "fd00:250:1::1", "eth0", 254, 1024, ""),
        Route("10.250.1.0/24", "", "eth0", 254, 0, ""),
    } <= set(first.routes_added)
    assert all(r.table != 255 for r in first.routes_added)
    settled(sensor, web.ns)
    quiet = len(reads)
    assert in_netns(web.ns, sensor.report) is None and len(reads) == quiet  # no notification, no ip
    # A dedicated address (no prefix route: /32, and noprefixroute for IPv6) and policy routes to it.
    changes = [
        ("addr", "add", "10.250.2.99/32", "dev", "eth0"),
        ("-6", "addr", "add", "fd00:250:2::99/64", "dev", "eth0", "nodad", "noprefixroute"),
        ("route", "add", "10.250.2.0/24", "via", "10.250.1.1", "dev", "eth0", "table", "100"),
        ("rule", "add", "from", "10.250.2.0/24", "lookup", "100", "pref", "100"),
        ("-6", "route", "add", "fd00:250:2::/64", "via", "fd00:250:1::1", "dev", "eth0", "table", "100"),
        ("-6", "rule", "add", "from", "fd00:250:2::/64", "lookup", "100", "pref", "100"),
    ]
    for change in changes:
        web.run("ip", *change)
    added = in_netns(web.ns, sensor.report)
    assert added is not None and not added.full
    assert added.addresses_added == (Address("eth0", "10.250.2.99/32"), Address("eth0", "fd00:250:2::99/64"))
    assert added.routes_added == (
        Route("10.250.2.0/24", "10.250.1.1", "eth0", 100, 0, "from 10.250.2.0/24 lookup 100"),
        Route("fd00:250:2::/64", "fd00:250:1::1", "eth0", 100, 1024, "from fd00:250:2::/64 lookup 100"),
    )
    assert (added.addresses_removed, added.routes_removed) == ((), ())
    assert len(reads) == quiet + 2  # the kernel's notifications made it read
    assert in_netns(web.ns, sensor.report) is None
    for change in reversed(changes):
        web.run("ip", *[word if word != "add" else "del" for word in change])
    removed = in_netns(web.ns, sensor.report)
    assert removed is not None
    assert (removed.addresses_removed, removed.routes_removed) == (added.addresses_added, added.routes_added)
    assert (removed.addresses_added, removed.routes_added) == ((), ())
    assert sensor.status() == "on"
    sensor.close()
    # What the agent saw in the namespace is what ip shows there.
    shown = json.loads(web.run("ip", "-4", "-j", "addr", "show", "dev", "eth0").stdout)
    assert {a["local"] for a in shown[0]["addr_info"]} == {"10.250.1.10"}

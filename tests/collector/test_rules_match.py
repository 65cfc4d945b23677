"""Detection matching: every supported modifier and condition form, through both compiled paths (a rule's
own matcher and the engine's per-category router, which reads and lowercases shared fields once), and the
explain trace."""

from __future__ import annotations

import itertools
import operator
import random
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collector.rules.compile import explain
from collector.rules.engine import Engine
from collector.rules.load import Rule, load_rule_file

Case = tuple[dict[str, Any], bool]


def load(tmp_path: Path, detection: str, category: str = "access", name: str = "a") -> Rule:
    text = (
        f"title: test {name}\nid: {uuid.uuid4()}\nname: {name}\nlevel: low\n"
        f"logsource: {{product: zonewatch, category: {category}}}\n"
        f"detection:\n{textwrap.indent(textwrap.dedent(detection).strip(), '  ')}\n"
        f"samples: {{match: [{{category: {category}}}], no_match: [{{category: {category}}}]}}\n"
    )
    path = tmp_path / f"{name}.yml"
    path.write_text(text, encoding="utf-8")
    return load_rule_file(path)


def check(tmp_path: Path, detection: str, cases: list[Case], category: str = "access") -> None:
    """Each event matches (or not) as expected, by the rule's matcher and by the engine's router.

    The engine holds two copies of the rule, so every field is read by more than one test and the
    router's shared reads and lowercasing are exercised too.
    """
    first, second = load(tmp_path, detection, category, "a"), load(tmp_path, detection, category, "b")
    engine = Engine([first, second])
    for event, expected in cases:
        full = {"category": category, "time_ms": 1, "agent_id": "agent", **event}
        assert first.detections[0].matches(full) is expected, (event, expected)
        raised = sorted(match.rule.name for match in engine.process([full]))
        assert raised == (["a", "b"] if expected else []), (event, expected)


# ---- strings ---------------------------------------------------------------------------------------


def test_plain_strings_match_whole_values_case_insensitively(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel: {service: SSH}\ncondition: sel",
        [({"service": "ssh"}, True), ({"service": "SsH"}, True), ({"service": "sshd"}, False), ({}, False)],
    )


def test_chinese_values_match(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel: {department: 公安局}\ncondition: sel",
        [({"department": "公安局"}, True), ({"department": "公安"}, False)],
    )


def test_cased_strings_keep_case(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel: {process|cased: Java}\ncondition: sel",
        [({"process": "Java"}, True), ({"process": "java"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel: {cmdline|cased|contains: -Xmx}\ncondition: sel",
        [({"cmdline": "java -Xmx2g"}, True), ({"cmdline": "java -xmx2g"}, False)],
        category="listener",
    )


@pytest.mark.parametrize(
    ("value", "yes", "no"),
    [
        ("'ss*'", ["ssh", "SSHD", "ss"], ["rsh", ""]),
        ("'*sh'", ["ssh", "BASH"], ["shell"]),
        ("'*ys*'", ["mysql", "MYSQL", "ys"], ["mssql"]),
        ("'m?sql'", ["mysql", "MySQL"], ["mssql1", "msql"]),
        ("'*'", ["", "anything"], []),
        ("'r*s'", ["redis", "rs"], ["redis1"]),
        ("'\\*literal'", ["*literal"], ["xliteral"]),
    ],
)
def test_wildcards(tmp_path: Path, value: str, yes: list[str], no: list[str]) -> None:
    check(
        tmp_path,
        f"sel:\n  service: {value}\ncondition: sel",
        [({"service": v}, True) for v in yes] + [({"service": v}, False) for v in no] + [({}, False)],
    )


def test_contains_startswith_endswith(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  cmdline|contains: 'nc -l'\ncondition: sel",
        [({"cmdline": "/bin/NC -L 4444"}, True), ({"cmdline": "nc"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  process|startswith: [python, perl]\ncondition: sel",
        [({"process": "Python3"}, True), ({"process": "perl5"}, True), ({"process": "ipython"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  cmdline|endswith: .sh\ncondition: sel",
        [({"cmdline": "run.SH"}, True), ({"cmdline": "run.sh -x"}, False)],
        category="listener",
    )


def test_all_requires_every_value(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  cmdline|contains|all: [curl, '|', sh]\ncondition: sel",
        [({"cmdline": "curl x | sh"}, True), ({"cmdline": "curl x > sh"}, False)],
        category="listener",
    )


def test_a_list_of_values_is_any_of_them(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  service: [ssh, RDP, telnet]\ncondition: sel",
        [({"service": "rdp"}, True), ({"service": "TELNET"}, True), ({"service": "vnc"}, False)],
    )


def test_neq_negates_the_item(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  direction: inbound\n  peer_zone_kind|neq: local\ncondition: sel",
        [
            ({"direction": "inbound", "peer_zone_kind": "internet"}, True),
            ({"direction": "inbound", "peer_zone_kind": "local"}, False),
        ],
    )


# ---- regular expressions -------------------------------------------------------------------------


def test_re_searches_case_sensitively_by_default(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  cmdline|re: 'bash -[ci]'\ncondition: sel",
        [
            ({"cmdline": "/bin/bash -c id"}, True),
            ({"cmdline": "BASH -c id"}, False),
            ({"cmdline": "bash"}, False),
        ],
        category="listener",
    )


def test_re_flags(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  cmdline|re|i: '^bash'\ncondition: sel",
        [({"cmdline": "BASH -c"}, True), ({"cmdline": "xbash"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  cmdline|re|m: '^second$'\ncondition: sel",
        [({"cmdline": "first\nsecond"}, True), ({"cmdline": "first second"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  cmdline|re|s: 'a.b'\ncondition: sel",
        [({"cmdline": "a\nb"}, True), ({"cmdline": "ab"}, False)],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  cmdline|re: 'a.b'\ncondition: sel",
        [({"cmdline": "a\nb"}, False), ({"cmdline": "axb"}, True)],
        category="listener",
    )


def test_re_applies_to_the_text_of_numbers(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  local_port|re: '^44[0-9]+$'\ncondition: sel",
        [({"local_port": 4444}, True), ({"local_port": 80}, False)],
        category="listener",
    )


# ---- numbers and booleans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modifier", "compare"),
    [("gt", operator.gt), ("gte", operator.ge), ("lt", operator.lt), ("lte", operator.le)],
)
def test_numeric_comparisons(tmp_path: Path, modifier: str, compare: Callable[[int, int], bool]) -> None:
    cases: list[Case] = [({"attempts": n}, compare(n, 20)) for n in (0, 19, 20, 21, 100)]
    cases += [({"attempts": str(n)}, compare(n, 20)) for n in (19, 20, 21)]
    cases += [({"attempts": float(n)}, compare(n, 20)) for n in (19, 20, 21)]
    cases += [({"attempts": "many"}, False), ({"attempts": True}, False), ({}, False)]
    check(tmp_path, f"sel:\n  attempts|{modifier}: 20\ncondition: sel", cases)


def test_float_thresholds(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  capture_loss_pct|gte: 0.5\ncondition: sel",
        [
            ({"capture_loss_pct": 0.5}, True),
            ({"capture_loss_pct": 0.49}, False),
            ({"capture_loss_pct": 1}, True),
        ],
        category="agent_health",
    )


def test_numbers_equal_numerically_and_as_text(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  local_port: [22, 3389]\ncondition: sel",
        [
            ({"local_port": 22}, True),
            ({"local_port": "3389"}, True),
            ({"local_port": 22.0}, True),
            ({"local_port": 23}, False),
            ({"local_port": True}, False),
        ],
        category="listener",
    )
    check(
        tmp_path,
        "sel:\n  protocol: '6'\ncondition: sel",
        [({"protocol": "6"}, True), ({"protocol": 6}, True), ({"protocol": "tcp"}, False)],
        category="flow",
    )


def test_booleans(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  zone_allowed: false\ncondition: sel",
        [
            ({"zone_allowed": False}, True),
            ({"zone_allowed": True}, False),
            ({"zone_allowed": 0}, False),
            ({"zone_allowed": "false"}, True),
            ({}, False),
        ],
    )


# ---- null, exists and missing fields ---------------------------------------------------------------


def test_a_missing_field_never_matches_a_value(tmp_path: Path) -> None:
    detections = [
        "sel: {service: ''}",
        "sel: {service|contains: ''}",
        "sel: {attempts|gte: 0}",
        "sel: {peer_addr|cidr: 0.0.0.0/0}",
        "sel: {service|re: '.*'}",
        "sel: {service: '*'}",
    ]
    for detection in detections:
        check(tmp_path, detection + "\ncondition: sel", [({}, False), ({"service": None}, False)])


def test_null_matches_a_missing_or_none_field(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  service: null\ncondition: sel",
        [({}, True), ({"service": None}, True), ({"service": ""}, False), ({"service": "ssh"}, False)],
    )


def test_exists(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  service|exists: true\ncondition: sel",
        [({"service": ""}, True), ({"service": "ssh"}, True), ({}, False), ({"service": None}, False)],
    )
    check(
        tmp_path,
        "sel:\n  service|exists: false\ncondition: sel",
        [({}, True), ({"service": None}, True), ({"service": "ssh"}, False)],
    )


# ---- cidr --------------------------------------------------------------------------------------------


def test_cidr_ipv4(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  peer_addr|cidr: [10.0.0.0/8, 192.168.1.0/24]\ncondition: sel",
        [
            ({"peer_addr": "10.255.1.2"}, True),
            ({"peer_addr": "192.168.1.77"}, True),
            ({"peer_addr": "192.168.2.1"}, False),
            ({"peer_addr": "11.0.0.1"}, False),
            ({"peer_addr": "not an address"}, False),
            ({"peer_addr": "fd00::1"}, False),
            ({"peer_addr": 10}, False),
        ],
    )


def test_cidr_ipv6_and_ipv4_mapped(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  peer_addr|cidr: ['fd00::/8', 10.0.0.0/8]\ncondition: sel",
        [
            ({"peer_addr": "fd12:3456::1"}, True),
            ({"peer_addr": "FD00::1"}, True),
            ({"peer_addr": "fe80::1"}, False),
            ({"peer_addr": "::ffff:10.1.2.3"}, True),
            ({"peer_addr": "::ffff:11.1.2.3"}, False),
            ({"peer_addr": "fe80::1%eth0"}, False),
            ({"peer_addr": "10.1.2.3"}, True),
        ],
    )


# ---- list-valued event fields ----------------------------------------------------------------------


def test_a_list_field_matches_when_any_element_matches(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  ports: [22, 3389]\ncondition: sel",
        [
            ({"ports": [80, 22]}, True),
            ({"ports": [3389]}, True),
            ({"ports": [80, 443]}, False),
            ({"ports": []}, False),
        ],
    )
    check(
        tmp_path,
        "sel:\n  ports|gte: 1024\ncondition: sel",
        [({"ports": [22, 8080]}, True), ({"ports": [22, 80]}, False)],
    )
    check(
        tmp_path,
        "sel:\n  blockers|contains: java\ncondition: sel",
        [
            ({"blockers": ["sshd (1) -> 10.1.1.1", "JAVA (2) -> 10.2.2.2"]}, True),
            ({"blockers": ["sshd (1)"]}, False),
        ],
        category="migration",
    )


def test_all_over_a_list_field_needs_every_value_somewhere(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  ports|all: [22, 3389]\ncondition: sel",
        [({"ports": [22, 80, 3389]}, True), ({"ports": [22, 80]}, False)],
    )


# ---- conditions ----------------------------------------------------------------------------------


def test_and_not_and_parentheses(tmp_path: Path) -> None:
    detection = """
        inbound: {direction: inbound}
        admin: {service: [ssh, rdp]}
        internet: {peer_zone_kind: internet}
        known: {peer_addr|cidr: 10.0.0.0/8}
        condition: inbound and (admin or internet) and not known
        """
    check(
        tmp_path,
        detection,
        [
            ({"direction": "inbound", "service": "ssh", "peer_addr": "1.1.1.1"}, True),
            ({"direction": "inbound", "peer_zone_kind": "internet", "peer_addr": "1.1.1.1"}, True),
            ({"direction": "inbound", "service": "ssh", "peer_addr": "10.1.1.1"}, False),
            ({"direction": "outbound", "service": "ssh", "peer_addr": "1.1.1.1"}, False),
            ({"direction": "inbound", "service": "vnc", "peer_addr": "1.1.1.1"}, False),
            ({"direction": "inbound", "service": "ssh"}, True),  # a missing field: "known" is false
        ],
    )


def test_one_of_and_all_of(tmp_path: Path) -> None:
    detection = """
        sel_ssh: {service: ssh}
        sel_rdp: {service: rdp}
        filter_a: {direction: inbound}
        filter_b: {peer_zone_kind: internet}
        condition: 1 of sel_* and all of filter_*
        """
    check(
        tmp_path,
        detection,
        [
            ({"service": "rdp", "direction": "inbound", "peer_zone_kind": "internet"}, True),
            ({"service": "ssh", "direction": "inbound", "peer_zone_kind": "extranet"}, False),
            ({"service": "vnc", "direction": "inbound", "peer_zone_kind": "internet"}, False),
        ],
    )
    check(tmp_path, "a: {service: ssh}\nb: {direction: inbound}\ncondition: all of them",
          [({"service": "ssh", "direction": "inbound"}, True), ({"service": "ssh"}, False)])  # fmt: skip
    check(tmp_path, "a: {service: ssh}\nb: {direction: inbound}\ncondition: 1 of them",
          [({"service": "x", "direction": "inbound"}, True), ({"service": "x"}, False)])  # fmt: skip


def test_a_list_of_maps_is_any_of_them(tmp_path: Path) -> None:
    detection = """
        sel:
          - {service: ssh, direction: inbound}
          - {service: rdp, peer_zone_kind: internet}
        condition: sel
        """
    check(
        tmp_path,
        detection,
        [
            ({"service": "ssh", "direction": "inbound"}, True),
            ({"service": "rdp", "peer_zone_kind": "internet"}, True),
            ({"service": "ssh", "peer_zone_kind": "internet"}, False),
        ],
    )


def test_several_conditions_are_any_of_them(tmp_path: Path) -> None:
    detection = "a: {service: ssh}\nb: {service: rdp}\ncondition: [a, b]"
    check(
        tmp_path,
        detection,
        [({"service": "ssh"}, True), ({"service": "rdp"}, True), ({"service": "x"}, False)],
    )


def test_literals_with_quotes_and_backslashes_stay_literals(tmp_path: Path) -> None:
    check(
        tmp_path,
        "sel:\n  cmdline: 'a''b\\\\c\")'\ncondition: sel",
        [({"cmdline": "a'b\\c\")"}, True), ({"cmdline": "ab"}, False)],
        category="listener",
    )


def test_the_router_agrees_with_each_rule_on_random_events(tmp_path: Path) -> None:
    """Many rules reading the same fields: the router's shared reads change nothing."""
    detections = [
        "sel: {direction: inbound, service: [ssh, rdp]}\ncondition: sel",
        "sel: {direction: outbound, peer_zone_kind: internet}\ncondition: sel",
        "sel: {direction: inbound, failed|gte: 3}\nf: {peer_addr|cidr: 10.0.0.0/8}\ncondition: sel and not f",
        "sel: {service|startswith: r, direction: OUTBOUND}\ncondition: sel",
        "sel: {ports: 22}\nother: {service: null}\ncondition: sel or other",
        "sel: {zone_allowed: false, peer_zone_kind|neq: local}\ncondition: sel",
    ]
    rules = [load(tmp_path, d, name=f"r{i}") for i, d in enumerate(detections)]
    engine = Engine(rules)
    rng = random.Random(7)
    values: dict[str, list[Any]] = {
        "direction": ["inbound", "outbound", "INBOUND", None],
        "service": ["ssh", "rdp", "RDP", "redis", "", None],
        "peer_zone_kind": ["internet", "local", "extranet"],
        "failed": [0, 3, 9, "4", None],
        "peer_addr": ["10.1.1.1", "8.8.8.8", "::ffff:10.0.0.1"],
        "ports": [[22], [80, 443], [], None],
        "zone_allowed": [True, False],
    }
    for _ in range(500):
        event: dict[str, Any] = {"category": "access", "time_ms": 1, "agent_id": "a"}
        for field, choices in values.items():
            value = rng.choice(choices)
            if value is not None:
                event[field] = value
        expected = sorted(rule.name for rule in rules if rule.detections[0].matches(event))
        assert sorted(match.rule.name for match in engine.process([event])) == expected, event


def test_an_event_meets_only_the_rules_of_its_category(tmp_path: Path) -> None:
    access = load(tmp_path, "sel: {direction: inbound}\ncondition: sel", "access", "access_rule")
    flow = load(tmp_path, "sel: {direction: inbound}\ncondition: sel", "flow", "flow_rule")
    engine = Engine([access, flow])
    matches = engine.process([{"category": "flow", "direction": "inbound", "time_ms": 1, "agent_id": "a"}])
    assert [m.rule.name for m in matches] == ["flow_rule"]
    assert engine.process([{"category": "heartbeat", "time_ms": 1}, {"direction": "inbound"}]) == []
    stats = engine.stats()
    assert stats[access.id].events == 0 and stats[flow.id].events == 1


def test_detection_matches_carry_the_dedup_group_and_the_event(tmp_path: Path) -> None:
    rule = load(tmp_path, "sel: {direction: inbound}\ncondition: sel")
    event = {"category": "access", "direction": "inbound", "time_ms": 5, "agent_id": "主机-1"}
    (match,) = Engine([rule]).process([event])
    assert match.group == {"agent_id": "主机-1"} and match.dedup_key == '{"agent_id":"主机-1"}'
    assert match.time_ms == 5 and match.events == (event,) and match.rule is rule


def test_distinct_dedup_values_never_share_a_key(tmp_path: Path) -> None:
    rule = load(tmp_path, "sel: {direction: inbound}\ncondition: sel")
    engine = Engine([rule])
    agents = ["1", 1, True, "true", None, "a,b", '"a"']
    events = [{"category": "access", "direction": "inbound", "time_ms": 1, "agent_id": a} for a in agents]
    keys = [m.dedup_key for m in engine.process(events + events)]
    assert len(set(keys[: len(agents)])) == len(agents) and keys[: len(agents)] == keys[len(agents) :]


# ---- explain ----------------------------------------------------------------------------------------


def test_explain_traces_every_identifier_and_test_with_the_event_value(tmp_path: Path) -> None:
    detection = """
        selection: {direction: inbound, service: [ssh, rdp], attempts|gte: 5}
        known: {peer_addr|cidr: 10.0.0.0/8}
        condition: selection and not known
        """
    rule = load(tmp_path, detection)
    event = {
        "category": "access",
        "direction": "inbound",
        "service": "RDP",
        "attempts": 3,
        "peer_addr": "1.2.3.4",
    }
    lines = explain(rule, event)
    text = "\n".join(lines)
    assert lines[0].startswith("rule a [detection, access]")
    assert "condition 'selection and not known': False" in text
    assert "selection: False" in text and "known: False" in text
    assert 'direction = "inbound": True (event: "inbound")' in text
    assert 'service = "rdp": True (event: "RDP")' in text
    assert "attempts >= 5: False (event: 3)" in text
    assert 'peer_addr in 10.0.0.0/8: False (event: "1.2.3.4")' in text
    assert any(line.startswith("      ") for line in lines)  # nested, indented


def test_explain_says_missing_and_other_categories(tmp_path: Path) -> None:
    rule = load(tmp_path, "sel: {service: ssh}\nfilter: {service|exists: true}\ncondition: sel or 1 of filt*")
    text = "\n".join(explain(rule, {"category": "access"}))
    assert "(event: missing)" in text and "1 of filt*: False" in text and "service exists" in text
    assert "not considered" in "\n".join(explain(rule, {"category": "flow", "service": "ssh"}))


@pytest.mark.parametrize(
    ("left", "right"), list(itertools.permutations(["inbound", "INBOUND", "outbound"], 2))
)
def test_case_folding_is_symmetric(tmp_path: Path, left: str, right: str) -> None:
    rule = load(tmp_path, f"sel: {{direction: {left}}}\ncondition: sel", name="sym")
    event = {"category": "access", "direction": right}
    assert rule.detections[0].matches(event) is (left.lower() == right.lower())

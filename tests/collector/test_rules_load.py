"""Loading rule files: a good rule loads with everything the engine needs, and every mistake a rule author
can make is refused with the file and the line to fix."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from collector.config import default_rules_dir
from collector.errors import CollectorError
from collector.rules import RuleError
from collector.rules.load import Rule, load_rule_file, load_rules
from collector.rules.samples import check_directory, check_samples

GOOD = """\
title: SSH or RDP from the internet
id: 0b6f3c4e-1d2a-4b5c-8d9e-000000000001
name: admin_from_internet
status: experimental
description: An admin service reached from the internet; threshold none, any attempt.
level: high
logsource:
  product: zonewatch
  category: access
dedup-by: [agent_id, peer_addr]
detection:
  selection:
    direction: inbound
    service: [ssh, rdp]
    peer_zone_kind: internet
  condition: selection
samples:
  match:
    - {category: access, direction: inbound, service: ssh, peer_zone_kind: internet, peer_addr: 1.2.3.4}
  no_match:
    - - {category: access, direction: outbound, service: ssh, peer_zone_kind: internet}
      - {category: access, direction: inbound, service: ssh, peer_zone_kind: extranet, agent_id: a2}
"""

CORRELATION = """\
title: Port scan
id: 0b6f3c4e-1d2a-4b5c-8d9e-000000000002
name: port_scan
level: medium
correlation:
  type: value_count
  rules: [inbound_failure]
  group-by: [agent_id, peer_addr]
  timespan: 5m
  condition: {gte: 3, field: ports}
samples:
  match:
    - - {category: access, direction: inbound, failed: 2, peer_addr: 10.0.0.9, ports: [22, 23]}
      - {category: access, direction: inbound, failed: 1, peer_addr: 10.0.0.9, ports: [80]}
  no_match:
    - - {category: access, direction: inbound, failed: 2, peer_addr: 10.0.0.9, ports: [22, 23]}
      - {category: access, direction: inbound, failed: 1, peer_addr: 10.0.0.8, ports: [80]}
---
title: Inbound failure
name: inbound_failure
logsource: {product: zonewatch, category: access}
detection:
  selection:
    direction: inbound
    failed|gt: 0
  condition: selection
"""


def write(tmp_path: Path, text: str, name: str = "rule.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the n-th line containing ``needle``."""
    hits = [number for number, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[occurrence - 1]


def error(tmp_path: Path, text: str) -> RuleError:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    assert caught.value.path == str(path)
    assert str(caught.value) == f"{path}:{caught.value.line}: {caught.value.message}"
    return caught.value


def expect(tmp_path: Path, text: str, needle: str, words: str, occurrence: int = 1) -> None:
    """Loading ``text`` fails at the line holding ``needle`` with a message containing ``words``."""
    problem = error(tmp_path, text)
    assert problem.line == line_of(text, needle, occurrence), str(problem)
    assert words.lower() in problem.message.lower(), str(problem)


# ---- good rules ----------------------------------------------------------------------------------


def test_a_detection_rule_loads_with_everything_the_engine_needs(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    rule = load_rule_file(path)
    assert isinstance(rule, Rule)
    assert (rule.id, rule.name, rule.title) == (
        "0b6f3c4e-1d2a-4b5c-8d9e-000000000001",
        "admin_from_internet",
        "SSH or RDP from the internet",
    )
    assert (rule.level, rule.status, rule.kind, rule.category) == (
        "high",
        "experimental",
        "detection",
        "access",
    )
    assert rule.description.startswith("An admin service")
    assert rule.dedup_by == ("agent_id", "peer_addr")
    assert rule.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rule.correlation is None and len(rule.detections) == 1
    assert rule.lines["id"] == line_of(GOOD, "id:") and rule.lines["name"] == line_of(GOOD, "name:")


def test_sample_events_get_the_contract_defaults(tmp_path: Path) -> None:
    rule = load_rule_file(write(tmp_path, GOOD))
    # A single event is a case of its own; a list is a case of several events.
    assert len(rule.samples_match) == 1 and len(rule.samples_match[0]) == 1
    first = rule.samples_match[0][0]
    assert first["agent_id"] == "sample-agent" and first["hostname"] == "sample-host"
    assert first["department"] == first["county"] == first["site"] == first["role"] == ""
    assert first["time_ms"] == 1_000_000
    (case,) = rule.samples_no_match
    assert [event["time_ms"] for event in case] == [1_000_000, 1_001_000]
    assert case[1]["agent_id"] == "a2"  # given values win over the defaults
    assert rule.lines["match 1"] == line_of(GOOD, "peer_addr: 1.2.3.4")


def test_a_correlation_rule_loads_with_its_detection(tmp_path: Path) -> None:
    rule = load_rule_file(write(tmp_path, CORRELATION))
    assert (rule.kind, rule.category, rule.dedup_by) == ("value_count", "access", ("agent_id", "peer_addr"))
    spec = rule.correlation
    assert spec is not None
    assert (spec.type, spec.rules, spec.timespan_ms, spec.op, spec.threshold, spec.field) == (
        "value_count",
        ("inbound_failure",),
        300_000,
        "gte",
        3,
        "ports",
    )
    assert [d.name for d in rule.detections] == ["inbound_failure"]
    assert rule.window_key


def test_the_samples_of_good_rules_pass(tmp_path: Path) -> None:
    assert check_samples(load_rule_file(write(tmp_path, GOOD))) == []
    assert check_samples(load_rule_file(write(tmp_path, CORRELATION, "corr.yml"))) == []


def test_a_sample_that_does_not_behave_is_reported_with_its_case(tmp_path: Path) -> None:
    text = GOOD.replace("peer_zone_kind: internet, peer_addr", "peer_zone_kind: extranet, peer_addr")
    path = write(tmp_path, text)
    (failure,) = check_samples(load_rule_file(path))
    assert failure.path == str(path) and failure.rule == "admin_from_internet"
    assert failure.case == f"match 1 (line {line_of(text, 'peer_addr: 1.2.3.4')})"
    assert "did not" in failure.message


def test_the_window_key_ignores_the_threshold_but_not_the_group_by(tmp_path: Path) -> None:
    base = load_rule_file(write(tmp_path, CORRELATION, "a.yml"))
    threshold = load_rule_file(write(tmp_path, CORRELATION.replace("gte: 3", "gte: 30"), "b.yml"))
    group_by = load_rule_file(
        write(tmp_path, CORRELATION.replace("[agent_id, peer_addr]", "[agent_id]"), "c.yml")
    )
    detection = load_rule_file(write(tmp_path, CORRELATION.replace("failed|gt: 0", "failed|gt: 1"), "d.yml"))
    described = load_rule_file(
        write(tmp_path, CORRELATION.replace("title: Port scan", "title: Scan"), "e.yml")
    )
    assert base.window_key == threshold.window_key == described.window_key
    assert base.window_key not in (group_by.window_key, detection.window_key)


def test_a_correlation_may_span_categories(tmp_path: Path) -> None:
    text = """\
        title: New listener then inbound connection
        id: 0b6f3c4e-1d2a-4b5c-8d9e-000000000003
        level: high
        correlation:
          type: temporal_ordered
          rules: [opened, reached]
          group-by: [agent_id]
          timespan: 10m
        samples:
          match:
            - - {category: listener, change: opened, local_port: 4444}
              - {category: access, direction: inbound, ports: [4444]}
          no_match:
            - - {category: access, direction: inbound, ports: [4444]}
              - {category: listener, change: opened, local_port: 4444}
        ---
        title: opened
        name: opened
        logsource: {product: zonewatch, category: listener}
        detection: {sel: {change: opened}, condition: sel}
        ---
        title: reached
        name: reached
        logsource: {product: zonewatch, category: access}
        detection: {sel: {direction: inbound}, condition: sel}
        """
    rule = load_rule_file(write(tmp_path, text))
    assert rule.category == "listener,access" and rule.categories == ("listener", "access")
    assert rule.name == "rule"  # no name: the file's stem
    assert check_samples(rule) == []


def test_load_rules_reads_a_directory_in_file_name_order(tmp_path: Path) -> None:
    write(tmp_path, CORRELATION, "b_scan.yml")
    write(tmp_path, GOOD, "a_admin.yml")
    write(tmp_path, "title: [unclosed\n", "c_broken.yml")
    (tmp_path / "notes.txt").write_text("not a rule")
    rules, errors = load_rules(tmp_path)
    assert [rule.path.name for rule in rules] == ["a_admin.yml", "b_scan.yml"]
    assert [(Path(e.path).name, e.line) for e in errors] == [("c_broken.yml", 1)]
    assert [str(f) for f in check_directory(tmp_path)] == [str(errors[0])]


def test_a_reused_id_or_name_makes_the_later_file_an_error(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.yml")
    write(tmp_path, GOOD.replace("name: admin_from_internet", "name: other"), "b.yml")
    write(tmp_path, GOOD.replace("000000000001", "000000000009"), "c.yml")
    rules, errors = load_rules(tmp_path)
    assert [rule.path.name for rule in rules] == ["a.yml"]
    assert [(Path(e.path).name, e.line) for e in errors] == [
        ("b.yml", line_of(GOOD, "id:")),
        ("c.yml", line_of(GOOD, "name:")),
    ]
    assert "also" in errors[0].message and "a.yml" in errors[0].message


def test_a_missing_directory_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(CollectorError, match="no rules directory"):
        load_rules(tmp_path / "nowhere")


def test_the_default_rules_directory_is_beside_the_collector_package() -> None:
    assert default_rules_dir() == Path(__file__).resolve().parents[2] / "rules"


# ---- the file as a whole -------------------------------------------------------------------------


def test_yaml_syntax_errors_carry_pyyaml_s_line(tmp_path: Path) -> None:
    text = GOOD.replace("    service: [ssh, rdp]", "    service: [ssh, rdp")
    problem = error(tmp_path, text)
    assert problem.message.startswith("invalid YAML")
    assert line_of(text, "service: [ssh") <= problem.line <= line_of(text, "condition:")


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rule.yml"
    path.write_bytes(GOOD.encode() + "title: 端口\n".encode("gbk"))
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    assert caught.value.line == GOOD.count("\n") + 1 and "UTF-8" in caught.value.message


def test_an_unreadable_file_is_an_error_at_line_1(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as caught:
        load_rule_file(tmp_path / "missing.yml")
    assert caught.value.line == 1 and "cannot read" in caught.value.message


def test_an_empty_file_holds_no_rule(tmp_path: Path) -> None:
    assert "no rule" in error(tmp_path, "# nothing\n").message


def test_a_duplicate_key_is_an_error_at_the_second(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    peer_zone_kind: internet\n", "    peer_zone_kind: internet\n    direction: outbound\n"
    )
    expect(tmp_path, text, "direction: outbound", "given twice")


def test_two_rules_in_one_file_are_refused_at_the_second(tmp_path: Path) -> None:
    text = GOOD + "---\n" + GOOD.replace("000000000001", "000000000002")
    expect(tmp_path, text, "title:", "one rule per file", occurrence=2)


def test_two_correlations_in_one_file_are_refused(tmp_path: Path) -> None:
    second = CORRELATION.split("---\n")[0].replace("000000000002", "000000000005")
    text = CORRELATION + "---\n" + second
    expect(tmp_path, text, "title: Port scan", "second correlation", occurrence=2)


def test_a_detection_the_correlation_does_not_reference_is_refused(tmp_path: Path) -> None:
    extra = "---\ntitle: Stray\nname: stray\nlogsource: {product: zonewatch, category: access}\n"
    extra += "detection: {sel: {direction: inbound}, condition: sel}\n"
    expect(tmp_path, CORRELATION + extra, "title: Stray", "not among the correlation's rules")


def test_an_unresolved_reference_names_its_entry(tmp_path: Path) -> None:
    text = CORRELATION.replace(
        "rules: [inbound_failure]", "rules:\n    - inbound_failure\n    - missing_rule"
    )
    expect(tmp_path, text, "- missing_rule", "'missing_rule'")


def test_collection_actions_are_refused(tmp_path: Path) -> None:
    expect(tmp_path, "action: global\ntitle: x\n", "action:", "one rule per file")


# ---- logsource, fields and modifiers ---------------------------------------------------------------


def test_the_product_must_be_zonewatch(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("product: zonewatch", "product: windows"), "product:", "zonewatch")


def test_the_category_must_be_a_zonewatch_category(tmp_path: Path) -> None:
    expect(
        tmp_path, GOOD.replace("category: access\n", "category: acess\n", 1), "category: acess", "'access'"
    )


def test_a_rule_needs_a_logsource(tmp_path: Path) -> None:
    text = GOOD.replace("logsource:\n  product: zonewatch\n  category: access\n", "")
    expect(tmp_path, text, "title:", "no logsource")


def test_an_unknown_field_is_an_error_at_its_key(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    peer_zone_kind: internet\n", "    peer_zone_kind: internet\n    halfopen|gt: 3\n"
    )
    problem = error(tmp_path, text)
    assert problem.line == line_of(text, "halfopen")
    assert (
        "unknown field 'halfopen' for category access" in problem.message and "half_open" in problem.message
    )


def test_a_field_of_another_category_is_unknown(tmp_path: Path) -> None:
    text = GOOD.replace("    peer_zone_kind: internet\n", "    peer_zone_kind: internet\n    process: sshd\n")
    expect(tmp_path, text, "process: sshd", "unknown field 'process'")


def test_host_fields_are_known_in_every_category(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    peer_zone_kind: internet\n", "    peer_zone_kind: internet\n    department|contains: 局\n"
    )
    assert load_rule_file(write(tmp_path, text)).name == "admin_from_internet"


def test_an_unknown_modifier_is_an_error_at_its_key(tmp_path: Path) -> None:
    text = GOOD.replace("    direction: inbound", "    direction|startwith: in")
    expect(tmp_path, text, "direction|startwith", "unknown modifier 'startwith'")


def test_a_modifier_zonewatch_does_not_evaluate_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("    direction: inbound", "    direction|base64: inbound")
    expect(tmp_path, text, "direction|base64", "not supported")


def test_a_keyword_detection_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace(
        "  condition: selection", "  words:\n    - ssh\n    - rdp\n  condition: selection or words"
    )
    expect(tmp_path, text, "    - ssh", "keyword")


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("    service|re: '(unclosed'", "regular expression"),
        ("    peer_addr|cidr: 10.0.0.0/33", "cidr"),
        ("    attempts|gte: many", "number"),
        ("    service|exists: maybe", "exists"),
    ],
)
def test_a_bad_value_is_an_error_at_its_key(tmp_path: Path, item: str, words: str) -> None:
    text = GOOD.replace("    direction: inbound\n", f"    direction: inbound\n{item}\n")
    problem = error(tmp_path, text)
    assert problem.line == line_of(text, item.strip()), str(problem)
    assert problem.message


def test_a_bad_value_in_a_list_of_maps_is_found_too(tmp_path: Path) -> None:
    text = GOOD.replace(
        "  condition: selection",
        "  filter:\n    - peer_zone: a\n    - peer_addr|cidr: nonsense\n"
        "  condition: selection and not filter",
    )
    expect(tmp_path, text, "peer_addr|cidr: nonsense", "cidr")


def test_an_undefined_identifier_in_the_condition_is_an_error_at_the_condition(tmp_path: Path) -> None:
    text = GOOD.replace("  condition: selection", "  condition: selection and not filter")
    expect(tmp_path, text, "condition: selection and not filter", "'filter' not defined")


def test_a_condition_that_does_not_parse_is_an_error_at_the_condition(tmp_path: Path) -> None:
    text = GOOD.replace("  condition: selection", "  condition: selection and (")
    expect(tmp_path, text, "condition: selection and (", "condition")


def test_a_detection_without_condition_is_an_error(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("  condition: selection\n", ""), "detection:", "condition")


# ---- required keys ---------------------------------------------------------------------------------


def test_a_rule_needs_a_level(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("level: high\n", ""), "title:", "no level")


def test_a_bad_level_is_an_error_at_the_level(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("level: high", "level: severe"), "level:", "'severe'")


def test_a_rule_needs_a_uuid_id(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("id: 0b6f3c4e-1d2a-4b5c-8d9e-000000000001\n", ""), "title:", "no id")
    expect(tmp_path, GOOD.replace("0b6f3c4e-1d2a-4b5c-8d9e-000000000001", "rule-1"), "id:", "UUID")


def test_a_rule_needs_a_title(tmp_path: Path) -> None:
    problem = error(tmp_path, GOOD.replace("title: SSH or RDP from the internet\n", ""))
    assert problem.line == 1 and "title" in problem.message


def test_dedup_by_names_known_fields(tmp_path: Path) -> None:
    text = GOOD.replace("dedup-by: [agent_id, peer_addr]", "dedup-by:\n  - agent_id\n  - peer")
    expect(tmp_path, text, "  - peer", "unknown field 'peer'")


def test_a_misspelt_zonewatch_key_is_not_silently_ignored(tmp_path: Path) -> None:
    expect(tmp_path, GOOD.replace("dedup-by:", "dedup_by:"), "dedup_by:", "did you mean 'dedup-by'")


# ---- samples ---------------------------------------------------------------------------------------


def test_a_rule_needs_samples(tmp_path: Path) -> None:
    text = GOOD[: GOOD.index("samples:")]
    expect(tmp_path, text, "title:", "no samples")


def test_samples_need_a_no_match_case(tmp_path: Path) -> None:
    text = GOOD[: GOOD.index("  no_match:")]
    expect(tmp_path, text, "samples:", "no_match")


def test_a_sample_event_needs_a_category(tmp_path: Path) -> None:
    first_case = "- {category: access, direction: inbound, service: ssh, peer_zone_kind: internet, peer"
    text = GOOD.replace(first_case, first_case.replace("category: access, ", ""))
    expect(tmp_path, text, "{direction: inbound", "no category")


def test_an_unknown_field_in_a_sample_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("agent_id: a2}", "agent_id: a2,\n         peer_zone_knd: x}")
    expect(tmp_path, text, "peer_zone_knd", "unknown field 'peer_zone_knd'")


def test_a_correlation_case_is_a_list_of_events(tmp_path: Path) -> None:
    start, end = CORRELATION.index("  no_match:"), CORRELATION.index("---")
    text = (
        CORRELATION[:start]
        + "  no_match:\n    - {category: access, direction: inbound}\n"
        + CORRELATION[end:]
    )
    expect(tmp_path, text, "    - {category: access, direction: inbound}", "list of events")


# ---- correlations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["value_percentile", "value_median"])
def test_unsupported_correlation_types_are_refused_at_the_type(tmp_path: Path, kind: str) -> None:
    expect(tmp_path, CORRELATION.replace("type: value_count", f"type: {kind}"), "type:", "not supported")


def test_an_unknown_correlation_type_is_an_error_at_the_type(tmp_path: Path) -> None:
    expect(tmp_path, CORRELATION.replace("type: value_count", "type: value_max"), "type:", "value_max")


def test_a_bad_timespan_is_an_error_at_the_timespan(tmp_path: Path) -> None:
    expect(tmp_path, CORRELATION.replace("timespan: 5m", "timespan: 5 minutes"), "timespan:", "timespan")


def test_a_bad_correlation_condition_is_an_error_at_the_condition(tmp_path: Path) -> None:
    expect(
        tmp_path,
        CORRELATION.replace("{gte: 3, field: ports}", "{gte: 3, lt: 9, field: ports}"),
        "condition: {",
        "condition",
    )


def test_a_group_by_field_must_exist_in_the_detection_s_category(tmp_path: Path) -> None:
    text = CORRELATION.replace(
        "group-by: [agent_id, peer_addr]", "group-by:\n    - agent_id\n    - peer_address"
    )
    expect(tmp_path, text, "- peer_address", "unknown field 'peer_address'")


def test_the_value_field_must_exist_in_the_detection_s_category(tmp_path: Path) -> None:
    expect(
        tmp_path, CORRELATION.replace("field: ports", "field: port"), "condition: {", "unknown field 'port'"
    )


def test_generate_true_is_refused(tmp_path: Path) -> None:
    text = CORRELATION.replace("  timespan: 5m\n", "  timespan: 5m\n  generate: true\n")
    expect(tmp_path, text, "generate:", "own file")


def test_expression_conditions_are_refused(tmp_path: Path) -> None:
    text = CORRELATION.replace("type: value_count", "type: temporal").replace(
        "condition: {gte: 3, field: ports}", "condition: inbound_failure"
    )
    expect(tmp_path, text, "condition: inbound_failure", "expression conditions")


def test_dedup_by_on_a_correlation_is_refused(tmp_path: Path) -> None:
    text = CORRELATION.replace("level: medium\n", "level: medium\ndedup-by: [agent_id]\n")
    expect(tmp_path, text, "dedup-by:", "group-by")


def test_samples_on_a_referenced_detection_are_refused(tmp_path: Path) -> None:
    text = CORRELATION + "samples: {match: [[{category: access}]], no_match: [[{category: access}]]}\n"
    expect(tmp_path, text, "samples:", "belongs on the correlation", occurrence=2)

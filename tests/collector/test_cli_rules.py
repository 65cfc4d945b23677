"""`zonewatch-collector rules`: list, validate, test and explain, through the same argparse wiring and
error handling as the real command line (collector.cli turns a CollectorError into one line, exit 2)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import textwrap
from pathlib import Path

import pytest

from collector import cli_rules
from collector.errors import CollectorError

ADMIN = """\
title: Admin service from the internet
id: 7e1d0c2b-0000-4000-8000-000000000001
name: admin_from_internet
level: high
logsource: {product: zonewatch, category: access}
dedup-by: [agent_id, peer_addr]
detection:
  selection:
    direction: inbound
    service: [ssh, rdp]
    peer_zone_kind: internet
  condition: selection
samples:
  match:
    - {category: access, direction: inbound, service: ssh, peer_zone_kind: internet}
  no_match:
    - {category: access, direction: outbound, service: ssh, peer_zone_kind: internet}
"""

SCAN = """\
title: Port scan
id: 7e1d0c2b-0000-4000-8000-000000000002
name: port_scan
level: medium
correlation:
  type: value_count
  rules: [inbound]
  group-by: [agent_id, peer_addr]
  timespan: 5m
  condition: {gte: 3, field: ports}
samples:
  match:
    - - {category: access, direction: inbound, peer_addr: 10.0.0.9, ports: [22, 23, 80]}
  no_match:
    - - {category: access, direction: inbound, peer_addr: 10.0.0.9, ports: [22]}
---
title: inbound
name: inbound
logsource: {product: zonewatch, category: access}
detection: {sel: {direction: inbound}, condition: sel}
"""


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Parse and run like collector.cli.main: a CollectorError is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog="zonewatch-collector")
    sub = parser.add_subparsers(dest="command", required=True)

    def db_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=Path, default=Path("collector.db"))

    def format_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    handlers = cli_rules.add_parser(sub, db_arg, format_arg)
    args = parser.parse_args(argv)
    try:
        code = handlers[args.command](args)
    except CollectorError as exc:
        print(f"zonewatch-collector: error: {exc}", file=__import__("sys").stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "admin_from_internet.yml").write_text(ADMIN, encoding="utf-8")
    (directory / "port_scan.yml").write_text(SCAN, encoding="utf-8")
    return directory


def test_the_handler_is_keyed_rules() -> None:
    parser = argparse.ArgumentParser()
    handlers = cli_rules.add_parser(parser.add_subparsers(), lambda p: None, lambda p: None)
    assert set(handlers) == {"rules"}


@pytest.mark.parametrize("action", [[], ["list"], ["validate"], ["test"], ["explain"]])
def test_every_subcommand_has_help_with_an_example(
    action: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        run(["rules", *action, "--help"], capsys)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "zonewatch-collector rules" in out


def test_list_shows_every_rule(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["rules", "list", "--rules", str(rules)], capsys)
    assert code == 0 and err == ""
    assert "admin_from_internet" in out and "port_scan" in out and "value_count" in out


def test_list_as_json_and_csv(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["rules", "list", "--rules", str(rules), "--format", "json"], capsys)
    assert code == 0
    listed = json.loads(out)
    assert [r["name"] for r in listed] == ["admin_from_internet", "port_scan"]
    assert listed[0] == {
        "id": "7e1d0c2b-0000-4000-8000-000000000001",
        "name": "admin_from_internet",
        "title": "Admin service from the internet",
        "level": "high",
        "kind": "detection",
        "category": "access",
        "dedup_by": ["agent_id", "peer_addr"],
        "file": "admin_from_internet.yml",
    }
    code, out, _ = run(["rules", "list", "--rules", str(rules), "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[1]["kind"] == "value_count" and rows[1]["dedup_by"] == "agent_id, peer_addr"


def test_list_reports_files_that_do_not_load(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (rules / "broken.yml").write_text(ADMIN.replace("level: high", "level: severe"), encoding="utf-8")
    code, out, err = run(["rules", "list", "--rules", str(rules)], capsys)
    assert code == 1 and "port_scan" in out
    assert f"{rules / 'broken.yml'}:4: 'severe' is not a valid Sigma rule level" in err


def test_validate_a_good_directory(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["rules", "validate", "--rules", str(rules)], capsys)
    assert code == 0 and "OK, 2 rules" in out


def test_validate_prints_file_line_message_and_exits_1(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (rules / "bad.yml").write_text(
        ADMIN.replace("    peer_zone_kind:", "    peer_zone_knd:"), encoding="utf-8"
    )
    (rules / "dup.yml").write_text(ADMIN.replace("name: admin_from_internet", "name: x"), encoding="utf-8")
    code, out, _ = run(["rules", "validate", "--rules", str(rules)], capsys)
    assert code == 1
    unknown = "unknown field 'peer_zone_knd' for category access; did you mean 'peer_zone_kind'?"
    reused = f"id 7e1d0c2b-0000-4000-8000-000000000001 is also {rules / 'admin_from_internet.yml'}'s"
    assert out.splitlines() == [f"{rules / 'bad.yml'}:11: {unknown}", f"{rules / 'dup.yml'}:2: {reused}"]


def test_validate_given_files(rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "elsewhere.yml"
    bad.write_text(ADMIN.replace("product: zonewatch", "product: linux"), encoding="utf-8")
    code, out, _ = run(["rules", "validate", str(rules / "port_scan.yml")], capsys)
    assert code == 0 and "OK, 1 rule" in out
    code, out, _ = run(["rules", "validate", str(rules / "port_scan.yml"), str(bad)], capsys)
    assert code == 1 and out.startswith(f"{bad}:5: logsource product must be zonewatch")


def test_test_runs_every_case(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["rules", "test", "--rules", str(rules)], capsys)
    assert code == 0
    assert out.count("PASS") == 4 and "4 cases in 2 rules: 4 passed, 0 failed" in out


def test_test_one_rule_by_name_id_or_file(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("port_scan", "7e1d0c2b-0000-4000-8000-000000000002", str(rules / "port_scan.yml")):
        code, out, _ = run(["rules", "test", "--rules", str(rules), name], capsys)
        assert code == 0 and "2 cases in 1 rule:" in out and "port_scan" in out


def test_a_failing_case_fails_the_command(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = SCAN.replace("ports: [22]}", "ports: [22, 23, 24]}")
    (rules / "port_scan.yml").write_text(text, encoding="utf-8")
    code, out, _ = run(["rules", "test", "--rules", str(rules)], capsys)
    assert code == 1
    assert "FAIL  port_scan.yml: port_scan: no_match 1 (line 15): expected no match" in out
    assert "1 failed" in out


def test_an_unknown_rule_is_one_line_and_exit_2(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["rules", "test", "--rules", str(rules), "nothing"], capsys)
    assert code == 2 and out == ""
    hint = "(give an id, a name or a file; `rules list` shows them)"
    assert err.strip() == f"zonewatch-collector: error: no rule 'nothing' in {rules} {hint}"


def test_explain_an_inline_fact(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fact = json.dumps({"direction": "inbound", "service": "SSH", "peer_zone_kind": "extranet"})
    code, out, _ = run(
        ["rules", "explain", "admin_from_internet", "--rules", str(rules), "--fact", fact], capsys
    )
    assert code == 0
    assert 'peer_zone_kind = "internet": False (event: "extranet")' in out
    assert 'service = "ssh": True (event: "SSH")' in out
    assert out.rstrip().endswith("not raised")


def test_explain_facts_from_a_file_runs_them_in_order(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps([{"direction": "inbound", "peer_addr": "10.0.0.9", "ports": [p]} for p in (22, 23, 80)]),
        encoding="utf-8",
    )
    code, out, _ = run(
        ["rules", "explain", "port_scan", "--rules", str(rules), "--fact", f"@{facts}"], capsys
    )
    assert code == 0
    assert "event 3:" in out and "correlation value_count of ports" in out
    assert 'raised at time_ms 1002000, group {"agent_id":"sample-agent","peer_addr":"10.0.0.9"}' in out


@pytest.mark.parametrize(
    ("fact", "words"),
    [("{not json", "not JSON"), ("[1, 2]", "JSON object"), ("@/nonexistent/facts.json", "cannot read")],
)
def test_explain_refuses_a_bad_fact_in_one_line(
    rules: Path, capsys: pytest.CaptureFixture[str], fact: str, words: str
) -> None:
    code, _, err = run(["rules", "explain", "port_scan", "--rules", str(rules), "--fact", fact], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_explain_a_rule_that_does_not_load_names_its_line(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(textwrap.dedent(ADMIN).replace("level: high\n", ""), encoding="utf-8")
    code, _, err = run(["rules", "explain", str(broken), "--rules", str(rules), "--fact", "{}"], capsys)
    assert code == 2 and f"{broken}:1: no level" in err


def test_a_missing_rules_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["rules", "list", "--rules", str(tmp_path / "none")], capsys)
    assert code == 2 and "no rules directory" in err

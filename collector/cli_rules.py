"""`zonewatch-collector rules`: list, validate, test and explain the Sigma rules the collector runs.

Only wiring: the rules library (collector.rules) loads, checks, runs samples and explains; this module
parses arguments and prints. Problems in rule files are printed as ``file:line: message`` and make the
command exit 1; a wrong argument (an unknown rule, malformed JSON) is a CollectorError, one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from collector.errors import CollectorError

Handler = Callable[[argparse.Namespace], int]


class RuleRow(NamedTuple):
    id: str
    name: str
    title: str
    level: str
    kind: str
    category: str
    dedup_by: str
    file: str


class TieredRuleRow(NamedTuple):
    """A rule on a lower tier: where it came from ("upstream" or "local") first."""

    origin: str
    id: str
    name: str
    title: str
    level: str
    kind: str
    category: str
    dedup_by: str
    file: str


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  zonewatch-collector rules {line}\n" for line in lines)


def _rules_arg(parser: argparse.ArgumentParser) -> None:
    from collector.config import default_rules_dir

    parser.add_argument(
        "--rules",
        type=Path,
        default=default_rules_dir(),
        metavar="DIR",
        help=f"the rule directory, one rule per *.yml file (default: the shipped pack {default_rules_dir()})",
    )


def add_parser(
    sub: Any,
    db_arg: Callable[[argparse.ArgumentParser], None],
    format_arg: Callable[[argparse.ArgumentParser], None],
) -> dict[str, Handler]:
    # db_arg is part of the common signature; rules are files and need no database.
    del db_arg
    raw = argparse.RawDescriptionHelpFormatter
    rules = sub.add_parser(
        "rules",
        help="list, validate, test and explain the Sigma detection rules",
        description="The collector raises incidents from Sigma rules (one per file, logsource product "
        "zonewatch). Every rule ships sample events that must and must not raise it.",
        epilog=_examples("list", "validate", "test", "explain port_scan_vertical --fact @event.json"),
        formatter_class=raw,
    )
    actions = rules.add_subparsers(
        dest="rules_command", required=True, metavar="ACTION", help="list, validate, test or explain"
    )
    listing = actions.add_parser(
        "list",
        help="the rules: id, name, title, level, kind, category, dedup-by, file",
        description="Load the rule directory and list its rules. Files that do not load are reported "
        "on stderr as file:line: message (exit 1).",
        epilog=_examples(
            "list",
            "list --rules /etc/zonewatch/rules --format json",
            "list --upstream-state /var/lib/zonewatch/upstream   # a lower tier: upstream and local rules",
        ),
        formatter_class=raw,
    )
    _rules_arg(listing)
    listing.add_argument(
        "--upstream-state",
        type=Path,
        metavar="DIR",
        help="on a lower tier: its upstream state directory (default of serve: upstream/ beside the "
        "database); lists the rules that came down too, with an origin column (upstream or local), "
        "and the local rules refused for replacing an upstream one",
    )
    format_arg(listing)
    validate = actions.add_parser(
        "validate",
        help="check rule files; errors name file:line",
        description="Load rules as the collector would: YAML, Sigma (pySigma) and zonewatch's checks "
        "(product, category, known fields, supported modifiers and correlation types, level, samples). "
        "Prints each problem as file:line: message and exits 1 if there is any.",
        epilog=_examples("validate", "validate rules/port_scan_vertical.yml", "validate --rules ./my-rules"),
        formatter_class=raw,
    )
    _rules_arg(validate)
    validate.add_argument(
        "files", nargs="*", type=Path, metavar="FILE", help="only these files (default: all)"
    )
    test = actions.add_parser(
        "test",
        help="run every rule's sample events: match cases must raise it, no_match cases must not",
        description="Each case runs through a fresh engine holding only its rule. Prints PASS or FAIL "
        "per case and exits 1 if any case fails or any rule does not load.",
        epilog=_examples("test", "test port_scan_vertical", "test --rules ./my-rules new_rule"),
        formatter_class=raw,
    )
    _rules_arg(test)
    test.add_argument(
        "names", nargs="*", metavar="RULE", help="only these rules: id, name or file (default: all)"
    )
    explain = actions.add_parser(
        "explain",
        help="show why an event does or does not raise a rule",
        description="Evaluate the rule on the event and print every detection identifier and condition "
        "node with True/False and the event value compared. Host fields and time_ms left out get the "
        "sample defaults; category defaults to the rule's. A JSON list of events also runs them in order "
        "through the rule, for correlations.",
        epilog=_examples(
            'explain admin_access_from_non_admin_zone --fact \'{"direction": "inbound", "service": "ssh"}\'',
            "explain port_scan_vertical --fact @events.json",
        ),
        formatter_class=raw,
    )
    _rules_arg(explain)
    explain.add_argument("rule", metavar="RULE", help="the rule: id, name or file")
    explain.add_argument(
        "--fact",
        required=True,
        metavar="JSON",
        help="the event: a JSON object (or a list of them), or @FILE to read it from a file",
    )
    return {"rules": cmd_rules}


def cmd_rules(args: argparse.Namespace) -> int:
    action = {"list": _list, "validate": _validate, "test": _test, "explain": _explain}
    return action[args.rules_command](args)


def _report(errors: list[Any]) -> None:
    for error in errors:
        print(error, file=sys.stderr)


def _list(args: argparse.Namespace) -> int:
    from collector.output import Column, render
    from collector.rules.load import load_rules

    if args.upstream_state is not None:
        from collector.tiers_policy import load_tiered_rules, policy_dir, upstream_rules_dir

        upstream = upstream_rules_dir(policy_dir(args.upstream_state))
        rules, errors = load_tiered_rules(args.rules, upstream)
    else:
        rules, errors = load_rules(args.rules)
    rows: list[Any] = [
        RuleRow(r.id, r.name, r.title, r.level, r.kind, r.category, ", ".join(r.dedup_by), r.path.name)
        for r in rules
    ]
    if args.upstream_state is not None:
        rows = [
            TieredRuleRow("upstream" if r.path.parent == upstream else "local", *row)
            for row, r in zip(rows, rules, strict=True)
        ]
    if args.format == "json":
        json.dump(
            [
                {**row._asdict(), "dedup_by": list(rule.dedup_by)}
                for row, rule in zip(rows, rules, strict=True)
            ],
            sys.stdout,
            ensure_ascii=False,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        shape = RuleRow if args.upstream_state is None else TieredRuleRow
        columns = [Column(name, name.replace("_", "-")) for name in shape._fields]
        render(rows, args.format, columns, sys.stdout, empty_message=f"no rules in {args.rules}")
    _report(errors)
    return 1 if errors else 0


def _validate(args: argparse.Namespace) -> int:
    from collector.rules import RuleError
    from collector.rules.load import Rule, check_unique, load_rule_file, load_rules

    if args.files:
        loaded: list[Rule] = []
        errors: list[RuleError] = []
        for path in args.files:
            try:
                loaded.append(load_rule_file(path))
            except RuleError as exc:
                errors.append(exc)
        rules, duplicates = check_unique(loaded)
        errors += duplicates
        where = ", ".join(str(p) for p in args.files)
    else:
        rules, errors = load_rules(args.rules)
        where = str(args.rules)
    for error in errors:
        print(error)
    if errors:
        print(f"{_count(len(errors), 'rule file')} with errors", file=sys.stderr)
        return 1
    print(f"{where}: OK, {_count(len(rules), 'rule')}")
    return 0


def _test(args: argparse.Namespace) -> int:
    from collector.rules.samples import run_samples

    rules, errors = _select(args.rules, args.names)
    failed = 0
    cases = 0
    for rule in rules:
        for result in run_samples(rule):
            cases += 1
            if result.passed:
                print(f"PASS  {rule.path.name}: {result.rule}: {result.case}")
            else:
                failed += 1
                print(f"FAIL  {rule.path.name}: {result.rule}: {result.case}: {result.message}")
    for error in errors:
        print(f"ERROR {error}")
    print(
        f"{_count(cases, 'case')} in {_count(len(rules), 'rule')}: {cases - failed} passed, {failed} failed"
        + (f"; {_count(len(errors), 'rule file')} did not load" if errors else "")
    )
    return 1 if failed or errors else 0


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"


def _select(directory: Path, names: list[str]) -> tuple[list[Any], list[Any]]:
    """The rules named (id, name or file; all when none), and the load errors that concern them."""
    from collector.rules import RuleError
    from collector.rules.load import load_rule_file, load_rules

    if not names:
        return load_rules(directory)
    rules, errors = load_rules(directory)
    chosen = []
    chosen_errors: list[RuleError] = []
    for name in names:
        path = Path(name)
        if path.suffix in (".yml", ".yaml") and path.is_file():
            try:
                chosen.append(load_rule_file(path))
            except RuleError as exc:
                chosen_errors.append(exc)
            continue
        chosen.append(_find(rules, errors, directory, name))
    return chosen, chosen_errors


def _find(rules: list[Any], errors: list[Any], directory: Path, name: str) -> Any:
    for rule in rules:
        if name in (rule.id, rule.name, rule.path.name, rule.path.stem):
            return rule
    broken = [e for e in errors if Path(e.path).stem == name or Path(e.path).name == name]
    if broken:
        raise CollectorError(f"rule {name!r} does not load: {broken[0]}")
    raise CollectorError(
        f"no rule {name!r} in {directory} (give an id, a name or a file; `rules list` shows them)"
    )


def _explain(args: argparse.Namespace) -> int:
    from collector.rules.compile import explain
    from collector.rules.engine import Engine
    from collector.rules.load import sample_event

    chosen, errors = _select(args.rules, [args.rule])
    if errors:
        raise errors[0]  # a RuleError: file:line: message
    rule = chosen[0]
    facts = _facts(args.fact)
    category = rule.categories[0] if rule.categories else ""
    events = [sample_event({"category": category, **fact}, index) for index, fact in enumerate(facts)]
    for number, event in enumerate(events, start=1):
        if len(events) > 1:
            print(f"event {number}:")
        for line in explain(rule, event):
            print(line)
    matches = Engine([rule]).process(events)
    if matches:
        for match in matches:
            print(f"raised at time_ms {match.time_ms}, group {match.dedup_key}")
    else:
        print("not raised" + (" by these events" if len(events) > 1 else ""))
    return 0


def _facts(text: str) -> list[dict[str, Any]]:
    """--fact: a JSON object or list of objects, given inline or as @FILE."""
    source = "--fact"
    if text.startswith("@"):
        path = Path(text[1:])
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollectorError(
            f"{source}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    facts = value if isinstance(value, list) else [value]
    if not facts or not all(isinstance(fact, dict) for fact in facts):
        raise CollectorError(f"{source}: give a JSON object (an event) or a list of them")
    for fact in facts:
        if not isinstance(fact.get("category", ""), str):
            raise CollectorError(f'{source}: category must be a string such as "access"')
    return facts

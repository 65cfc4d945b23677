"""Running the sample events every rule ships with: each match case must raise it, no no_match case may.

Each case runs through a fresh ``Engine([rule])``, so cases never share window state.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from collector.rules import RuleError
from collector.rules.engine import Engine
from collector.rules.load import Rule, load_rules


class SampleFailure(NamedTuple):
    path: str
    rule: str  # the rule's name
    case: str  # "match 2 (line 41)"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}: {self.case}: {self.message}"


class CaseResult(NamedTuple):
    rule: str
    case: str  # "match 2 (line 41)"
    passed: bool
    message: str  # what happened, for a failure and for a pass


def run_samples(rule: Rule) -> list[CaseResult]:
    """Every sample case of ``rule``, match cases first, with its outcome."""
    results = []
    for expected, cases in (("match", rule.samples_match), ("no_match", rule.samples_no_match)):
        for number, events in enumerate(cases, start=1):
            line = rule.lines.get(f"{expected} {number}")
            case = f"{expected} {number}" + (f" (line {line})" if line else "")
            matches = Engine([rule]).process(events)
            if expected == "match":
                passed = bool(matches)
                message = (
                    f"raised {len(matches)} time(s), first at event "
                    f"{_position(events, matches[0].events[-1])}"
                    if matches
                    else f"expected the rule to raise on these {len(events)} event(s); it did not"
                )
            else:
                passed = not matches
                message = (
                    "did not raise"
                    if passed
                    else f"expected no match; event {_position(events, matches[0].events[-1])} raised it "
                    f"(group {matches[0].dedup_key})"
                )
            results.append(CaseResult(rule.name, case, passed, message))
    return results


def _position(events: list[dict[str, object]], event: dict[str, object]) -> int:
    """The 1-based position of ``event`` in its case."""
    for index, candidate in enumerate(events, start=1):
        if candidate is event:
            return index
    return 0


def check_samples(rule: Rule) -> list[SampleFailure]:
    """The sample cases of ``rule`` that do not behave as they say."""
    return [
        SampleFailure(str(rule.path), result.rule, result.case, result.message)
        for result in run_samples(rule)
        if not result.passed
    ]


def check_directory(path: str | Path) -> list[SampleFailure | RuleError]:
    """Load every rule of a directory and run its samples: the load errors, then the sample failures."""
    rules, errors = load_rules(path)
    out: list[SampleFailure | RuleError] = list(errors)
    for rule in rules:
        out.extend(check_samples(rule))
    return out

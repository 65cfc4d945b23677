"""Detections compiled into Python functions ``(event) -> bool``, and ``explain`` to show why one matched.

pySigma's condition tree is made for translating rules into other query languages; walking it for every
event would cost tens of microseconds. Compiled once per load, a whole condition becomes one Python
expression in one generated function, with a fast path for the type each field usually has (``str`` for
names, ``int`` for counters); the OR of plain values on one field (``service: [ssh, rdp, telnet]``) is one
set lookup, and and/or operands run cheapest first. The engine goes further with ``compile_router``: one
function per category tests every rule of it, reading (and lowercasing) each shared field once.

What a value test means is ``values``' concern; a field missing from the event (or None) matches nothing
but ``field: null`` and ``field|exists: false``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionIdentifier,
    ConditionNOT,
    ConditionOR,
    ConditionSelector,
    ConditionValueExpression,
)
from sigma.rule import SigmaRule
from sigma.rule.detection import SigmaDetections
from sigma.types import (
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaString,
    SigmaType,
)

from collector.rules.correlate import group_keys
from collector.rules.values import CHEAP, SYMBOLS, FieldTests, UnsupportedCondition, other

if TYPE_CHECKING:
    from collector.rules.load import Rule

Event = dict[str, Any]
Matcher = Callable[[Event], bool]


class Detection(NamedTuple):
    """One compiled Sigma detection rule: the rule itself, or one a correlation references."""

    name: str  # its Sigma name ("" when it has none)
    category: str  # the logsource category: only events of it are offered to ``matches``
    matches: Matcher
    sigma: SigmaRule  # kept for explain()
    expression: str  # the Python expression ``matches`` returns, over the event ``e``
    constants: dict[str, Any]  # the names that expression uses besides ``e``


def compile_detection(rule: SigmaRule, category: str) -> Detection:
    """Compile a parsed (and checked) Sigma rule; its conditions, when several, are OR-ed."""
    source = _Source()
    parts = [_expression(condition.parse(), source) for condition in rule.detection.parsed_condition]
    expression, _ = _join(parts, "or")
    matcher = source.function(expression)
    return Detection(rule.name or "", category, matcher, rule, expression, source.constants)


def compile_condition(node: Any) -> Matcher:
    """Compile one node of a postprocessed condition tree (explain and the tests use it)."""
    source = _Source()
    return source.function(_expression(node, source)[0])


Hit = Callable[[Event, tuple[int, ...], list[Any]], None]
Router = Callable[[Event, list[Any]], None]


def compile_router(branches: list[tuple[list[tuple[int, Detection]], Hit]]) -> Router:
    """One function for all the rules of a category: ``route(event, out)`` tests every detection and
    calls its rule's ``hit(event, positions, out)`` with the positions (in the rule) of those that matched.

    One call per event instead of one per rule, which is most of the engine's time.
    """
    source = _Source()
    lines = ["def route(e, out):"]
    for detections, hit in branches:
        call = source.constant(hit)
        for _, detection in detections:
            source.constants.update(detection.constants)
        if len(detections) == 1:
            position, detection = detections[0]
            lines += [f"    if {detection.expression}:", f"        {call}(e, {(position,)!r}, out)"]
            continue
        lines.append("    m = []")
        for position, detection in detections:
            lines += [f"    if {detection.expression}:", f"        m.append({position!r})"]
        lines += ["    if m:", f"        {call}(e, tuple(m), out)"]
    if len(lines) == 1:
        lines.append("    pass")
    body = "\n".join(lines) + "\n"
    # A field several tests read is read once, up front (the event is a plain dict; reads are pure).
    uses: dict[str, int] = {}
    for field in _FIELD.findall(_LOWERED.sub("", body)):
        uses[field] = uses.get(field, 0) + 1
    fields = {field: f"f{next(_names)}" for field, count in uses.items() if count > 1}
    reads = "".join(f"    {local} = e.get({field})\n" for field, local in fields.items())
    # Likewise its lowercase, for the case-insensitive comparisons.
    for field in dict.fromkeys(match.group(2) for match in _LOWERED.finditer(body)):
        if field in fields:
            local = fields["lower " + field] = f"l{next(_names)}"
            reads += f"    {local} = {fields[field]}.lower() if type({fields[field]}) is str else None\n"
    body = body.replace("def route(e, out):\n", "def route(e, out):\n" + reads, 1)
    route: Router = source.define("route", body, fields)
    return route


_names = itertools.count(1)  # names unique across matchers, so a router can hold many


class _Source:
    """Python source for matchers, and the constants it names.

    A whole condition becomes one expression in one function: a call per event and rule instead of one
    per tree node. Only ``repr`` of numbers, strings and field names is pasted into the source; everything
    else (sets, compiled regexes, the slow-path predicates) is passed in as a named constant.
    """

    def __init__(self) -> None:
        self.constants: dict[str, Any] = {"_other": other}

    def constant(self, value: Any) -> str:
        name = f"_c{next(_names)}"
        self.constants[name] = value
        return name

    def variable(self) -> str:
        return f"v{next(_names)}"

    def lowered(self, variable: str, read: str) -> str:
        return _lowered(variable, read)

    def function(self, expression: str) -> Matcher:
        matcher: Matcher = self.define("match", f"def match(e):\n    return {expression}\n")
        return matcher

    def define(self, name: str, text: str, fields: dict[str, str] | None = None) -> Any:
        """Compile ``text`` defining ``name``; a field reads as the local ``fields`` names, else e.get."""
        fields = fields or {}
        text = _LOWERED.sub(lambda m: fields.get("lower " + m.group(2)) or f"{m.group(1)}.lower()", text)
        text = _FIELD.sub(lambda m: fields.get(m.group(1)) or f"e.get({m.group(1)})", text)
        namespace = {"__builtins__": _BUILTINS, **self.constants}
        exec(compile(text, f"<zonewatch {name}>", "exec"), namespace)  # reprs of literals only: see above
        return namespace[name]


def _field(name: str) -> str:
    """A field read in generated source, marked so a router can read it once for all its rules: NUL
    cannot occur in the source otherwise (repr escapes it)."""
    return f"\0{name!r}\0"


def _lowered(variable: str, field: str) -> str:
    """``variable.lower()``, where ``variable`` holds the (str) value of ``field`` (a ``_field`` mark):
    marked too, so a router can lowercase a field once for all its rules (\\1 cannot occur either)."""
    return f"\1{variable}{field}\1"


_FIELD = re.compile("\0(.*?)\0", re.DOTALL)
_LOWERED = re.compile("\1(v[0-9]+)\0(.*?)\0\1", re.DOTALL)


_BUILTINS = {"type": type, "str": str, "int": int, "bool": bool, "tuple": tuple}


def _join(parts: list[tuple[str, int]], word: str) -> tuple[str, int]:
    if len(parts) == 1:
        return parts[0]
    ordered = sorted(parts, key=lambda part: part[1])
    return "(" + f" {word} ".join(text for text, _ in ordered) + ")", sum(cost for _, cost in parts)


def _expression(node: Any, source: _Source) -> tuple[str, int]:
    """A Python expression for a condition node, and its relative cost."""
    if isinstance(node, ConditionFieldEqualsValueExpression):
        return _field_expression(node.field, [node.value], source)
    if isinstance(node, ConditionNOT):
        text, cost = _expression(node.args[0], source)
        return f"(not {text})", cost
    if isinstance(node, ConditionAND):
        return _join([_expression(arg, source) for arg in _flatten(node, ConditionAND)], "and")
    if isinstance(node, ConditionOR):
        return _join(_or_expressions(_flatten(node, ConditionOR), source), "or")
    if isinstance(node, ConditionValueExpression):
        raise UnsupportedCondition("keyword detections (a value without a field) are not supported")
    if node is None:
        raise UnsupportedCondition("the condition is empty")
    raise UnsupportedCondition(f"unsupported condition element {type(node).__name__}")


def _flatten(node: Any, kind: type) -> list[Any]:
    """(a or (b or c)) is a or b or c: flat lists let one field's values merge into one test."""
    out: list[Any] = []
    for arg in node.args:
        out.extend(_flatten(arg, kind) if type(arg) is kind else [arg])
    return out


def _or_expressions(args: list[Any], source: _Source) -> list[tuple[str, int]]:
    """OR-ed tests on the same field become one test (one lookup, one lowercasing per event)."""
    by_field: dict[str, list[SigmaType]] = {}
    order: list[Any] = []
    for arg in args:
        if isinstance(arg, ConditionFieldEqualsValueExpression) and _is_scalar_test(arg.value):
            if arg.field not in by_field:
                by_field[arg.field] = []
                order.append(arg.field)
            by_field[arg.field].append(arg.value)
        else:
            order.append(arg)
    return [
        _field_expression(item, by_field[item], source)
        if isinstance(item, str)
        else _expression(item, source)
        for item in order
    ]


def _is_scalar_test(value: SigmaType) -> bool:
    return not isinstance(value, SigmaNull | SigmaExists)


# ---- field tests -------------------------------------------------------------------------------


def _field_expression(field: str, values: list[SigmaType], source: _Source) -> tuple[str, int]:
    """An expression for ``field`` equal to any of ``values`` (OR), and its cost."""
    get = _field(field)
    if len(values) == 1 and isinstance(values[0], SigmaNull):
        return f"({get} is None)", CHEAP
    if len(values) == 1 and isinstance(values[0], SigmaExists):
        return (f"({get} is not None)" if values[0].exists else f"({get} is None)"), CHEAP
    tests = FieldTests()
    for value in values:
        tests.add(value)
    return tests.expression(get, source)


# ---- explain -----------------------------------------------------------------------------------


def explain(rule: Rule, event: Event) -> list[str]:
    """Why ``event`` does (or does not) match ``rule``: every detection identifier and condition node.

    Lines are indented two spaces per level; each ends with True/False and, for a field test, the event
    value it compared. For a correlation, the groups this event would count toward follow.
    """
    lines = [f"rule {rule.name} [{rule.kind}, {rule.category}]: {rule.title}"]
    depth = 0
    for detection in rule.detections:
        if rule.correlation is not None:
            lines.append(f"  detection {detection.name} [{detection.category}]: {detection.matches(event)}")
            depth = 1
        if event.get("category") != detection.category:
            lines.append(
                f"{'  ' * (depth + 1)}not considered: the event's category is "
                f"{_shown(event.get('category'))}, the detection's {detection.category}"
            )
            continue
        sections = detection.sigma.detection
        for condition in sections.parsed_condition:
            tree = condition.parse(postprocess=False)
            result = compile_condition(condition.parse())(event)
            lines.append(f"{'  ' * (depth + 1)}condition {condition.condition!r}: {result}")
            _explain_node(tree, sections, event, depth + 2, lines)
    correlation = rule.correlation
    if correlation is not None:
        field = f" of {correlation.field}" if correlation.field else ""
        group_by = ", ".join(correlation.group_by) or "nothing (one group)"
        lines.append(
            f"  correlation {correlation.type}{field} over [{', '.join(correlation.rules)}], grouped by "
            f"{group_by}, within {correlation.timespan_ms // 1000} s: raises when the measure is "
            f"{correlation.op} {correlation.threshold}"
        )
        if any(detection.matches(event) for detection in rule.detections):
            for key in group_keys(correlation.group_by, event):
                group = dict(zip(correlation.group_by, key, strict=True))
                lines.append(f"    this event counts toward group {json.dumps(group, ensure_ascii=False)}")
        else:
            lines.append("    this event matches none of its detections: it counts toward no group")
    return lines


def _explain_node(node: Any, sections: SigmaDetections, event: Event, depth: int, lines: list[str]) -> bool:
    pad = "  " * depth
    if isinstance(node, ConditionIdentifier):
        tree = sections[node.identifier].postprocess(sections)
        result = compile_condition(tree)(event)
        lines.append(f"{pad}{node.identifier}: {result}")
        _explain_tree(tree, event, depth + 1, lines)
        return result
    if isinstance(node, ConditionSelector):
        identifiers = node.resolve_referenced_detections(sections)
        index = len(lines)
        results = [_explain_node(ident, sections, event, depth + 1, lines) for ident in identifiers]
        result = any(results) if node.cond_class is ConditionOR else all(results)
        lines.insert(index, f"{pad}{node.args[0]} of {node.pattern}: {result}")
        return result
    if isinstance(node, ConditionNOT | ConditionAND | ConditionOR):
        index = len(lines)
        results = [_explain_node(arg, sections, event, depth + 1, lines) for arg in node.args]
        if isinstance(node, ConditionNOT):
            result, word = not results[0], "not"
        else:
            result, word = (all(results), "and") if isinstance(node, ConditionAND) else (any(results), "or")
        lines.insert(index, f"{pad}{word}: {result}")
        return result
    raise UnsupportedCondition(f"unexpected condition element {type(node).__name__}")


def _explain_tree(node: Any, event: Event, depth: int, lines: list[str]) -> None:
    """The field tests under one detection identifier, each with the event value it compared."""
    pad = "  " * depth
    if isinstance(node, ConditionFieldEqualsValueExpression):
        result = compile_condition(node)(event)
        shown = _shown(event[node.field]) if event.get(node.field) is not None else "missing"
        lines.append(f"{pad}{describe(node.field, node.value)}: {result} (event: {shown})")
        return
    if isinstance(node, ConditionNOT | ConditionAND | ConditionOR):
        word = "not" if isinstance(node, ConditionNOT) else "and" if isinstance(node, ConditionAND) else "or"
        lines.append(f"{pad}{word}: {compile_condition(node)(event)}")
        for arg in node.args:
            _explain_tree(arg, event, depth + 1, lines)


def describe(field: str, value: SigmaType) -> str:
    """One field test as people read it: ``attempts >= 20``, ``service = 'ssh'``, ``peer_addr in 10/8``."""
    if isinstance(value, SigmaNull):
        return f"{field} is null"
    if isinstance(value, SigmaExists):
        return f"{field} exists" if value.exists else f"{field} does not exist"
    if isinstance(value, SigmaCompareExpression):
        return f"{field} {SYMBOLS[value.op]} {value.number.number}"
    if isinstance(value, SigmaRegularExpression):
        flags = "".join(
            sorted({"IGNORECASE": "i", "MULTILINE": "m", "DOTALL": "s"}[f.name] for f in value.flags)
        )
        return f"{field} =~ /{value.regexp.original}/{flags}"
    if isinstance(value, SigmaCIDRExpression):
        return f"{field} in {value.cidr}"
    if isinstance(value, SigmaBool):
        return f"{field} = {'true' if value.boolean else 'false'}"
    if isinstance(value, SigmaNumber):
        return f"{field} = {value.number}"
    if isinstance(value, SigmaString):
        cased = " (cased)" if isinstance(value, SigmaCasedString) else ""
        verb = "like" if value.contains_special() else "="
        return f"{field} {verb} {_shown(str(value))}{cased}"
    return f"{field} = {value!r}"


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)

"""Reading rule files: pySigma parses and validates, zonewatch adds its own checks; every error has a line.

A rule file holds one rule: a detection rule, or a correlation rule followed (``---``) by the detection
rules it references. Rules are reviewed data that operators edit, so a mistake must point at the line to
fix: YAML errors carry PyYAML's mark; pySigma's errors carry none, so they are mapped back to the key they
are about through the YAML node tree (``yaml.compose``), and detection errors are found by re-parsing the
detection items one at a time.

Beyond pySigma, zonewatch refuses what would load fine but never work: a product other than zonewatch, an
unknown category, a field the category does not have (it would never match), a modifier the engine does
not evaluate, a missing level, and missing or malformed samples.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationRule, SigmaExtendedCorrelationCondition
from sigma.exceptions import SigmaError
from sigma.modifiers import modifier_mapping
from sigma.rule import SigmaRule
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from collector.errors import CollectorError
from collector.rules import RuleError, locate
from collector.rules.compile import Detection, compile_detection
from collector.rules.correlate import TYPES, CorrelationSpec
from collector.rules.fields import (
    CATEGORIES,
    SAMPLE_HOST,
    SAMPLE_START_MS,
    SAMPLE_STEP_MS,
    known_fields,
)
from collector.rules.locate import Doc
from collector.rules.values import UnsupportedCondition

Event = dict[str, Any]
DEFAULT_DEDUP_BY = ("agent_id",)
LEVELS = ("informational", "low", "medium", "high", "critical")
# The modifiers the engine evaluates (the contract's list, their flag aliases, and neq).
MODIFIERS = frozenset(
    {"contains", "startswith", "endswith", "all", "cidr", "re", "i", "ignorecase", "m", "multiline", "s",
     "dotall", "gt", "gte", "lt", "lte", "exists", "cased", "neq"}
)  # fmt: skip
SIGMA_KEYS = frozenset(
    {"title", "id", "name", "related", "status", "description", "references", "author", "date", "modified",
     "tags", "logsource", "detection", "fields", "falsepositives", "level", "license", "taxonomy", "scope",
     "correlation"}
)  # fmt: skip
ZONEWATCH_KEYS = ("dedup-by", "samples")


@dataclass(frozen=True, eq=False)
class Rule:
    """One rule file, checked and compiled. Identity is the object (rules hold unhashable samples)."""

    path: Path
    id: str
    name: str  # its Sigma name, or the file's stem when it has none
    title: str
    level: str  # incident severity: one of LEVELS
    description: str
    status: str
    category: str  # logsource category of its detection(s), comma-separated when several
    kind: str  # "detection" or the correlation type
    dedup_by: tuple[str, ...]
    samples_match: list[list[Event]]
    samples_no_match: list[list[Event]]
    digest: str  # sha256 of the file
    detections: tuple[Detection, ...] = field(repr=False, default=())
    correlation: CorrelationSpec | None = None
    # Correlations: a digest of what the window state depends on (type, group-by, timespan, field and the
    # referenced detections, not the threshold): Engine.reload keeps a window while it is unchanged.
    window_key: str = ""
    categories: tuple[str, ...] = ()
    # Lines of interest, for messages: "id", "name", "match 1", "no_match 2", ...
    lines: Mapping[str, int] = field(default_factory=dict, repr=False)


def sample_event(event: Mapping[str, Any], index: int) -> Event:
    """A sample (or hand-written) event with the contract's defaults for what it leaves out."""
    return {**SAMPLE_HOST, "time_ms": SAMPLE_START_MS + SAMPLE_STEP_MS * index, **event}


def load_rule_file(path: str | Path) -> Rule:
    """Read, check and compile one rule file; every problem is a RuleError naming its line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RuleError(path, 1, f"cannot read the rule file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RuleError(path, line, "the file is not UTF-8; save it as UTF-8") from None
    return _File(path, text, hashlib.sha256(raw).hexdigest()).rule()


def load_rules(directory: str | Path) -> tuple[list[Rule], list[RuleError]]:
    """Every ``*.yml``/``*.yaml`` file of ``directory`` by file name: the rules that load, and the errors.

    An id or name used by an earlier file makes the later file an error (and its rule is left out), so
    incidents never mix two rules.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CollectorError(f"no rules directory at {directory}")
    files = sorted(
        (p for p in directory.iterdir() if p.suffix in (".yml", ".yaml") and p.is_file()),
        key=lambda p: p.name,
    )
    rules: list[Rule] = []
    errors: list[RuleError] = []
    for path in files:
        try:
            rules.append(load_rule_file(path))
        except RuleError as exc:
            errors.append(exc)
    kept, duplicates = check_unique(rules)
    return kept, sorted(errors + duplicates, key=lambda e: (e.path, e.line))


def check_unique(rules: Iterable[Rule]) -> tuple[list[Rule], list[RuleError]]:
    """Rules whose id and name no earlier rule uses, and an error for each one that reuses them."""
    kept: list[Rule] = []
    errors: list[RuleError] = []
    ids: dict[str, Rule] = {}
    names: dict[str, Rule] = {}
    for rule in rules:
        first = ids.get(rule.id)
        if first is not None:
            errors.append(
                RuleError(rule.path, rule.lines.get("id", 1), f"id {rule.id} is also {first.path}'s")
            )
            continue
        first = names.get(rule.name)
        if first is not None:
            line = rule.lines.get("name", 1)
            errors.append(RuleError(rule.path, line, f"name {rule.name!r} is also {first.path}'s"))
            continue
        ids[rule.id] = names[rule.name] = rule
        kept.append(rule)
    return kept, errors


class _File:
    """One rule file being checked: knows its path, so every check can fail with a line."""

    def __init__(self, path: Path, text: str, digest: str) -> None:
        self.path = path
        self.text = text
        self.digest = digest

    def fail(self, where: Node | int, message: str) -> RuleError:
        return RuleError(self.path, where if isinstance(where, int) else locate.line(where), message)

    # -- the file as a whole -----------------------------------------------------------------------

    def rule(self) -> Rule:
        docs = locate.documents(self.path, self.text)
        if not docs:
            raise self.fail(1, "the file holds no rule")
        for doc in docs:
            for key in ("action", "filter"):
                found = locate.item(doc.node, key)
                if found is not None:
                    raise self.fail(
                        found[0], f"Sigma '{key}:' documents are not supported: one rule per file"
                    )
        correlations = [doc for doc in docs if "correlation" in doc.data]
        detections = [doc for doc in docs if "correlation" not in doc.data]
        if len(correlations) > 1:
            raise self.fail(
                correlations[1].node, "a second correlation rule starts here: one rule per file (move it)"
            )
        if correlations:
            return self.correlation_rule(correlations[0], detections)
        if len(detections) > 1:
            raise self.fail(
                detections[1].node,
                "a second rule starts here: one rule per file (only a correlation is followed by the "
                "detections it references)",
            )
        return self.detection_rule(detections[0])

    # -- the two kinds of rule ---------------------------------------------------------------------

    def detection_rule(self, doc: Doc) -> Rule:
        self.known_keys(doc)
        sigma, category, detection = self.detection(doc)
        rule_id, level = self.identity(doc, sigma.id, sigma.level)
        dedup_by = self.dedup_by(doc, category)
        match, no_match, lines = self.samples(doc, single_events=True)
        return Rule(
            path=self.path,
            id=rule_id,
            name=sigma.name or self.path.stem,
            title=sigma.title,
            level=level,
            description=sigma.description or "",
            status=sigma.status.name.lower() if sigma.status else "",
            category=category,
            kind="detection",
            dedup_by=dedup_by,
            samples_match=match,
            samples_no_match=no_match,
            digest=self.digest,
            detections=(detection,),
            categories=(category,),
            lines={**self.identity_lines(doc), **lines},
        )

    def correlation_rule(self, doc: Doc, detection_docs: list[Doc]) -> Rule:
        self.known_keys(doc)
        try:
            correlation = SigmaCorrelationRule.from_dict(doc.data, collect_errors=True)
            errors = list(correlation.errors)
        except SigmaError as exc:
            errors = [exc]
        if errors:
            raise self.fail(*locate.sigma_error(doc, errors[0]))
        kind = correlation.type.name.lower()
        if kind not in TYPES:
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "type")),
                f"correlation type {kind} is not supported by zonewatch; use one of: {', '.join(TYPES)}",
            )
        condition = correlation.condition
        if isinstance(condition, SigmaExtendedCorrelationCondition):
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "condition")),
                "expression conditions are not supported: list the detections under rules: and give a "
                "condition such as {gte: 2}",
            )
        if len(correlation.aliases):
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "aliases")), "correlation aliases are not supported"
            )
        if correlation.generate:
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "generate")),
                "generate: true is not supported: a detection that should raise incidents on its own goes in "
                "its own file",
            )
        if isinstance(condition.fieldref, list):
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "condition")),
                "the condition's field must be one field",
            )
        found = locate.item(doc.node, "dedup-by")
        if found is not None:
            raise self.fail(found[0], "a correlation's incidents are keyed by its group-by; remove dedup-by")

        references = [reference.reference for reference in correlation.rules or []]
        referenced = self.referenced(doc, detection_docs, references)
        sigmas: list[SigmaRule] = []
        detections: list[Detection] = []
        for reference, detection_doc in zip(references, referenced, strict=True):
            for key in ZONEWATCH_KEYS:
                extra = locate.item(detection_doc.node, key)
                if extra is not None:
                    raise self.fail(
                        extra[0], f"{key} belongs on the correlation rule, not on a detection it references"
                    )
            sigma, _, detection = self.detection(detection_doc)
            sigmas.append(sigma)
            detections.append(detection._replace(name=reference))
        try:
            SigmaCollection([correlation, *sigmas], resolve_references=False).resolve_rule_references()
        except SigmaError as exc:
            raise self.fail(
                locate.key_line(doc.node, ("correlation", "rules")), locate.message(exc)
            ) from None

        group_by = tuple(correlation.group_by or ())
        self.correlation_fields(doc, detections, group_by, condition.fieldref)
        spec = CorrelationSpec(
            type=kind,
            rules=tuple(references),
            group_by=group_by,
            timespan_ms=correlation.timespan.seconds * 1000,
            op=condition.op.name.lower(),
            threshold=condition.count,
            field=condition.fieldref,
        )
        rule_id, level = self.identity(doc, correlation.id, correlation.level)
        match, no_match, lines = self.samples(doc, single_events=False)
        categories = tuple(dict.fromkeys(d.category for d in detections))
        window = {
            "shape": spec.shape(),
            "detections": [{k: d.data.get(k) for k in ("logsource", "detection")} for d in referenced],
        }
        return Rule(
            path=self.path,
            id=rule_id,
            name=correlation.name or self.path.stem,
            title=correlation.title,
            level=level,
            description=correlation.description or "",
            status=correlation.status.name.lower() if correlation.status else "",
            category=",".join(categories),
            kind=kind,
            dedup_by=group_by,
            samples_match=match,
            samples_no_match=no_match,
            digest=self.digest,
            detections=tuple(detections),
            correlation=spec,
            window_key=hashlib.sha256(json.dumps(window, sort_keys=True, default=str).encode()).hexdigest(),
            categories=categories,
            lines={**self.identity_lines(doc), **lines},
        )

    def referenced(self, doc: Doc, detection_docs: list[Doc], references: list[str]) -> list[Doc]:
        """The detection documents the correlation's rules name, in its order; all of them, no other."""
        by_reference: dict[str, Doc] = {}
        for candidate in detection_docs:
            for key in ("name", "id"):
                if candidate.data.get(key) is not None:
                    by_reference[str(candidate.data[key])] = candidate
        correlation_node = locate.item(doc.node, "correlation")
        rules_node = locate.item(correlation_node[1], "rules") if correlation_node else None
        reference_nodes: list[Node] = []
        if rules_node is not None:
            value = rules_node[1]
            reference_nodes = list(value.value) if isinstance(value, SequenceNode) else [rules_node[0]]
        referenced: list[Doc] = []
        for index, reference in enumerate(references):
            where: Node | int = reference_nodes[index] if index < len(reference_nodes) else doc.node
            target = by_reference.get(reference)
            if target is None:
                raise self.fail(
                    where,
                    f"the correlation references {reference!r}, which this file does not define: the "
                    f"detections a correlation references follow it in the same file (---), with name: "
                    f"{reference}",
                )
            if any(target is seen for seen in referenced):
                raise self.fail(where, f"{reference!r} is referenced twice")
            referenced.append(target)
        for candidate in detection_docs:
            if not any(candidate is seen for seen in referenced):
                raise self.fail(
                    candidate.node,
                    "this rule is not among the correlation's rules: one rule per file (reference it or "
                    "move it)",
                )
        return referenced

    def correlation_fields(
        self, doc: Doc, detections: list[Detection], group_by: tuple[str, ...], value_field: str | None
    ) -> None:
        """Group-by and value fields must exist in every referenced detection's category."""
        correlation_node = locate.item(doc.node, "correlation")
        assert correlation_node is not None
        group_node = locate.item(correlation_node[1], "group-by")
        group_lines = (
            [locate.line(n) for n in group_node[1].value]
            if group_node is not None and isinstance(group_node[1], SequenceNode)
            else [locate.line(group_node[0])] * len(group_by)
            if group_node is not None
            else []
        )
        checks = [
            (name, group_lines[i] if i < len(group_lines) else locate.line(doc.node))
            for i, name in enumerate(group_by)
        ]
        if value_field is not None:
            checks.append((value_field, locate.key_line(doc.node, ("correlation", "condition"))))
        for name, line in checks:
            for detection in detections:
                known = known_fields(detection.category)
                if name not in known:
                    raise self.fail(
                        line,
                        f"unknown field {name!r} for category {detection.category} (detection "
                        f"{detection.name}){locate.suggest(name, known)}",
                    )

    # -- one detection document --------------------------------------------------------------------

    def detection(self, doc: Doc) -> tuple[SigmaRule, str, Detection]:
        category = self.logsource(doc)
        self.detection_items(doc, category)
        try:
            sigma = SigmaRule.from_dict(doc.data, collect_errors=True)
            errors = list(sigma.errors)
        except SigmaError as exc:
            errors = [exc]
        if errors:
            raise self.fail(*locate.sigma_error(doc, errors[0]))
        condition_line = locate.key_line(doc.node, ("detection", "condition"))
        for condition in sigma.detection.parsed_condition:
            try:
                condition.parse()
            except SigmaError as exc:
                raise self.fail(
                    condition_line, f"condition {condition.condition!r}: {locate.message(exc)}"
                ) from None
        try:
            detection = compile_detection(sigma, category)
        except UnsupportedCondition as exc:
            raise self.fail(locate.key_line(doc.node, ("detection",)), str(exc)) from None
        return sigma, category, detection

    def logsource(self, doc: Doc) -> str:
        found = locate.item(doc.node, "logsource")
        if found is None:
            raise self.fail(doc.node, "no logsource: give logsource: {product: zonewatch, category: ...}")
        key, value = found
        if not isinstance(value, MappingNode):
            raise self.fail(key, "logsource must be a mapping: {product: zonewatch, category: ...}")
        product = locate.item(value, "product")
        if product is None or product[1].value != "zonewatch":
            shown = f", not {product[1].value!r}" if product is not None else ""
            raise self.fail(product[0] if product else key, f"logsource product must be zonewatch{shown}")
        category = locate.item(value, "category")
        if category is None:
            raise self.fail(key, f"logsource has no category; one of: {', '.join(CATEGORIES)}")
        name = category[1].value
        if not isinstance(category[1], ScalarNode) or name not in CATEGORIES:
            raise self.fail(
                category[0],
                f"unknown category {name!r}{locate.suggest(str(name), CATEGORIES)} "
                f"(categories: {', '.join(CATEGORIES)})",
            )
        return str(name)

    def detection_items(self, doc: Doc, category: str) -> None:
        """Every detection key names a known field of the category and modifiers the engine supports."""
        found = locate.item(doc.node, "detection")
        if found is None:
            return  # pySigma says "must have a detection"
        key, section = found
        if not isinstance(section, MappingNode):
            raise self.fail(key, "detection must be a mapping of named selections and a condition")
        known = known_fields(category)
        for identifier, definition in section.value:
            if identifier.value == "condition":
                continue
            items = definition.value if isinstance(definition, SequenceNode) else [definition]
            for item in items:
                if not isinstance(item, MappingNode):
                    raise self.fail(
                        item if isinstance(definition, SequenceNode) else identifier,
                        "a value without a field (keyword search) is not supported: name the field, e.g. "
                        "process: sshd",
                    )
                for item_key, _ in item.value:
                    self.detection_key(item_key, known, category)

    def detection_key(self, key: ScalarNode, known: frozenset[str], category: str) -> None:
        text = str(key.value)
        name, *modifiers = text.split("|")
        if not name:
            raise self.fail(key, f"{text!r}: a value without a field (keyword search) is not supported")
        for modifier in modifiers:
            if modifier not in modifier_mapping:
                raise self.fail(
                    key, f"unknown modifier {modifier!r} in {text!r}{locate.suggest(modifier, MODIFIERS)}"
                )
            if modifier not in MODIFIERS:
                raise self.fail(
                    key,
                    f"modifier {modifier!r} is not supported by zonewatch; use: "
                    f"{', '.join(sorted(MODIFIERS))}",
                )
        if name not in known:
            raise self.fail(
                key, f"unknown field {name!r} for category {category}{locate.suggest(name, known)}"
            )

    # -- zonewatch's keys --------------------------------------------------------------------------

    def known_keys(self, doc: Doc) -> None:
        """A misspelt dedup-by or samples would be kept as a custom attribute and silently ignored."""
        for key, _ in doc.node.value:
            word = str(key.value)
            if word in SIGMA_KEYS or word in ZONEWATCH_KEYS:
                continue
            close = difflib.get_close_matches(word, ZONEWATCH_KEYS, n=1, cutoff=0.7)
            if close:
                raise self.fail(key, f"unknown key {word!r}; did you mean {close[0]!r}?")

    def identity(self, doc: Doc, rule_id: Any, level: Any) -> tuple[str, str]:
        if rule_id is None:
            raise self.fail(doc.node, f"no id: give the rule a UUID, e.g. id: {uuid.uuid4()}")
        if level is None:
            raise self.fail(
                locate.key_line(doc.node, ("title",)),
                f"no level: the incident severity, one of {', '.join(LEVELS)}",
            )
        return str(rule_id), str(level.name).lower()

    def identity_lines(self, doc: Doc) -> dict[str, int]:
        return {
            key: locate.line(found[0])
            for key in ("id", "name")
            if (found := locate.item(doc.node, key)) is not None
        }

    def dedup_by(self, doc: Doc, category: str) -> tuple[str, ...]:
        found = locate.item(doc.node, "dedup-by")
        if found is None:
            return DEFAULT_DEDUP_BY
        key, value = found
        nodes = list(value.value) if isinstance(value, SequenceNode) else [value]
        if not nodes or not all(isinstance(n, ScalarNode) and n.value for n in nodes):
            raise self.fail(key, "dedup-by must be a list of field names, e.g. [agent_id, peer_addr]")
        known = known_fields(category)
        for node in nodes:
            if node.value not in known:
                raise self.fail(
                    node,
                    f"unknown field {node.value!r} for category {category}"
                    f"{locate.suggest(node.value, known)}",
                )
        return tuple(str(n.value) for n in nodes)

    def samples(
        self, doc: Doc, *, single_events: bool
    ) -> tuple[list[list[Event]], list[list[Event]], dict[str, int]]:
        found = locate.item(doc.node, "samples")
        if found is None:
            raise self.fail(
                doc.node,
                "no samples: give samples: with match: and no_match: cases (events that must and must "
                "not raise the rule)",
            )
        key, section = found
        data = doc.data["samples"]
        if not isinstance(section, MappingNode) or not isinstance(data, dict):
            raise self.fail(key, "samples must be a mapping with match: and no_match: lists of cases")
        for sample_key, _ in section.value:
            if sample_key.value not in ("match", "no_match"):
                raise self.fail(
                    sample_key, f"unknown key {sample_key.value!r} in samples; use match and no_match"
                )
        out: dict[str, list[list[Event]]] = {}
        lines: dict[str, int] = {}
        for name in ("match", "no_match"):
            item = locate.item(section, name)
            if item is None or not isinstance(item[1], SequenceNode) or not item[1].value:
                raise self.fail(
                    item[0] if item else key, f"samples need at least one {name} case (a list of cases)"
                )
            cases = []
            for number, (case_node, case) in enumerate(zip(item[1].value, data[name], strict=True), start=1):
                lines[f"{name} {number}"] = locate.line(case_node)
                cases.append(self.case(case_node, case, single_events))
            out[name] = cases
        return out["match"], out["no_match"], lines

    def case(self, node: Node, case: Any, single_events: bool) -> list[Event]:
        if isinstance(node, MappingNode):
            if not single_events:
                raise self.fail(node, "a correlation's sample case is a list of events: start it with '- - '")
            pairs = [(node, case)]
        elif isinstance(node, SequenceNode) and node.value:
            pairs = list(zip(node.value, case, strict=True))
        else:
            raise self.fail(node, "a sample case is a list of events (mappings with a category)")
        events = []
        for index, (event_node, event) in enumerate(pairs):
            if not isinstance(event_node, MappingNode) or not isinstance(event, dict):
                raise self.fail(event_node, "a sample event is a mapping of fields with a category")
            category = event.get("category")
            if category is None:
                raise self.fail(
                    event_node, f"the sample event has no category; one of: {', '.join(CATEGORIES)}"
                )
            if category not in CATEGORIES:
                where = locate.item(event_node, "category")
                raise self.fail(where[0] if where else event_node, f"unknown category {category!r}")
            known = known_fields(category)
            for field_node, _ in event_node.value:
                if field_node.value not in known:
                    raise self.fail(
                        field_node,
                        f"unknown field {field_node.value!r} for category {category}"
                        f"{locate.suggest(str(field_node.value), known)}",
                    )
            events.append(sample_event(event, index))
        return events

"""Where in a rule file a problem is: the YAML node tree, and pySigma's errors mapped back to lines.

pySigma parses plain dicts, so its errors name no line. Its exceptions have one class per top-level key
(SigmaLevelError: ``level``), which gives the key; an error inside ``detection`` is found by re-parsing the
detection one item at a time, the first item that fails being the line to fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from sigma.exceptions import (
    SigmaAuthorError,
    SigmaCorrelationConditionError,
    SigmaCorrelationRuleError,
    SigmaCorrelationTypeError,
    SigmaDateError,
    SigmaDescriptionError,
    SigmaError,
    SigmaFalsePositivesError,
    SigmaFieldsError,
    SigmaIdentifierError,
    SigmaLevelError,
    SigmaLicenseError,
    SigmaLogsourceError,
    SigmaModifiedError,
    SigmaNameError,
    SigmaReferencesError,
    SigmaRelatedError,
    SigmaScopeError,
    SigmaStatusError,
    SigmaTagError,
    SigmaTaxonomyError,
    SigmaTimespanError,
    SigmaTitleError,
    SigmaTypeError,
)
from sigma.rule.detection import SigmaDetection, SigmaDetectionItem
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from collector.rules import RuleError

# pySigma raises one exception class per top-level key; a located error points at that key.
_ERROR_KEYS: dict[type[SigmaError], tuple[str, ...]] = {
    SigmaIdentifierError: ("id",),
    SigmaNameError: ("name",),
    SigmaTaxonomyError: ("taxonomy",),
    SigmaRelatedError: ("related",),
    SigmaLevelError: ("level",),
    SigmaStatusError: ("status",),
    SigmaTagError: ("tags",),
    SigmaDateError: ("date",),
    SigmaModifiedError: ("modified",),
    SigmaFieldsError: ("fields",),
    SigmaFalsePositivesError: ("falsepositives",),
    SigmaAuthorError: ("author",),
    SigmaDescriptionError: ("description",),
    SigmaReferencesError: ("references",),
    SigmaTitleError: ("title",),
    SigmaScopeError: ("scope",),
    SigmaLicenseError: ("license",),
    SigmaLogsourceError: ("logsource",),
    SigmaCorrelationTypeError: ("correlation", "type"),
    SigmaTimespanError: ("correlation", "timespan"),
    SigmaCorrelationConditionError: ("correlation", "condition"),
}
# SigmaCorrelationRuleError covers several keys; its message says which.
_CORRELATION_WORDS = (
    ("generate", "generate"),
    ("group-by", "group-by"),
    ("timespan", "timespan"),
    ("alias", "aliases"),
    ("rule reference", "rules"),
    ("field reference", "condition"),
    ("condition", "condition"),
)


class Doc(NamedTuple):
    """One YAML document of a rule file: its node tree (for lines) and its data (for pySigma)."""

    node: MappingNode
    data: dict[str, Any]


def line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def item(node: Node | None, key: str) -> tuple[ScalarNode, Node] | None:
    """The (key node, value node) of ``key`` in a mapping node."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key:
                return key_node, value_node
    return None


def key_line(node: Node, keys: Iterable[str]) -> int:
    """The line of the deepest of ``keys`` (a path of mapping keys) present under ``node``."""
    found_line = line(node)
    for key in keys:
        found = item(node, key)
        if found is None:
            break
        found_line, node = line(found[0]), found[1]
    return found_line


def message(error: SigmaError) -> str:
    """pySigma's message without its " in <file>" suffix (we give the location ourselves)."""
    return str(error.args[0]) if error.args else type(error).__name__


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def documents(path: Path, text: str) -> list[Doc]:
    """The non-empty YAML documents of a file, each a mapping without duplicate keys."""
    loader = yaml.CSafeLoader(text) if yaml.__with_libyaml__ else yaml.SafeLoader(text)
    docs: list[Doc] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node)
            if data is None:
                continue  # an empty document, e.g. after a trailing '---'
            if not isinstance(node, MappingNode) or not isinstance(data, dict):
                where = node.start_mark.line + 1 if node is not None else 1
                raise RuleError(path, where, "a YAML document here must be a rule (a mapping of keys)")
            _no_duplicate_keys(path, node, set())
            docs.append(Doc(node, data))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
        # At the end of the stream the mark is past the last line: point at the last line instead.
        where = min(mark.line + 1, len(text.splitlines()) or 1) if mark else 1
        raise RuleError(path, where, f"invalid YAML: {detail}") from None
    except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow
        position = getattr(exc, "position", None)
        where = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
        raise RuleError(path, where, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    return docs


def _no_duplicate_keys(path: Path, node: Node, seen: set[int]) -> None:
    """YAML keeps the last of two equal keys silently; a rule author meant something else."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value != "<<":
                if key.value in first:
                    raise RuleError(
                        path,
                        line(key),
                        f"key {key.value!r} is given twice (first at line {first[key.value]})",
                    )
                first[key.value] = line(key)
            _no_duplicate_keys(path, value, seen)
    elif isinstance(node, SequenceNode):
        for value in node.value:
            _no_duplicate_keys(path, value, seen)


def sigma_error(doc: Doc, error: SigmaError) -> tuple[int, str]:
    """The line a pySigma error is about, and its message."""
    text = message(error)
    keys = _ERROR_KEYS.get(type(error))
    if type(error) is SigmaTypeError and "name" in text:
        keys = ("name",)
    if type(error) is SigmaCorrelationRuleError:
        lowered = text.lower()
        keys = next(
            (("correlation", k) for word, k in _CORRELATION_WORDS if word in lowered), ("correlation",)
        )
    if keys is not None:
        return key_line(doc.node, keys), text
    located = _detection_error(doc)
    if located is not None:
        return located
    return key_line(doc.node, ("detection",)), text


def _detection_error(doc: Doc) -> tuple[int, str] | None:
    """Re-parse the detection item by item: the first that fails is the line to fix."""
    found = item(doc.node, "detection")
    section = doc.data.get("detection")
    if found is None or not isinstance(found[1], MappingNode) or not isinstance(section, dict):
        return None
    for identifier, definition_node in found[1].value:
        name = identifier.value
        if name == "condition":
            continue
        definition = section.get(name)
        pieces: list[tuple[Node, Any]] = []
        if isinstance(definition_node, MappingNode) and isinstance(definition, dict):
            pieces = [(k, {k.value: definition[k.value]}) for k, _ in definition_node.value]
        elif isinstance(definition_node, SequenceNode) and isinstance(definition, list):
            for element_node, element in zip(definition_node.value, definition, strict=False):
                if isinstance(element_node, MappingNode) and isinstance(element, dict):
                    pieces.extend((k, {k.value: element[k.value]}) for k, _ in element_node.value)
                else:
                    pieces.append((element_node, element))
        for where, piece in pieces:
            try:
                if isinstance(piece, dict):
                    for item_key, value in piece.items():
                        SigmaDetectionItem.from_mapping(item_key, value)
                SigmaDetection.from_definition(piece)
            except SigmaError as exc:
                return line(where), message(exc)
        try:
            SigmaDetection.from_definition(definition)
        except SigmaError as exc:
            return line(identifier), message(exc)
    return None

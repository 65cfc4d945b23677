"""How one Sigma value is tested against an event value: the matching semantics, in one place.

``FieldTests`` collects the OR-ed values of one field and gives both forms of the test: a Python
predicate for any event value (the slow path: lists, missing fields, unusual types) and an inline
expression for the type the field usually has (the fast path the compiler pastes into a matcher).

- strings compare case-insensitively unless ``|cased``; ``*`` and ``?`` are wildcards; a number or boolean
  event value compares with a string as its text (``"22"`` matches 22, ``"true"`` matches True);
- numbers compare numerically, also against a numeric string; booleans only with booleans or
  ``"true"``/``"false"``;
- a missing field (or None) matches nothing here: ``null`` and ``exists`` are the compiler's;
- a list-valued event field (``ports``, ``blockers``) matches when any element matches;
- ``|re`` searches (unanchored; RE2 syntax, pySigma's engine) with the ``i``/``m``/``s`` flags;
- ``|cidr`` takes IPv4 and IPv6 networks and reads an IPv4-mapped IPv6 address as the IPv4 address it
  carries.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import operator
import re
import socket
from collections.abc import Callable
from typing import Any, Protocol

from sigma.policy import default_policy
from sigma.policy.regex_engine import RegexPattern
from sigma.types import (
    CompareOperators,
    Placeholder,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaRegularExpressionFlag,
    SigmaString,
    SigmaType,
    SpecialChars,
)

Predicate = Callable[[Any], bool]

# Relative cost of a test, to run cheap ones first: and/or are pure, so their order is free.
CHEAP, STRING, NETWORK, REGEX = 1, 3, 4, 6


class UnsupportedCondition(ValueError):
    """A condition uses something zonewatch does not evaluate (keywords, placeholders, ...)."""


class SourceNames(Protocol):
    """What an inline test needs from the code generator."""

    def constant(self, value: Any) -> str:
        """A name the generated code can use for ``value``."""
        ...

    def variable(self) -> str:
        """A fresh local variable name."""
        ...

    def lowered(self, variable: str, read: str) -> str:
        """``variable.lower()``, where ``variable`` holds the str value that ``read`` reads."""
        ...


def other(value: Any, predicate: Predicate) -> bool:
    """The slow path: missing, list-valued or of an unusual type."""
    if value is None:
        return False
    if type(value) is list or type(value) is tuple:
        for element in value:  # noqa: SIM110
            if element is not None and predicate(element):
                return True
        return False
    return predicate(value)


def text_of(value: Any) -> str | None:
    """An event value as the text string tests compare (None: it has none, e.g. a mapping)."""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def number_of(value: Any) -> int | float | None:
    """An event value as a number (numeric strings too; never a boolean)."""
    kind = type(value)
    if kind is int or kind is float:
        return value
    if kind is str:
        try:
            return int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                return None
            return number if number == number else None  # NaN compares with nothing
    return None


@functools.lru_cache(maxsize=4096)
def address_of(text: str) -> tuple[int, int] | None:
    """(version, address as int) of an address string; cached, as peers repeat across events and rules.

    inet_pton is strict (no leading zeros, no spaces) and ten times faster than ipaddress, which still
    reads what it does not (IPv6 scope ids).
    """
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
        packed = address.packed
    if len(packed) == 16 and packed[:12] == _MAPPED_PREFIX:
        packed = packed[12:]  # ::ffff:a.b.c.d is the IPv4 host a.b.c.d
    return (4 if len(packed) == 4 else 6), int.from_bytes(packed, "big")


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
SYMBOLS = {
    CompareOperators.LT: "<",
    CompareOperators.LTE: "<=",
    CompareOperators.GT: ">",
    CompareOperators.GTE: ">=",
    CompareOperators.NEQ: "!=",
}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "!=": operator.ne,
}


def _literal(number: int | float, source: SourceNames) -> str:
    """A number pasted into source: its repr when that reads back as the same number."""
    if type(number) is int or (type(number) is float and math.isfinite(number)):
        return repr(number)
    return source.constant(number)


_RE_FLAGS = {
    SigmaRegularExpressionFlag.IGNORECASE: re.IGNORECASE,
    SigmaRegularExpressionFlag.MULTILINE: re.MULTILINE,
    SigmaRegularExpressionFlag.DOTALL: re.DOTALL,
}


class FieldTests:
    """The OR-ed value tests of one field, grouped by kind so each kind costs one check per event."""

    def __init__(self) -> None:
        # Case-insensitive string tests hold lowercase text; cased ones hold it as written.
        self.equal: dict[bool, set[str]] = {False: set(), True: set()}
        self.prefixes: dict[bool, list[str]] = {False: [], True: []}
        self.suffixes: dict[bool, list[str]] = {False: [], True: []}
        self.contains: dict[bool, list[str]] = {False: [], True: []}
        self.patterns: list[re.Pattern[str]] = []  # wildcard strings: fullmatch on the text
        self.searches: list[RegexPattern] = []  # |re: search the text
        self.anything = False  # a lone '*': any value that has a text
        self.numbers: set[int | float] = set()
        self.compares: list[tuple[str, int | float]] = []  # (">=", 20)
        self.booleans: set[bool] = set()
        self.networks: list[tuple[int, int, int]] = []  # (version, mask, network) as ints

    def add(self, value: SigmaType) -> None:
        if isinstance(value, SigmaString):
            self._add_string(value, cased=isinstance(value, SigmaCasedString))
        elif isinstance(value, SigmaBool):
            self.booleans.add(bool(value.boolean))
        elif isinstance(value, SigmaNumber):
            self.numbers.add(value.number)
        elif isinstance(value, SigmaCompareExpression):
            self.compares.append((SYMBOLS[value.op], value.number.number))
        elif isinstance(value, SigmaRegularExpression):
            # pySigma's engine (RE2 by default): the one that validated the pattern, and one that never
            # backtracks, so no pattern can stall the collector.
            engine = (value.policy or default_policy).regex_engine
            flags = 0
            for flag in value.flags:
                flags |= _RE_FLAGS[flag]
            try:
                self.searches.append(engine.compile(value.regexp.original, flags))
            except engine.error as exc:
                raise UnsupportedCondition(f"regular expression {value.regexp.original!r}: {exc}") from None
        elif isinstance(value, SigmaCIDRExpression):
            network = value.network
            self.networks.append((network.version, int(network.netmask), int(network.network_address)))
        else:
            raise UnsupportedCondition(f"values of type {type(value).__name__} are not supported")

    def _add_string(self, value: SigmaString, *, cased: bool) -> None:
        parts = list(value.s)
        if any(isinstance(part, Placeholder) for part in parts):
            raise UnsupportedCondition("placeholders (%name%) are not supported")
        texts = [part if cased else part.lower() for part in parts if isinstance(part, str)]
        shape = tuple(part if isinstance(part, SpecialChars) else "" for part in parts)
        many = SpecialChars.WILDCARD_MULTI
        if not any(isinstance(part, SpecialChars) for part in parts):
            self.equal[cased].add("".join(texts))
        elif shape == (many,):
            self.anything = True
        elif shape == ("", many):
            self.prefixes[cased].append(texts[0])
        elif shape == (many, ""):
            self.suffixes[cased].append(texts[0])
        elif shape == (many, "", many):
            self.contains[cased].append(texts[0])
        else:
            regex = "".join(
                ".*" if part is many else "." if isinstance(part, SpecialChars) else re.escape(str(part))
                for part in parts
            )
            flags = re.DOTALL | (0 if cased else re.IGNORECASE)
            self.patterns.append(re.compile(regex, flags))

    # -- building ------------------------------------------------------------------------------

    def expression(self, get: str, source: SourceNames) -> tuple[str, int]:
        """The inline test and its cost: a fast path for the type the field usually has, else ``_other``."""
        value = source.variable()
        predicate = source.constant(self.predicate())
        fallback = f"_other({value}, {predicate})"
        kinds = self._kinds()
        equal = self.equal[False]
        if equal and kinds == 1:
            if len(equal) == 1:
                wanted = repr(next(iter(equal)))
                test = f"({value} == {wanted} or {source.lowered(value, get)} == {wanted})"
            else:
                names = source.constant(frozenset(equal))
                test = f"({value} in {names} or {source.lowered(value, get)} in {names})"
            return f"({test} if type({value} := {get}) is str else {fallback})", CHEAP
        if len(self.compares) == 1 and kinds == 1:
            symbol, number = self.compares[0]
            test = f"{value} {symbol} {_literal(number, source)}"
            return f"({test} if type({value} := {get}) is int else {fallback})", CHEAP
        if self.numbers and kinds == 1:
            test = f"{value} in {source.constant(frozenset(self.numbers))}"
            return f"({test} if type({value} := {get}) is int else {fallback})", CHEAP
        if self.booleans and kinds == 1:
            test = f"{value} is {next(iter(self.booleans))}" if len(self.booleans) == 1 else "True"
            return f"({test} if type({value} := {get}) is bool else {fallback})", CHEAP
        cost = REGEX if self.patterns or self.searches else NETWORK if self.networks else STRING
        return f"({predicate}({value}) if type({value} := {get}) is str else {fallback})", cost

    def _kinds(self) -> int:
        """How many kinds of test are present (the fast paths need exactly one)."""
        text = self.equal[True] or any(
            self.prefixes[cased] or self.suffixes[cased] or self.contains[cased] for cased in (False, True)
        )
        kinds = [
            bool(self.equal[False]),
            bool(text or self.patterns or self.searches or self.anything),
            bool(self.numbers),
            bool(self.compares),
            bool(self.booleans),
            bool(self.networks),
        ]
        return sum(kinds)

    def predicate(self) -> Predicate:
        """A test of one non-missing scalar event value."""
        parts = [
            p
            for p in (self._insensitive(), self._cased(), self._numeric(), self._boolean(), self._cidr())
            if p
        ]
        if not parts:
            return lambda value: False
        return parts[0] if len(parts) == 1 else (lambda value: any(part(value) for part in parts))

    def _insensitive(self) -> Predicate | None:
        equal, prefixes = self.equal[False], tuple(self.prefixes[False])
        suffixes, contains = tuple(self.suffixes[False]), tuple(self.contains[False])
        patterns, anything = tuple(self.patterns), self.anything
        if not (equal or prefixes or suffixes or contains or patterns or anything):
            return None
        if equal and not (prefixes or suffixes or contains or patterns or anything):

            def equals(value: Any) -> bool:
                text = text_of(value)
                return text is not None and text.lower() in equal

            return equals

        def insensitive(value: Any) -> bool:
            text = text_of(value)
            if text is None:
                return False
            if anything:
                return True
            low = text.lower()
            return (
                low in equal
                or (bool(prefixes) and low.startswith(prefixes))
                or (bool(suffixes) and low.endswith(suffixes))
                or any(part in low for part in contains)
                or any(pattern.fullmatch(text) for pattern in patterns)
            )

        return insensitive

    def _cased(self) -> Predicate | None:
        equal, prefixes = self.equal[True], tuple(self.prefixes[True])
        suffixes, contains, searches = (
            tuple(self.suffixes[True]),
            tuple(self.contains[True]),
            tuple(self.searches),
        )
        if not (equal or prefixes or suffixes or contains or searches):
            return None

        def cased(value: Any) -> bool:
            text = text_of(value)
            if text is None:
                return False
            return (
                text in equal
                or (bool(prefixes) and text.startswith(prefixes))
                or (bool(suffixes) and text.endswith(suffixes))
                or any(part in text for part in contains)
                or any(search.search(text) for search in searches)
            )

        return cased

    def _numeric(self) -> Predicate | None:
        numbers = self.numbers
        compares = tuple((_COMPARE[symbol], limit) for symbol, limit in self.compares)
        if not (numbers or compares):
            return None

        def numeric(value: Any) -> bool:
            number = number_of(value)
            if number is None:
                return False
            return number in numbers or any(compare(number, limit) for compare, limit in compares)

        return numeric

    def _boolean(self) -> Predicate | None:
        booleans = self.booleans
        if not booleans:
            return None
        texts = {"true" if b else "false" for b in booleans}

        def boolean(value: Any) -> bool:
            if type(value) is bool:
                return value in booleans
            return type(value) is str and value.lower() in texts

        return boolean

    def _cidr(self) -> Predicate | None:
        networks = tuple(self.networks)
        if not networks:
            return None

        def in_network(value: Any) -> bool:
            if type(value) is not str:
                return False
            address = address_of(value)
            if address is None:
                return False
            version, number = address
            for net_version, mask, network in networks:
                if version == net_version and number & mask == network:
                    return True
            return False

        return in_network

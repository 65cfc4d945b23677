"""The windows of correlation rules: per group, what the last ``timespan`` of event time holds.

Windows run on event time (``time_ms``, the agent's clock), so a backlog replayed after an outage is judged
as it happened, not as it arrived. A group's window ends at the newest event time seen in that group; an
event older than that end minus the timespan arrives too late and is ignored.

Memory is bounded whatever the input: at most ``max_groups`` groups per rule (the least recently updated
is evicted and counted), at most ``max_values`` timestamps / distinct values / summed values per group
(the oldest go first), the last ``EVIDENCE`` contributing events per group, and groups whose window has
passed are dropped as event time advances. Entries are kept in arrival order and pruned from the oldest,
which is exact when a group's events arrive in time order (one agent's facts do); timestamps of
``event_count`` and summed values are kept sorted even when they do not.
"""

from __future__ import annotations

import bisect
import json
import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

EVIDENCE = 20
TYPES = ("event_count", "value_count", "value_sum", "value_avg", "temporal", "temporal_ordered")
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
    "eq": operator.eq,
    "neq": operator.ne,
}

Event = dict[str, Any]
GroupKey = tuple[Any, ...]


@dataclass(frozen=True)
class CorrelationSpec:
    """What a correlation rule computes, and the condition that raises it."""

    type: str  # one of TYPES
    rules: tuple[str, ...]  # the referenced detections' names, in the rule's order
    group_by: tuple[str, ...]
    timespan_ms: int
    op: str  # one of OPERATORS
    threshold: int | float
    field: str | None = None  # value_count, value_sum, value_avg

    def shape(self) -> tuple[Any, ...]:
        """Everything the window's state depends on; the condition (op, threshold) is not part of it."""
        return (self.type, self.rules, self.group_by, self.timespan_ms, self.field)

    def satisfied(self, measure: float) -> bool:
        return OPERATORS[self.op](measure, self.threshold)


def group_keys(group_by: Sequence[str], event: Event) -> list[GroupKey]:
    """The groups an event counts toward: one, or one per element of each list-valued group-by field.

    A missing group-by field groups as None; an empty list puts the event in no group at all.
    """
    key = tuple(map(event.get, group_by))
    for value in key:
        if type(value) in _CONTAINERS:
            break
    else:
        return [key]
    choices = []
    for value in key:
        if type(value) is list or type(value) is tuple:
            choices.append(list(dict.fromkeys(_hashable(element) for element in value)))
        else:
            choices.append([_hashable(value)])
    return list(product(*choices))


def dedup_key(group: dict[str, Any]) -> str:
    """Stable JSON of a group's field values: equal groups, equal keys; different groups never equal."""
    return _ENCODER.encode(group)


_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


_CONTAINERS = frozenset({list, tuple, dict})
_SCALARS = frozenset({str, int, float, bool})


def _hashable(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return value


def _numbers(value: Any) -> list[int | float]:
    """The numbers a value_sum/value_avg field contributes (each element of a list; never booleans)."""
    elements = value if type(value) is list or type(value) is tuple else (value,)
    out: list[int | float] = []
    for element in elements:
        if type(element) is int or type(element) is float:
            out.append(element)
        elif type(element) is str:
            try:
                out.append(float(element))
            except ValueError:
                continue
    return [number for number in out if number == number and abs(number) != float("inf")]


class Group:
    """One group's window: its field values, newest event time, evidence and the type's state."""

    __slots__ = ("_dedup_key", "end_ms", "evidence", "fields", "key", "state")

    def __init__(self, fields: tuple[str, ...], key: GroupKey, end_ms: int, state: Any) -> None:
        self.fields = fields
        self.key = key
        self._dedup_key: str | None = None
        self.end_ms = end_ms
        self.evidence: deque[Event] = deque(maxlen=EVIDENCE)
        self.state = state

    @property
    def values(self) -> dict[str, Any]:
        """The group-by fields and this group's values of them (a new dict each time)."""
        return dict(zip(self.fields, self.key, strict=True))

    @property
    def dedup_key(self) -> str:
        """Computed when the group first raises: most groups never do."""
        if self._dedup_key is None:
            self._dedup_key = dedup_key(self.values)
        return self._dedup_key


class Window:
    """The groups of one correlation rule. ``add`` returns the groups the event keeps over the condition."""

    def __init__(self, spec: CorrelationSpec, *, max_groups: int, max_values: int) -> None:
        if max_groups < 1 or max_values < 1:
            raise ValueError("max_groups and max_values must be at least 1")
        self.spec = spec
        self.max_groups = max_groups
        self.max_values = max_values
        self.groups: OrderedDict[GroupKey, Group] = OrderedDict()
        self.evicted = 0  # groups dropped to stay within max_groups
        self.expired = 0  # groups dropped because their window passed
        self.now = -(2**63)  # the newest event time seen
        self._next_sweep = self.now
        self._update, self._new_state = _STATE[spec.type]
        self._contribution = _CONTRIBUTION[spec.type]
        self.retarget(spec, check=False)

    def retarget(self, spec: CorrelationSpec, *, check: bool = True) -> None:
        """Judge with a new condition; the state stays (it does not depend on the condition)."""
        if check and spec.shape() != self.spec.shape():
            raise ValueError("a window can only change its condition, not what it computes")
        self.spec = spec
        self._compare = OPERATORS[spec.op]
        self._threshold = spec.threshold

    def add(self, event: Event, matched: Sequence[int]) -> list[Group]:
        """Count ``event`` (which matched the referenced detections at indexes ``matched``)."""
        spec = self.spec
        contribution = self._contribution(event, matched, spec.field)
        if contribution is None:
            return []
        t = event.get("time_ms")
        if type(t) is not int:
            t = int(t) if isinstance(t, float) and t == t else 0
        if t > self.now:
            self.now = t
            if t >= self._next_sweep:
                self._sweep()
        span = spec.timespan_ms
        groups = self.groups
        update, compare, threshold, max_values = self._update, self._compare, self._threshold, self.max_values
        fired = []
        for key in group_keys(spec.group_by, event):
            group = groups.get(key)
            if group is None:
                if t < self.now - span:
                    continue  # a late event alone would make a group that is already over
                group = groups[key] = Group(spec.group_by, key, t, self._new_state(len(spec.rules)))
                if len(groups) > self.max_groups:
                    groups.popitem(last=False)
                    self.evicted += 1
            else:
                groups.move_to_end(key)
                if t > group.end_ms:
                    group.end_ms = t
            cutoff = group.end_ms - span
            if t < cutoff:
                continue
            group.evidence.append(event)
            if compare(update(group.state, t, contribution, cutoff, max_values), threshold):
                fired.append(group)
        return fired

    def _sweep(self) -> None:
        """Drop groups whose window has passed, least recently updated first."""
        cutoff = self.now - self.spec.timespan_ms
        groups = self.groups
        while groups:
            key = next(iter(groups))
            if groups[key].end_ms >= cutoff:
                break
            del groups[key]
            self.expired += 1
        self._next_sweep = self.now + max(self.spec.timespan_ms // 4, 1)


# ---- what one event contributes: None when nothing ------------------------------------------------


def _matched(event: Event, matched: Sequence[int], field: str | None) -> Any:
    return matched


def _counted(event: Event, matched: Sequence[int], field: str | None) -> Any:
    return True


def _distinct(event: Event, matched: Sequence[int], field: str | None) -> Any:
    value = event.get(field or "")
    if value is None:
        return None
    if type(value) is list or type(value) is tuple:
        values = [e if type(e) in _SCALARS else _hashable(e) for e in value if e is not None]
        return values or None
    return (value if type(value) in _SCALARS else _hashable(value),)


def _summed(event: Event, matched: Sequence[int], field: str | None) -> Any:
    value = event.get(field or "")
    if type(value) is int or type(value) is float:
        return (value,) if value == value and abs(value) != _INFINITY else None
    if value is None:
        return None
    return _numbers(value) or None


_INFINITY = float("inf")
_CONTRIBUTION: dict[str, Callable[[Event, Sequence[int], str | None], Any]] = {
    "event_count": _counted,
    "value_count": _distinct,
    "value_sum": _summed,
    "value_avg": _summed,
    "temporal": _matched,
    "temporal_ordered": _matched,
}


# ---- per-type state: (update, new_state) ---------------------------------------------------------
# update(state, time, contribution, cutoff, max_values) -> the measure the condition compares.


def _count_update(times: deque[int], t: int, _: Any, cutoff: int, max_values: int) -> int:
    if not times or t >= times[-1]:
        times.append(t)
    else:
        bisect.insort(times, t)
    while times[0] < cutoff:
        times.popleft()
    while len(times) > max_values:
        times.popleft()
    return len(times)


def _distinct_update(
    values: OrderedDict[Any, int], t: int, contribution: list[Any], cutoff: int, max_values: int
) -> int:
    for value in contribution:
        seen = values.get(value)
        if seen is None or t >= seen:
            values[value] = t
            values.move_to_end(value)
    while values:
        first = next(iter(values))
        if values[first] >= cutoff:
            break
        del values[first]
    while len(values) > max_values:
        values.popitem(last=False)
    return len(values)


class _Sum:
    __slots__ = ("items", "total")

    def __init__(self) -> None:
        self.items: deque[tuple[int, float]] = deque()
        self.total: float = 0


def _sum_state(_: int) -> _Sum:
    return _Sum()


def _sum_items(state: _Sum, t: int, numbers: list[float], cutoff: int, max_values: int) -> None:
    items = state.items
    for number in numbers:
        if not items or t >= items[-1][0]:
            items.append((t, number))
        else:
            bisect.insort(items, (t, number))
        state.total += number
    while items and (items[0][0] < cutoff or len(items) > max_values):
        state.total -= items.popleft()[1]
    if not items:
        state.total = 0  # no float residue once the window is empty


def _sum_update(state: _Sum, t: int, numbers: list[float], cutoff: int, max_values: int) -> float:
    _sum_items(state, t, numbers, cutoff, max_values)
    return state.total


def _avg_update(state: _Sum, t: int, numbers: list[float], cutoff: int, max_values: int) -> float:
    _sum_items(state, t, numbers, cutoff, max_values)
    return state.total / len(state.items) if state.items else float("nan")


def _temporal_update(seen: dict[int, int], t: int, matched: Sequence[int], cutoff: int, _: int) -> int:
    for index in matched:
        if t >= seen.get(index, t):
            seen[index] = t
    for index in [index for index, when in seen.items() if when < cutoff]:
        del seen[index]
    return len(seen)


def _ordered_update(starts: list[int | None], t: int, matched: Sequence[int], cutoff: int, _: int) -> int:
    """starts[i]: the latest start time of an in-order chain through step i; the measure is its length.

    Steps are taken from the highest index down, so one event never serves as two consecutive steps.
    """
    for index in sorted(matched, reverse=True):
        if index == 0:
            first = starts[0]
            starts[0] = t if first is None else max(first, t)
            continue
        previous, current = starts[index - 1], starts[index]
        if previous is not None and previous >= cutoff and (current is None or previous > current):
            starts[index] = previous
    longest = 0
    for index, start in enumerate(starts):
        if start is not None and start < cutoff:
            starts[index] = None
        elif start is not None:
            longest = index + 1
    return longest


_STATE: dict[str, tuple[Callable[..., Any], Callable[[int], Any]]] = {
    "event_count": (_count_update, lambda _: deque()),
    "value_count": (_distinct_update, lambda _: OrderedDict()),
    "value_sum": (_sum_update, _sum_state),
    "value_avg": (_avg_update, _sum_state),
    "temporal": (_temporal_update, lambda _: {}),
    "temporal_ordered": (_ordered_update, lambda rules: [None] * rules),
}

"""Correlation windows: each type with group-by, list fan-out, timespan expiry on event time, bounded
memory (groups evicted, values capped, expired groups dropped), evidence, reload keeping state, and
distinct groups never sharing a dedup key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from collector.rules.correlate import EVIDENCE, CorrelationSpec, Window, group_keys
from collector.rules.engine import Engine, Match
from collector.rules.load import Rule, load_rule_file

ID = "5f0e2d1c-0000-4000-8000-00000000000"

INBOUND = "sel: {direction: inbound}\ncondition: sel"


def correlation(
    tmp_path: Path,
    kind: str,
    condition: str | None,
    group_by: list[str] | None,
    timespan: str = "10s",
    detections: dict[str, tuple[str, str]] | None = None,
    *,
    name: str = "corr",
    number: int = 1,
) -> Rule:
    """A correlation rule file; ``detections`` maps names to (category, detection YAML)."""
    detections = detections or {"hit": ("access", INBOUND)}
    lines = [
        f"title: {name}",
        f"id: {ID}{number}",
        f"name: {name}",
        "level: high",
        "correlation:",
        f"  type: {kind}",
        f"  rules: [{', '.join(detections)}]",
        f"  timespan: {timespan}",
    ]
    if group_by is not None:
        lines.append(f"  group-by: [{', '.join(group_by)}]")
    if condition is not None:
        lines.append(f"  condition: {condition}")
    first = next(iter(detections.values()))[0]
    lines.append(f"samples: {{match: [[{{category: {first}}}]], no_match: [[{{category: {first}}}]]}}")
    text = "\n".join(lines) + "\n"
    for detection_name, (category, detection) in detections.items():
        text += (
            f"---\ntitle: {detection_name}\nname: {detection_name}\n"
            f"logsource: {{product: zonewatch, category: {category}}}\n"
            f"detection:\n{textwrap.indent(detection, '  ')}\n"
        )
    path = tmp_path / f"{name}-{number}.yml"
    path.write_text(text, encoding="utf-8")
    return load_rule_file(path)


def event(second: float, category: str = "access", **fields: Any) -> dict[str, Any]:
    return {
        "category": category,
        "time_ms": int(second * 1000),
        "agent_id": "a1",
        "direction": "inbound",
        **fields,
    }


def fired(engine: Engine, *events: dict[str, Any]) -> list[Match]:
    return engine.process(list(events))


# ---- event_count -------------------------------------------------------------------------------


def test_event_count_raises_when_a_group_reaches_the_threshold_and_while_it_stays_over(
    tmp_path: Path,
) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"])
    engine = Engine([rule])
    assert fired(engine, event(0), event(1)) == []
    (third,) = fired(engine, event(2))
    assert third.group == {"agent_id": "a1"} and third.dedup_key == '{"agent_id":"a1"}'
    assert third.time_ms == 2000 and [e["time_ms"] for e in third.events] == [0, 1000, 2000]
    assert len(fired(engine, event(3))) == 1  # still over: raised again, same key
    assert fired(engine, event(4, agent_id="a2")) == []  # another group counts on its own


def test_event_count_forgets_events_older_than_the_timespan(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"], timespan="10s")
    engine = Engine([rule])
    assert fired(engine, event(0), event(5), event(11)) == []  # 0 left the window when 11 came
    assert len(fired(engine, event(15))) == 1  # 5, 11, 15
    assert fired(engine, event(40), event(45)) == []
    assert len(fired(engine, event(50))) == 1  # 40, 45, 50: exactly 10 s apart is within


def test_events_not_matching_the_detection_do_not_count(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 2}", ["agent_id"])])
    assert fired(engine, event(0), event(1, direction="outbound"), event(2, category="flow")) == []
    assert engine.stats()[f"{ID}1"].events == 2


def test_an_event_matching_two_detections_counts_once(tmp_path: Path) -> None:
    detections = {"a": ("access", INBOUND), "b": ("access", "sel: {service: ssh}\ncondition: sel")}
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 2}", ["agent_id"], detections=detections)])
    assert fired(engine, event(0, service="ssh")) == []
    assert len(fired(engine, event(1, direction="outbound", service="ssh"))) == 1


def test_a_correlation_without_group_by_has_one_group(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 2}", None)])
    (match,) = fired(engine, event(0, agent_id="a1"), event(1, agent_id="a2"))
    assert match.group == {} and match.dedup_key == "{}"


def test_a_missing_group_by_field_groups_as_null(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 2}", ["peer_addr"])])
    (match,) = fired(engine, event(0), event(1))
    assert match.group == {"peer_addr": None} and match.dedup_key == '{"peer_addr":null}'


def test_other_operators(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{eq: 2}", ["agent_id"])])
    assert [len(fired(engine, event(t))) for t in range(4)] == [0, 1, 0, 0]
    engine = Engine([correlation(tmp_path, "event_count", "{lt: 2}", ["agent_id"], number=2)])
    assert [len(fired(engine, event(t))) for t in range(3)] == [1, 0, 0]


# ---- value_count ---------------------------------------------------------------------------------


def test_value_count_counts_distinct_values_per_group(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_count", "{gte: 3, field: peer_addr}", ["agent_id"])
    engine = Engine([rule])
    assert fired(engine, event(0, peer_addr="10.0.0.1"), event(1, peer_addr="10.0.0.1")) == []
    assert fired(engine, event(2, peer_addr="10.0.0.2"), event(3, peer_addr="10.0.0.2", agent_id="a2")) == []
    (match,) = fired(engine, event(4, peer_addr="10.0.0.3"))
    assert match.group == {"agent_id": "a1"}


def test_value_count_over_a_list_field_counts_each_element(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_count", "{gte: 4, field: ports}", ["agent_id", "peer_addr"])
    engine = Engine([rule])
    assert (
        fired(engine, event(0, peer_addr="p", ports=[22, 23]), event(1, peer_addr="p", ports=[22, 80])) == []
    )
    (match,) = fired(engine, event(2, peer_addr="p", ports=[443]))
    assert match.group == {"agent_id": "a1", "peer_addr": "p"}


def test_value_count_forgets_values_older_than_the_timespan(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_count", "{gte: 3, field: ports}", ["agent_id"], timespan="10s")
    engine = Engine([rule])
    assert fired(engine, event(0, ports=[1]), event(5, ports=[2]), event(11, ports=[3])) == []
    assert len(fired(engine, event(12, ports=[1]))) == 1  # 2, 3 and 1 again (seen anew at 12)
    assert fired(engine, event(30, ports=[9])) == []


def test_an_event_without_the_value_field_contributes_nothing(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "value_count", "{gte: 1, field: peer_addr}", ["agent_id"])])
    assert fired(engine, event(0)) == []
    assert engine.stats()[f"{ID}1"].groups == 0


# ---- value_sum and value_avg ---------------------------------------------------------------------


def test_value_sum(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_sum", "{gt: 100, field: failed}", ["agent_id"], timespan="1m")
    engine = Engine([rule])
    assert fired(engine, event(0, failed=60), event(10, failed=40), event(20, failed="x")) == []
    assert len(fired(engine, event(30, failed=1))) == 1  # 101
    assert fired(engine, event(65, failed=1)) == []  # 0 left the window: 40 + 1 + 1
    assert fired(engine, event(66, failed=True)) == []  # booleans are not numbers


def test_value_avg(tmp_path: Path) -> None:
    detections = {"h": ("agent_health", "sel: {cpu_percent|gte: 0}\ncondition: sel")}
    rule = correlation(tmp_path, "value_avg", "{gte: 50, field: cpu_percent}", ["agent_id"], "1m", detections)
    engine = Engine([rule])
    health = "agent_health"
    assert fired(engine, event(0, health, cpu_percent=10), event(1, health, cpu_percent=80)) == []  # 45
    (match,) = fired(engine, event(2, health, cpu_percent=60))  # 50
    assert match.group == {"agent_id": "a1"}
    assert fired(engine, event(3, health, cpu_percent=0.5)) == []  # 37.6


def test_value_sum_over_a_list_field_sums_each_element(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_sum", "{gte: 100, field: ports}", ["agent_id"])
    assert len(Engine([rule]).process([event(0, ports=[40, 60])])) == 1


# ---- temporal ------------------------------------------------------------------------------------


LISTENER_THEN_ACCESS = {
    "opened": ("listener", "sel: {change: opened}\ncondition: sel"),
    "reached": ("access", "sel: {direction: inbound}\ncondition: sel"),
}


def test_temporal_needs_every_detection_within_the_timespan_in_any_order(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "temporal", None, ["agent_id"], "1m", LISTENER_THEN_ACCESS)
    engine = Engine([rule])
    assert fired(engine, event(0)) == []
    (match,) = fired(engine, event(30, "listener", change="opened"))
    assert [e["category"] for e in match.events] == ["access", "listener"]
    engine = Engine([rule])
    assert fired(engine, event(0, "listener", change="opened"), event(61)) == []  # too far apart
    assert fired(engine, event(62, "listener", change="opened", agent_id="a2")) == []  # a2's own group


def test_temporal_with_a_smaller_condition(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "temporal", "{gte: 1}", ["agent_id"], "1m", LISTENER_THEN_ACCESS)
    assert len(Engine([rule]).process([event(0)])) == 1


def test_temporal_ordered_needs_the_order(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "temporal_ordered", None, ["agent_id"], "1m", LISTENER_THEN_ACCESS)
    engine = Engine([rule])
    assert fired(engine, event(0), event(1, "listener", change="opened")) == []  # wrong order
    assert len(fired(engine, event(2))) == 1  # now opened (1) then reached (2)
    engine = Engine([rule])
    assert fired(engine, event(0, "listener", change="opened"), event(70)) == []  # not within 1 m


def test_temporal_ordered_one_event_is_not_two_steps(tmp_path: Path) -> None:
    detections = {"first": ("access", INBOUND), "second": ("access", "sel: {service: ssh}\ncondition: sel")}
    rule = correlation(tmp_path, "temporal_ordered", None, ["agent_id"], "1m", detections)
    engine = Engine([rule])
    assert fired(engine, event(0, service="ssh")) == []  # matches both: only the first step
    assert len(fired(engine, event(1, direction="outbound", service="ssh"))) == 1


# ---- fan-out and keys ----------------------------------------------------------------------------


def test_a_list_group_by_field_fans_out_into_one_group_per_element(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 2}", ["agent_id", "ports"])
    engine = Engine([rule])
    assert fired(engine, event(0, ports=[22, 80])) == []
    matches = fired(engine, event(1, ports=[80, 22, 22]))
    assert sorted(m.dedup_key for m in matches) == [
        '{"agent_id":"a1","ports":22}',
        '{"agent_id":"a1","ports":80}',
    ]
    assert fired(engine, event(2, ports=[])) == []  # no element, no group
    assert engine.stats()[rule.id].groups == 2


def test_group_keys_fan_out_as_a_product() -> None:
    keys = group_keys(("ports", "blockers"), {"ports": [1, 2], "blockers": ["a", "b"]})
    assert sorted(keys) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert group_keys((), {"ports": [1]}) == [()]
    assert group_keys(("ports",), {"ports": [[1], [1]]}) == [("[1]",)]


def test_two_groups_never_share_a_dedup_key(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 1}", ["agent_id", "peer_addr"])
    engine = Engine([rule])
    pairs = [("a", "b,c"), ("a,b", "c"), ("a", None), ("a", "None"), ("1", "x"), (1, "x"), ('a"', "b")]
    matches = engine.process([event(t, agent_id=a, peer_addr=p) for t, (a, p) in enumerate(pairs)])
    keys = [m.dedup_key for m in matches]
    assert len(keys) == len(pairs) == len(set(keys))
    assert [tuple(json.loads(k).values()) for k in keys] == pairs


# ---- bounded memory ------------------------------------------------------------------------------


def test_groups_beyond_max_groups_evict_the_least_recently_updated(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 2}", ["agent_id"], timespan="1h")
    engine = Engine([rule], max_groups=3)
    assert engine.process([event(0, agent_id="a"), event(1, agent_id="b"), event(2, agent_id="c")]) == []
    assert len(engine.process([event(3, agent_id="a")])) == 1  # a is now the most recently updated
    engine.process([event(4, agent_id="d"), event(5, agent_id="e")])  # evicts b, then c
    stats = engine.stats()[rule.id]
    assert (stats.groups, stats.evicted) == (3, 2)
    assert len(engine.process([event(6, agent_id="a")])) == 1  # a kept its count
    assert engine.process([event(7, agent_id="b")]) == []  # b starts over (and evicts d)
    assert engine.stats()[rule.id].evicted == 3


def test_values_per_group_are_capped(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "value_count", "{gte: 6, field: ports}", ["agent_id"], timespan="1h")
    engine = Engine([rule], max_values=5)
    assert engine.process([event(t, ports=[t]) for t in range(20)]) == []
    spec = rule.correlation
    assert spec is not None
    window = Window(spec, max_groups=10, max_values=5)
    for t in range(100):
        window.add(event(t, ports=[t]), (0,))
    assert len(window.groups[("a1",)].state) == 5


def test_event_count_timestamps_are_capped_too() -> None:
    spec = CorrelationSpec("event_count", ("x",), ("agent_id",), 3_600_000, "gte", 1)
    window = Window(spec, max_groups=10, max_values=50)
    for t in range(1000):
        window.add(event(t), (0,))
    assert len(window.groups[("a1",)].state) == 50


def test_groups_whose_window_passed_are_dropped_as_time_advances() -> None:
    spec = CorrelationSpec("event_count", ("x",), ("agent_id",), 10_000, "gte", 100)
    window = Window(spec, max_groups=1000, max_values=100)
    for agent in range(100):
        window.add(event(0, agent_id=f"a{agent}"), (0,))
    window.add(event(60, agent_id="late"), (0,))
    assert list(window.groups) == [("late",)] and window.expired == 100 and window.evicted == 0


def test_a_late_event_older_than_its_group_s_window_is_ignored() -> None:
    spec = CorrelationSpec("event_count", ("x",), ("agent_id",), 10_000, "gte", 2)
    window = Window(spec, max_groups=10, max_values=100)
    assert window.add(event(100), (0,)) == []
    assert window.add(event(50), (0,)) == []  # 50 s before the group's newest event: too late
    assert window.add(event(95), (0,)) != []  # within 10 s of 100: counts, even out of order


def test_evidence_keeps_the_last_events_newest_last(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 1}", ["agent_id"], timespan="1h")])
    matches = engine.process([event(t, seq=t) for t in range(EVIDENCE + 5)])
    assert [e["seq"] for e in matches[-1].events] == list(range(5, EVIDENCE + 5))
    assert len(matches[0].events) == 1


# ---- reload ----------------------------------------------------------------------------------------


def test_reload_keeps_the_window_of_an_unchanged_correlation(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"])
    engine = Engine([rule])
    engine.process([event(0), event(1)])
    same = correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"], number=1, name="corr")
    engine.reload([same])
    (match,) = engine.process([event(2)])
    assert match.rule is same
    assert engine.stats()[rule.id].events == 3 and engine.stats()[rule.id].matches == 1


def test_reload_with_a_new_threshold_keeps_the_state_and_judges_with_the_new_one(tmp_path: Path) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 5}", ["agent_id"])])
    engine.process([event(0), event(1)])
    engine.reload([correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"])])
    assert len(engine.process([event(2)])) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"group_by": ["agent_id", "peer_addr"]},
        {"timespan": "20s"},
        {"detections": {"hit": ("access", "sel: {direction: [inbound, outbound]}\ncondition: sel")}},
    ],
)
def test_reload_with_another_definition_starts_afresh(tmp_path: Path, change: dict[str, Any]) -> None:
    engine = Engine([correlation(tmp_path, "event_count", "{gte: 3}", ["agent_id"])])
    engine.process([event(0), event(1)])
    arguments: dict[str, Any] = {"group_by": ["agent_id"], **change}
    engine.reload([correlation(tmp_path, "event_count", "{gte: 3}", name="corr2", **arguments)])
    assert engine.process([event(2)]) == []


def test_reload_drops_removed_rules_and_adds_new_ones(tmp_path: Path) -> None:
    first = correlation(tmp_path, "event_count", "{gte: 1}", ["agent_id"], number=1)
    second = correlation(tmp_path, "event_count", "{gte: 1}", ["agent_id"], name="other", number=2)
    engine = Engine([first])
    engine.process([event(0)])
    engine.reload([second])
    assert list(engine.stats()) == [second.id]
    assert [m.rule.id for m in engine.process([event(1)])] == [second.id]


def test_two_rules_with_one_id_are_refused(tmp_path: Path) -> None:
    rule = correlation(tmp_path, "event_count", "{gte: 1}", ["agent_id"])
    with pytest.raises(ValueError, match="two rules"):
        Engine([rule, rule])

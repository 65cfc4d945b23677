"""Migration state from evidence: every state, the quiet period, regression, exemptions, rechecks."""

from __future__ import annotations

import ipaddress

from collector.migration import DAY_MS, NEVER, Catalog, Evidence, Exemption, MigrationPolicy, ZoneNets, decide

NOW = 1_800_000_000_000
POLICY = MigrationPolicy(quiet_ms=7 * DAY_MS, stale_ms=DAY_MS)
FIRST_SEEN = NOW - 30 * DAY_MS


def state(
    dedicated: Evidence,
    extranet: Evidence | None = None,
    previous: str | None = None,
    *,
    first_seen: int = FIRST_SEEN,
    last_seen: int = NOW - 5_000,
    exemption: Exemption | None = None,
) -> tuple[str, int]:
    d = decide(
        now_ms=NOW,
        policy=POLICY,
        previous=previous,
        first_seen_ms=first_seen,
        last_seen_ms=last_seen,
        dedicated=dedicated,
        extranet=extranet or Evidence(),
        exemption=exemption,
    )
    return d.state, d.recheck_ms


ON_DEDICATED = Evidence(addresses=["eth1 10.250.2.5/24"])
ON_EXTRANET = Evidence(addresses=["eth0 10.250.1.5/24"])


def test_dedicated_only_is_not_started_and_both_is_dual_homed() -> None:
    assert state(ON_DEDICATED)[0] == "not_started"
    assert state(ON_DEDICATED, ON_EXTRANET)[0] == "dual_homed"
    # A route or recent bytes count as much as an address.
    assert state(Evidence(routes=["10.250.2.0/24 via 10.250.1.1"]), ON_EXTRANET)[0] == "dual_homed"
    assert state(Evidence(last_traffic_ms=NOW - DAY_MS), ON_EXTRANET)[0] == "dual_homed"


def test_quiet_for_the_whole_period_is_migrated_and_not_before() -> None:
    quiet = Evidence(last_traffic_ms=NOW - 8 * DAY_MS, last_removed_ms=NOW - 9 * DAY_MS)
    assert state(quiet, ON_EXTRANET, "dual_homed")[0] == "migrated"
    leaving = Evidence(last_removed_ms=NOW - 2 * DAY_MS)  # the address went two days ago
    assert state(leaving, ON_EXTRANET, "dual_homed")[0] == "dual_homed"
    # Looked at again when the agent would count as silent, or when the quiet period ends.
    assert state(leaving, ON_EXTRANET, "dual_homed", last_seen=NOW)[1] == NOW + DAY_MS
    long_ago = Evidence(last_removed_ms=NOW - 6 * DAY_MS - 3_600_000)
    assert state(long_ago, ON_EXTRANET, "dual_homed", last_seen=NOW)[1] == NOW + 23 * 3_600_000
    # Never on the dedicated network, but watched only for a day: not yet known to be migrated.
    assert state(Evidence(), ON_EXTRANET, first_seen=NOW - DAY_MS)[0] == "unknown"
    new_host = state(Evidence(), ON_EXTRANET, first_seen=NOW - 6 * DAY_MS - 3_600_000, last_seen=NOW)
    assert new_host == ("unknown", NOW + 23 * 3_600_000)  # looked at again when its period ends
    assert state(Evidence(), ON_EXTRANET)[0] == "migrated"


def test_dedicated_traffic_after_migrating_is_a_regression_until_quiet_again() -> None:
    back = Evidence(last_traffic_ms=NOW - 60_000)
    assert state(back, ON_EXTRANET, "migrated")[0] == "regressed"
    assert state(Evidence(last_traffic_ms=NOW - 3 * DAY_MS), ON_EXTRANET, "regressed")[0] == "regressed"
    assert state(Evidence(last_traffic_ms=NOW - 8 * DAY_MS), ON_EXTRANET, "regressed")[0] == "migrated"


def test_an_exemption_wins_until_it_expires_and_a_silent_agent_is_unknown() -> None:
    exemption = Exemption(1, "legacy billing", "张三", "OA-2026-118", NOW + DAY_MS)
    assert state(ON_DEDICATED, exemption=exemption) == ("exempt", NOW + DAY_MS)
    expired = exemption._replace(until_ms=NOW - 1)
    assert state(ON_DEDICATED, exemption=expired)[0] == "not_started"
    assert state(ON_DEDICATED, last_seen=NOW - 2 * DAY_MS) == ("unknown", NEVER)


def test_rechecks_come_when_a_deadline_is_due() -> None:
    # Traffic-only evidence: look again when it will have been quiet for a whole period.
    _, recheck = state(Evidence(last_traffic_ms=NOW - DAY_MS), ON_EXTRANET)
    assert recheck == min(NOW - 5_000 + DAY_MS, NOW - DAY_MS + 7 * DAY_MS)
    # An address present: nothing changes without news, except the agent going silent.
    assert state(ON_DEDICATED, ON_EXTRANET)[1] == NOW - 5_000 + DAY_MS


def test_the_catalog_finds_zones_of_addresses_and_routes_by_longest_prefix() -> None:
    def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c) for c in cidrs)

    cat = Catalog(
        [
            ZoneNets("外网", "extranet", "", nets("10.250.1.0/24", "fd00:250:1::/64")),
            ZoneNets("公安专网", "dedicated", "市公安局", nets("10.250.0.0/16")),
            ZoneNets("公安数据中心", "dedicated", "市公安局", nets("10.250.2.0/26")),
        ]
    )
    assert cat.zone_of("10.250.2.5/24") == "公安数据中心"
    assert cat.zone_of("10.250.9.9") == "公安专网"
    assert cat.zone_of("10.250.1.7/24") == "外网" and cat.zone_of("fd00:250:1::7/64") == "外网"
    assert cat.zone_of("192.0.2.1") == "" and cat.zone_of("not an address") == ""
    # A default route is towards its gateway's zone only; a specific route towards what it overlaps.
    assert cat.route_zones("0.0.0.0/0", "10.250.1.1") == {"外网"}
    assert cat.route_zones("10.250.2.0/24", "") == {"公安专网"}
    assert cat.route_zones("10.250.2.0/28", "") == {"公安专网", "公安数据中心"}
    # A summary route, or a VPN's half default, says nothing of one network inside it.
    assert cat.route_zones("10.0.0.0/8", "10.250.1.1") == {"外网"}
    assert cat.route_zones("0.0.0.0/1", "") == set()
    assert cat.route_zones("::/0", "") == set()
    assert [z.name for z in cat.dedicated()] == ["公安专网", "公安数据中心"]

"""Dedicated-network migration: the state of one host towards one dedicated network, from evidence.

Pure logic, no SQL (store/migration.py gathers the evidence and keeps states, transitions and
exemptions). For a host H and a dedicated network N (a catalog zone of kind ``dedicated``):

- *dedicated evidence*: H has an address in N, a route towards N (a destination overlapping N,
  or any route whose gateway is in N: a default route via N's router counts), or exchanged
  bytes with N. Its time is now while an address or route is present, else the latest of the
  last byte exchanged and the moment the last address or route went away.
- *extranet evidence*: the same towards any extranet zone, within the quiet period.

States, in the order they are decided:

- ``exempt``: an approved exception is in force (reason, approver, reference, expiry).
- ``unknown``: the agent has not reported for ``stale_ms``: no recent data.
- ``regressed``: dedicated evidence within the quiet period after the host was ``migrated``
  (it stays regressed until it is quiet again for a whole period).
- ``dual_homed`` / ``not_started``: dedicated evidence within the quiet period, with / without
  extranet evidence.
- ``migrated``: no dedicated evidence for the quiet period (default 7 days), and the agent has
  been watched at least that long.
- otherwise (quiet, but not yet for a whole period): the previous state holds; a host seen for
  the first time is ``unknown`` until its quiet period has passed.

Every decision also says when it should be looked at again without new data (``recheck_ms``:
the quiet period ending, an exemption expiring, the agent going stale), so the collector only
re-evaluates hosts with news or with a deadline due.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

STATES = ("not_started", "dual_homed", "migrated", "regressed", "exempt", "unknown")
DAY_MS = 86_400_000
NEVER = 2**62

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MigrationPolicy:
    # No dedicated address, route or traffic for this long: migrated.
    quiet_ms: int = 7 * DAY_MS
    # No report from the agent for this long: unknown.
    stale_ms: int = DAY_MS


class ZoneNets(NamedTuple):
    name: str
    kind: str
    department: str
    networks: tuple[Network, ...]


class Catalog:
    """The zones as the database records them, with a longest-prefix lookup for addresses."""

    def __init__(self, zones: Iterable[ZoneNets]) -> None:
        self.zones = {z.name: z for z in zones}
        self._by_prefix = sorted(
            ((net, z.name) for z in self.zones.values() for net in z.networks),
            key=lambda item: -item[0].prefixlen,
        )

    def dedicated(self) -> list[ZoneNets]:
        return [z for z in self.zones.values() if z.kind == "dedicated"]

    def extranet_names(self) -> set[str]:
        return {z.name for z in self.zones.values() if z.kind == "extranet"}

    def zone_of(self, address: str) -> str:
        """The zone of an address (or of an interface address "10.1.2.3/24"); "" when none."""
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            return ""
        for net, name in self._by_prefix:
            if ip.version == net.version and ip in net:
                return name
        return ""

    def route_zones(self, destination: str, gateway: str) -> set[str]:
        """The zones a route leads towards: those that contain its destination, and the zone of
        its gateway. A broader route (a summary such as 10.0.0.0/8, a default, a VPN's 0.0.0.0/1)
        says nothing of one network inside it, only of where it goes: its gateway."""
        zones: set[str] = set()
        if gateway:
            zones.add(self.zone_of(gateway))
        try:
            dest = ipaddress.ip_network(destination, strict=False)
        except ValueError:
            return zones - {""}
        if dest.prefixlen:
            for net, name in self._by_prefix:
                if net.version == dest.version and dest.subnet_of(net):  # type: ignore[arg-type]
                    zones.add(name)
        return zones - {""}


class Route(NamedTuple):
    destination: str
    gateway: str
    interface: str
    table: int
    policy: str


@dataclass
class Evidence:
    """What one host shows of one network (or of the extranet) now."""

    addresses: list[str] = field(default_factory=list)  # "eth1 10.250.2.5/24"
    routes: list[str] = field(default_factory=list)  # "10.250.2.0/24 via 10.250.1.1 dev eth0 table 100"
    last_traffic_ms: int = 0
    bytes: int = 0
    # When the last address or route towards it went away (0: never seen go).
    last_removed_ms: int = 0

    def present(self) -> bool:
        return bool(self.addresses or self.routes)

    def last_ms(self, now_ms: int) -> int:
        """The time of the latest evidence: now while an address or route is there."""
        return now_ms if self.present() else max(self.last_traffic_ms, self.last_removed_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "addresses": self.addresses,
            "routes": self.routes,
            "last_traffic_ms": self.last_traffic_ms or None,
            "bytes": self.bytes,
            "last_removed_ms": self.last_removed_ms or None,
        }


class Exemption(NamedTuple):
    id: int
    reason: str
    approved_by: str
    reference: str
    until_ms: int


class Decision(NamedTuple):
    state: str
    evidence: dict[str, Any]
    recheck_ms: int  # look again at this time even without news (NEVER: only on news)


def decide(
    *,
    now_ms: int,
    policy: MigrationPolicy,
    previous: str | None,
    first_seen_ms: int,
    last_seen_ms: int,
    dedicated: Evidence,
    extranet: Evidence,
    exemption: Exemption | None,
    blockers: Sequence[dict[str, Any]] = (),
) -> Decision:
    """The state of one host towards one dedicated network now, with its evidence."""
    quiet = policy.quiet_ms
    last_dedicated = dedicated.last_ms(now_ms)
    dedicated_active = last_dedicated > 0 and now_ms - last_dedicated < quiet
    last_extranet = extranet.last_ms(now_ms)
    extranet_active = last_extranet > 0 and now_ms - last_extranet < quiet
    quiet_since = max(last_dedicated, first_seen_ms)
    evidence: dict[str, Any] = {
        "dedicated": dedicated.as_dict(),
        "extranet": extranet.as_dict(),
        "blockers": list(blockers),
        "quiet_for_ms": None if dedicated_active else now_ms - quiet_since,
        "quiet_period_ms": quiet,
        "last_report_ms": last_seen_ms,
    }
    stale_at = last_seen_ms + policy.stale_ms
    if exemption is not None and exemption.until_ms > now_ms:
        evidence["exemption"] = exemption._asdict()
        return Decision("exempt", evidence, min(exemption.until_ms, NEVER))
    if now_ms >= stale_at:
        return Decision("unknown", evidence, NEVER)  # news (a report) brings it back
    if dedicated_active:
        # It can only become quiet from the last evidence on; sooner if the agent goes silent.
        recheck = min(stale_at, last_dedicated + quiet if not dedicated.present() else NEVER)
        if previous in ("migrated", "regressed"):
            return Decision("regressed", evidence, recheck)
        recheck = min(recheck, last_extranet + quiet if extranet_active and not extranet.present() else NEVER)
        return Decision("dual_homed" if extranet_active else "not_started", evidence, recheck)
    if now_ms - quiet_since >= quiet:
        return Decision("migrated", evidence, stale_at)
    held = previous if previous in ("dual_homed", "not_started", "regressed") else "unknown"
    return Decision(held, evidence, min(stale_at, quiet_since + quiet))

"""Tiers, the upstream side: what a lower-tier collector is sent with its policy.

A client enrolled with the role "collector" gets, beside the agents' policy, the rule files in force here
and the zone catalog as YAML: this tier's *effective* pack and catalog (its own plus what came from its own
upstream, tiers_policy.py), so the province's rules reach the county through the city. Its policy version
includes the pack, so a changed rule file makes the forwarder below fetch again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from collector.errors import CollectorError
from collector.tiers_policy import RULE_SUFFIXES, TierConflict, load_tiered_rules, read_text
from collector.zones import ZoneCatalog

log = logging.getLogger(__name__)

# The enrolled role label of a lower-tier collector: it gets the rule pack and the catalog.
COLLECTOR_ROLE = "collector"


def catalog_yaml(catalog: ZoneCatalog) -> str:
    """The catalog as a zones.yaml a lower tier loads back to the same version."""
    zones = []
    for zone in catalog.zones:
        item: dict[str, object] = {"name": zone.name, "kind": zone.kind}
        if zone.direction:
            item["direction"] = zone.direction
        if zone.department:
            item["department"] = zone.department
        item["cidrs"] = [str(net) for net in zone.networks]
        if zone.capacity_bps:
            item["capacity"] = zone.capacity_bps
        if zone.admin:
            item["admin"] = True
        zones.append(item)
    data: dict[str, object] = {"zones": zones}
    if catalog.access:
        data["access"] = {role: list(targets) for role, targets in catalog.access.items()}
    header = "# The upstream collector's zone catalog (its own and its upstream's), sent with its policy.\n"
    return header + yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)


class RulePack:
    """The rule files in force here as (file name, text), for lower tiers, and a digest of them.

    Looked at again at most every ``max_age_s`` (a stat of the two directories), reloaded only when a file
    changed; a file that stops loading keeps its previous text, like the rules in force (detection.py).
    """

    def __init__(
        self,
        local_dir: Path | None,
        upstream_dir: Path | None,
        *,
        max_age_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dirs = (local_dir, upstream_dir)
        self._max_age_s = max_age_s
        self._monotonic = monotonic
        self._checked = float("-inf")
        self._stamp: tuple[object, ...] | None = None
        self._by_path: dict[str, tuple[str, str, str, str]] = {}  # path -> (file name, text, id, name)
        self.files: tuple[tuple[str, str], ...] = ()
        self.digest = ""

    def version(self, agent_version: str) -> str:
        """The policy version a lower tier sees: the agents' one and the pack's, hashed together."""
        self.refresh()
        return hashlib.sha256(f"{agent_version}:{self.digest}".encode()).hexdigest()[:16]

    def refresh(self) -> None:
        now = self._monotonic()
        if now - self._checked < self._max_age_s:
            return
        self._checked = now
        stamp = _stamp(d for d in (self._dirs[0], self._dirs[1]) if d is not None)
        if stamp != self._stamp:
            self._stamp = stamp if self._load() else None  # a file changed while read: again next time

    def _load(self) -> bool:
        local, upstream = self._dirs
        try:
            rules, errors = load_tiered_rules(local, upstream)
        except CollectorError as exc:  # the rules directory is gone: said once, kept until it changes
            log.warning("rule pack for lower tiers not rebuilt, the previous one stays: %s", exc)
            return True
        steady = True
        by_path: dict[str, tuple[str, str, str, str]] = {}
        for rule in rules:
            text = read_text(rule.path)
            if text is None or hashlib.sha256(text.encode()).hexdigest() != rule.digest:
                steady = False
                previous = self._by_path.get(str(rule.path))
                if previous is not None:
                    by_path[str(rule.path)] = previous
                continue
            by_path[str(rule.path)] = (rule.path.name, text, rule.id, rule.name)
        files = {entry[0] for entry in by_path.values()}
        ids = {entry[2] for entry in by_path.values()}
        names = {entry[3] for entry in by_path.values()}
        for error in errors:
            previous = self._by_path.get(error.path)
            if (
                previous is not None
                and not isinstance(error, TierConflict)
                and error.path not in by_path
                and previous[0] not in files
                and previous[2] not in ids
                and previous[3] not in names
            ):
                by_path[error.path] = previous
        self._by_path = by_path
        self.files = tuple(sorted((name, text) for name, text, _id, _name in by_path.values()))
        canonical = "\0".join(f"{name}\0{text}" for name, text in self.files)
        self.digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return steady


def _stamp(directories: Iterable[Path]) -> tuple[object, ...]:
    """Name, size and mtime of every rule file of the directories: a change to any means a reload."""
    entries: list[tuple[str, str, int, int]] = []
    for directory in directories:
        try:
            for entry in os.scandir(directory):
                if entry.name.endswith(RULE_SUFFIXES):
                    st = entry.stat()
                    entries.append((str(directory), entry.name, st.st_size, st.st_mtime_ns))
        except OSError:
            entries.append((str(directory), "", -1, -1))
    return tuple(sorted(entries))

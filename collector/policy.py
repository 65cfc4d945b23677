"""The policy the collector serves to agents, versioned by the hash of its content.

The zone catalog is part of it. It can be reloaded while the collector runs
(SIGHUP or a change of the file): a catalog that does not load is refused with
its file:line error and the one in force stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from collector.zones import CatalogError, ZoneCatalog, load_catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentPolicy:
    sample_interval_s: int = 10
    # Empty: every interface except loopback.
    interfaces: tuple[str, ...] = ()
    batch_max_facts: int = 500
    policy_refresh_s: int = 60
    # The version of the zone catalog served with this policy; "" when there is none.
    zones_version: str = ""

    @property
    def version(self) -> str:
        """A short content hash: equal policies have equal versions on every collector."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


class PolicySource:
    """The policy in force and its zone catalog; the servicer asks it on every GetPolicy."""

    def __init__(self, settings: AgentPolicy, catalog_path: Path | None = None) -> None:
        self._settings = settings
        self._path = catalog_path
        self._stamp: tuple[int, int] | None = None
        self.catalog: ZoneCatalog | None = None
        self.policy = settings
        if catalog_path is not None:
            self._load()  # at start a bad catalog is fatal: CatalogError reaches the CLI

    def _load(self) -> None:
        assert self._path is not None
        stamp = _stamp(self._path)
        catalog = load_catalog(self._path)
        self.catalog, self._stamp = catalog, stamp
        self.policy = replace(self._settings, zones_version=catalog.version)

    def reload(self) -> bool:
        """Load the catalog again; True if the policy changed. A bad file keeps the old one."""
        if self._path is None:
            return False
        before = self.policy.version
        try:
            self._load()
        except CatalogError as exc:
            self._stamp = _stamp(self._path)  # do not retry the same broken file every poll
            log.error("zone catalog not reloaded, the previous one stays in force: %s", exc)
            return False
        changed = self.policy.version != before
        if changed:
            log.info("zone catalog %s loaded: policy %s", self.policy.zones_version, self.policy.version)
        return changed

    def reload_if_changed(self) -> bool:
        """Reload when the file's mtime or size changed since the last load."""
        if self._path is None or _stamp(self._path) == self._stamp:
            return False
        return self.reload()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size

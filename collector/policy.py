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
from functools import cached_property
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

    @cached_property  # frozen, and asked for on every ack: hashed once (bench/fleet.py: 40 µs an ack)
    def version(self) -> str:
        """A short content hash: equal policies have equal versions on every collector."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


class PolicySource:
    """The policy in force and its zone catalog; the servicer asks it on every GetPolicy.

    On a lower tier the catalog is the upstream's (``upstream_catalog_path``, stored by tiers_policy.py)
    plus the local file's additions; either file may be missing. A local file that does not load keeps
    the previous local catalog, an upstream one the previous upstream catalog: each part independently.
    """

    def __init__(
        self,
        settings: AgentPolicy,
        catalog_path: Path | None = None,
        upstream_catalog_path: Path | None = None,
    ) -> None:
        self._settings = settings
        self._path = catalog_path
        self._upstream_path = upstream_catalog_path
        self._stamp: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
        self._local: ZoneCatalog | None = None
        self._upstream: ZoneCatalog | None = None
        self.catalog: ZoneCatalog | None = None
        self.policy = settings
        if catalog_path is not None or upstream_catalog_path is not None:
            error = self._load()
            if error is not None:
                raise error  # at start a bad catalog is fatal: CatalogError reaches the CLI

    def _stamps(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        return (
            _stamp(self._path) if self._path is not None else None,
            _stamp(self._upstream_path) if self._upstream_path is not None else None,
        )

    def _load(self) -> CatalogError | None:
        """Load both files and merge them; the local file's error, if it does not load."""
        stamp = self._stamps()
        upstream = self._upstream
        if self._upstream_path is not None:
            if stamp[1] is None:
                upstream = None  # none came down yet, or the upstream sends none
            else:
                try:
                    upstream = load_catalog(self._upstream_path)
                except CatalogError as exc:
                    log.error("upstream zone catalog not loaded, the previous one stays in force: %s", exc)
        local, error = self._local, None
        if self._path is not None:
            try:
                local = load_catalog(self._path, [z.name for z in upstream.zones] if upstream else ())
            except CatalogError as exc:
                error = exc
        self._upstream, self._local, self._stamp = upstream, local, stamp
        catalog = local
        if upstream is not None:
            # Imported here: the rule loader behind it is heavy, and only a lower tier needs it.
            from collector.tiers_policy import merge_catalogs

            catalog, refused = merge_catalogs(upstream, local, str(self._path))
            for reason in refused:
                log.error("%s", reason)
        self.catalog = catalog
        self.policy = replace(self._settings, zones_version=catalog.version if catalog is not None else "")
        return error

    def reload(self) -> bool:
        """Load the catalog again; True if the policy changed. A bad file keeps the old one."""
        if self._path is None and self._upstream_path is None:
            return False
        before = self.policy.version
        error = self._load()
        if error is not None:
            log.error("zone catalog not reloaded, the previous one stays in force: %s", error)
        changed = self.policy.version != before
        if changed:
            log.info("zone catalog %s loaded: policy %s", self.policy.zones_version, self.policy.version)
        return changed

    def reload_if_changed(self) -> bool:
        """Reload when a file's mtime or size changed since the last load."""
        if (self._path is None and self._upstream_path is None) or self._stamps() == self._stamp:
            return False
        return self.reload()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size

"""Tiers, the downward path: the upstream's rule pack and zone catalog, kept on disk and merged with ours.

A lower tier (a county under its city, a city under its province) runs what its upstream sends with the
policy (Policy.rule_pack, Policy.catalog_yaml) plus its own additions, and may never remove or weaken what
came from above: a local rule that would replace an upstream rule (same id, name or file name) is refused,
and so is a local zone that would redefine or shadow an upstream zone. The upstream's files live in the
lower tier's state directory (``policy/rules/*.yml``, ``policy/zones.yaml``) so they survive restarts;
until the first upstream policy arrives the lower tier runs on its own files alone.

Files are only written once they load: an upstream file that does not keeps the previous version, on disk
and in force. What the upstream side sends is tiers_pack.py's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from pathlib import Path

from collector.errors import CollectorError
from collector.rules import RuleError
from collector.rules.load import Rule, load_rule_file, load_rules
from collector.zones import ZONE_KINDS, CatalogError, Network, Zone, ZoneCatalog, parse_catalog

log = logging.getLogger(__name__)

RULE_SUFFIXES = (".yml", ".yaml")
MAX_RULE_NAME_BYTES = 200


def policy_dir(state_dir: Path) -> Path:
    """Where a lower tier keeps its upstream's files (CollectorConfig.upstream_dir), in the forwarder's
    state directory (``upstream/`` beside the database by default, hence not a second "upstream")."""
    return state_dir / "policy"


def upstream_rules_dir(upstream_dir: Path) -> Path:
    return upstream_dir / "rules"


def upstream_catalog_path(upstream_dir: Path) -> Path:
    return upstream_dir / "zones.yaml"


def check_rule_file_name(name: str) -> str:
    """A rule file name from the upstream: a plain *.yml/*.yaml name, never a path (or it could write
    anywhere); raises CollectorError saying why not."""
    if not name or name != name.strip() or "/" in name or "\\" in name or "\0" in name:
        raise CollectorError(f"rule file name {name!r} is not a plain file name")
    if name.startswith("."):
        raise CollectorError(f"rule file name {name!r} is hidden (starts with a dot)")
    if not name.endswith(RULE_SUFFIXES) or name in RULE_SUFFIXES:
        raise CollectorError(f"rule file name {name!r} does not end in .yml or .yaml")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_RULE_NAME_BYTES:
        raise CollectorError(f"rule file name {name[:40]!r}... is longer than {MAX_RULE_NAME_BYTES} bytes")
    return name


# --- the lower side: storing what came down ---------------------------------------------------------


def store_upstream_policy(state_dir: Path, rule_files: list[tuple[str, str]], catalog_yaml: str) -> bool:
    """Write the upstream's rule files and catalog under ``policy_dir(state_dir)``; True if anything changed.

    Each file is written atomically (temporary file, fsync, rename) and only when it loads: a broken one is
    logged and its previous version stays. Rule files the upstream no longer sends are removed; an empty
    catalog removes ours (the upstream has none). Blocking: a few ms per changed rule file (pySigma).
    """
    try:
        return _store_policy(state_dir, rule_files, catalog_yaml)
    except OSError as exc:
        # rename, unlink, listing, fsync: the forwarder's policy loop logs this one line and asks again.
        where = exc.filename or policy_dir(state_dir)
        raise CollectorError(f"cannot store the upstream policy at {where}: {exc.strerror or exc}") from exc


def _store_policy(state_dir: Path, rule_files: list[tuple[str, str]], catalog_yaml: str) -> bool:
    directory = policy_dir(state_dir)
    rules = upstream_rules_dir(directory)
    try:
        rules.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CollectorError(f"cannot create {rules}: {exc.strerror or exc}") from exc
    wanted: dict[str, str] = {}
    for name, text in rule_files:
        try:
            check_rule_file_name(name)
        except CollectorError as exc:
            log.error("upstream rule file refused: %s", exc)
            continue
        if name in wanted:
            log.error("upstream rule file %s is sent twice: the first is kept", name)
            continue
        wanted[name] = text
    changed = False
    for name, text in wanted.items():
        changed |= _store_rule_file(rules / name, text)
    for entry in sorted(rules.iterdir()):
        stale = entry.name.endswith(RULE_SUFFIXES) and entry.name not in wanted
        if stale or entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            if stale:
                log.info("upstream rule file %s removed: the upstream no longer sends it", entry.name)
                changed = True
    changed |= _store_catalog(upstream_catalog_path(directory), catalog_yaml)
    if changed:
        _fsync_dir(rules)
        _fsync_dir(directory)
    return changed


def _store_rule_file(path: Path, text: str) -> bool:
    if read_text(path) == text:
        return False
    temporary = path.with_name(f".{path.name}.tmp")  # not *.yml: never loaded half-written
    _write(temporary, text)
    try:
        load_rule_file(temporary)
    except RuleError as exc:
        temporary.unlink()
        log.error(
            "upstream rule file %s:%d: %s; its previous version, if any, stays in force",
            path,
            exc.line,
            exc.message,
        )
        return False
    os.replace(temporary, path)
    log.info("upstream rule file %s stored", path.name)
    return True


def _store_catalog(path: Path, text: str) -> bool:
    if not text.strip():
        if path.exists():
            path.unlink()
            log.info("upstream zone catalog removed: the upstream sends none")
            return True
        return False
    if read_text(path) == text:
        return False
    try:
        parse_catalog(text, str(path))
    except CatalogError as exc:
        log.error("upstream zone catalog refused, the previous one stays in force: %s", exc)
        return False
    temporary = path.with_name(f".{path.name}.tmp")
    _write(temporary, text)
    os.replace(temporary, path)
    log.info("upstream zone catalog stored")
    return True


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _write(path: Path, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise CollectorError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the merged view: upstream first, local additions after --------------------------------------------


def merge_catalogs(
    upstream: ZoneCatalog, local: ZoneCatalog | None, local_path: str
) -> tuple[ZoneCatalog, list[str]]:
    """The upstream's zones and access plus the local file's additions; and why each refused one was.

    Refused: a local zone named like an upstream zone, one listing a CIDR an upstream zone lists (it would
    take those addresses), and a non-classified zone inside an upstream classified zone (it would make
    part of it reachable). A more specific local zone elsewhere is an addition, which longest-prefix
    matching resolves. A local ``access`` entry may add a role the upstream does not list, within what the
    upstream's ``"*"`` entry allows.
    """
    if local is None:
        return upstream, []
    refused: list[str] = []
    owners = {net: zone for zone in upstream.zones for net in zone.networks}
    classified = [
        (net, zone) for zone in upstream.zones if zone.kind == "classified" for net in zone.networks
    ]
    zones = list(upstream.zones)
    for zone in local.zones:
        why = _zone_conflict(zone, upstream, owners, classified)
        if why:
            refused.append(
                f"{local_path}:{zone.line}: zone {zone.name!r} refused, the upstream's stays: {why}"
            )
        else:
            zones.append(zone)
    kinds = {zone.name: zone.kind for zone in zones}
    access = dict(upstream.access)
    star = upstream.access.get("*")
    for role, targets in local.access.items():
        why = _access_conflict(role, targets, upstream.access, star, kinds)
        if why:
            refused.append(f"{local_path}: access for role {role!r} refused: {why}")
        else:
            access[role] = targets
    return ZoneCatalog(zones, access), refused


def _zone_conflict(
    zone: Zone,
    upstream: ZoneCatalog,
    owners: dict[Network, Zone],
    classified: list[tuple[Network, Zone]],
) -> str:
    if upstream.by_name(zone.name) is not None:
        return "an upstream zone has this name; a lower tier may add zones, not redefine them"
    for net in zone.networks:
        owner = owners.get(net)
        if owner is not None:
            return f"{net} belongs to upstream zone {owner.name!r}; add a more specific CIDR instead"
        if zone.kind == "classified":
            continue
        for outer, secret in classified:
            if _inside(net, outer):
                return (
                    f"{net} lies inside upstream classified zone {secret.name!r}: only a classified zone may"
                )
    return ""


def _inside(inner: Network, outer: Network) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _access_conflict(
    role: str,
    targets: tuple[str, ...],
    upstream: dict[str, tuple[str, ...]],
    star: tuple[str, ...] | None,
    kinds: dict[str, str],
) -> str:
    if role in upstream:
        return "the upstream's catalog sets it; a lower tier may not change it"
    for target in targets:
        if target not in kinds and target not in ZONE_KINDS:
            return f"{target!r} is no zone of the merged catalog (refused, or gone upstream)"
        if star is not None and target not in star and kinds.get(target) not in star:
            return f"{target!r} is beyond what the upstream allows every role ('*')"
    return ""


class TierConflict(RuleError):
    """A local rule refused because it would replace an upstream one: unlike a broken file, its previous
    version does not stay in force either (the upstream's must)."""


def load_tiered_rules(
    local_dir: Path | None, upstream_dir: Path | None
) -> tuple[list[Rule], list[RuleError]]:
    """The upstream's rules, then the local ones that replace none of them; and the errors.

    ``upstream_dir`` is the upstream's rules directory (``upstream_rules_dir``); missing until the first
    policy came down. A local rule with an upstream rule's id, name or file name is a TierConflict.
    """
    rules: list[Rule] = []
    errors: list[RuleError] = []
    upstream_files: set[str] = set()
    if upstream_dir is not None and upstream_dir.is_dir():
        rules, errors = load_rules(upstream_dir)
        upstream_files = {p.name for p in upstream_dir.iterdir() if p.name.endswith(RULE_SUFFIXES)}
    if local_dir is None:
        return rules, errors
    local, local_errors = load_rules(local_dir)
    ids = {rule.id: rule for rule in rules}
    names = {rule.name: rule for rule in rules}
    for error in local_errors:
        if Path(error.path).name in upstream_files:
            error = TierConflict(
                error.path, error.line, f"{error.message} (and an upstream rule file has its name)"
            )
        errors.append(error)
    for rule in local:
        why = ""
        line = 1
        if rule.path.name in upstream_files and _same_file(rule.path, upstream_dir):
            continue  # the same default pack on both tiers: nothing is replaced, nothing to say
        if rule.path.name in upstream_files:
            why = "an upstream rule file has this name"
        elif rule.id in ids:
            why, line = (
                f"id {rule.id} belongs to upstream rule {ids[rule.id].name!r}",
                rule.lines.get("id", 1),
            )
        elif rule.name in names:
            why, line = f"name {rule.name!r} belongs to an upstream rule", rule.lines.get("name", 1)
        if why:
            message = f"{why}: a lower tier may add rules, not replace upstream ones (the upstream's stays)"
            errors.append(TierConflict(rule.path, line, message))
        else:
            rules.append(rule)
    return rules, sorted(errors, key=lambda e: (e.path, e.line))


def _same_file(local: Path, upstream_dir: Path | None) -> bool:
    if upstream_dir is None:
        return False
    try:
        return local.read_bytes() == (upstream_dir / local.name).read_bytes()
    except OSError:
        return False

"""Rule exceptions: approved, scoped, always expiring permissions for a rule not to raise.

An operator records why a known, accepted match (a backup server reaching every host's SSH, a
scanner the security team runs) should not raise an incident, who owns that decision, and until
when. The scope is a rule (its name or Sigma id, or '*' for every rule), narrowed by host, peer
network and port. There is no exception without an expiry, at most 366 days ahead: a forgotten
exception must stop hiding matches by itself. Removal is recorded, never deleted.

ExceptionSet is what the rule engine consults per match: loaded once, matched in memory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, NamedTuple

from collector.errors import QueryError
from collector.store.sql import transaction, translated

DAY_MS = 86_400_000
MAX_EXPIRY_MS = 366 * DAY_MS
MAX_NAME = 200
MAX_REASON = 4000
# The event fields a peer and a port are looked for in (the contract's event categories).
PEER_FIELDS = ("peer_addr", "remote_addr")
PORT_FIELDS = ("service_port", "local_port", "remote_port")


class ExceptionError(QueryError):
    """An exception refused as asked (no expiry, a malformed peer, ...) or not found."""


class ExceptionRow(NamedTuple):
    id: int
    rule: str  # rule name or Sigma id; '*': every rule
    host: str  # agent_id or hostname; '': any
    peer: str  # a network ("10.1.2.0/24", "10.1.2.3/32"); '': any
    port: int  # 0: any
    reason: str
    owner: str
    created_ms: int
    expires_ms: int
    removed_ms: int | None
    removed_by: str
    status: str  # "active", "expired" or "removed", as of the query


_COLUMNS = "id, rule, host, peer, port, reason, owner, created_ms, expires_ms, removed_ms, removed_by"


def _row(values: tuple[Any, ...], now_ms: int) -> ExceptionRow:
    removed_ms, expires_ms = values[9], values[8]
    status = "removed" if removed_ms is not None else "expired" if expires_ms <= now_ms else "active"
    return ExceptionRow._make([*values, status])


def add_exception(
    db: sqlite3.Connection,
    *,
    rule: str,
    host: str = "",
    peer: str = "",
    port: int = 0,
    reason: str,
    owner: str,
    expires_ms: int | None,
    now_ms: int,
) -> ExceptionRow:
    """Record an exception; refuses one without a reason, an owner or an expiry within 366 days."""
    rule, host, peer, reason, owner = rule.strip(), host.strip(), peer.strip(), reason.strip(), owner.strip()
    if not rule:
        raise ExceptionError("an exception needs the rule it applies to (its name or id, or '*' for all)")
    if not reason:
        raise ExceptionError("an exception needs a reason (--reason): why the matches are accepted")
    if not owner:
        raise ExceptionError("an exception needs an owner (--owner): who answers for it")
    for what, value, most in (("rule", rule, MAX_NAME), ("host", host, MAX_NAME), ("owner", owner, MAX_NAME),
                              ("reason", reason, MAX_REASON)):  # fmt: skip
        if len(value) > most:
            raise ExceptionError(f"the {what} is {len(value)} characters long; at most {most}")
    if peer:
        try:
            peer = str(ip_network(peer, strict=False))
        except ValueError:
            raise ExceptionError(
                f"the peer {peer!r} is not an address or network (10.1.2.3, 10.1.2.0/24, fd00::/64)"
            ) from None
    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ExceptionError(f"the port must be 1..65535 (0: any port), got {port}")
    if expires_ms is None:
        raise ExceptionError(
            "an exception needs an expiry (--expires 30d or a date, at most 366 days ahead): "
            "exceptions without one are refused"
        )
    if expires_ms <= now_ms:
        raise ExceptionError("an exception's expiry must be in the future")
    if expires_ms > now_ms + MAX_EXPIRY_MS:
        raise ExceptionError("an exception may last at most 366 days: renew it when it expires")
    with translated("record the exception"), transaction(db):
        cursor = db.execute(
            "INSERT INTO rule_exceptions (rule, host, peer, port, reason, owner, created_ms, expires_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rule, host, peer, port, reason, owner, now_ms, expires_ms),
        )
        values = db.execute(f"SELECT {_COLUMNS} FROM rule_exceptions WHERE id = ?", (cursor.lastrowid,))
        return _row(values.fetchone(), now_ms)


def remove_exception(db: sqlite3.Connection, exception_id: int, by: str, now_ms: int) -> ExceptionRow:
    """End an exception now; who ended it is recorded. Removing it twice is refused."""
    by = by.strip()
    if not by:
        raise ExceptionError("removing an exception needs the name of who removes it (--by)")
    if len(by) > MAX_NAME:
        raise ExceptionError(f"the remover's name is {len(by)} characters long; at most {MAX_NAME}")
    with translated("remove the exception"), transaction(db):
        row = db.execute(f"SELECT {_COLUMNS} FROM rule_exceptions WHERE id = ?", (exception_id,)).fetchone()
        if row is None:
            raise ExceptionError(f"no exception {exception_id}")
        if row[9] is not None:
            raise ExceptionError(f"exception {exception_id} was already removed (by {row[10] or 'someone'})")
        db.execute(
            "UPDATE rule_exceptions SET removed_ms = ?, removed_by = ? WHERE id = ?",
            (now_ms, by, exception_id),
        )
        return _row((*row[:9], now_ms, by), now_ms)


def list_exceptions(
    db: sqlite3.Connection, *, include_expired: bool = False, now_ms: int
) -> list[ExceptionRow]:
    """The exceptions in force, soonest to expire first; with include_expired every one ever
    recorded (expired and removed too), newest first."""
    with translated("list exceptions"):
        if include_expired:
            rows = db.execute(f"SELECT {_COLUMNS} FROM rule_exceptions ORDER BY id DESC").fetchall()
        else:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM rule_exceptions WHERE removed_ms IS NULL AND expires_ms > ?"
                " ORDER BY expires_ms, id",
                (now_ms,),
            ).fetchall()
    return [_row(row, now_ms) for row in rows]


class ExceptionSet:
    """The exceptions in force at a moment, matched against rule matches in memory."""

    def __init__(self, rows: list[ExceptionRow], now_ms: int) -> None:
        self.now_ms = now_ms
        self._rows: list[tuple[ExceptionRow, IPv4Network | IPv6Network | None]] = []
        for row in rows:
            try:
                network = ip_network(row.peer, strict=False) if row.peer else None
            except ValueError:
                continue  # written around add_exception: a peer nobody can match covers nothing
            self._rows.append((row, network))

    @classmethod
    def load(cls, db: sqlite3.Connection, now_ms: int) -> ExceptionSet:
        return cls(list_exceptions(db, now_ms=now_ms), now_ms)

    def __len__(self) -> int:
        return len(self._rows)

    def covering(
        self, rule_name: str, rule_id: str, fields: Mapping[str, Any], *, now_ms: int | None = None
    ) -> ExceptionRow | None:
        """The first exception (oldest) that covers a match of the rule on an event with these fields,
        or None. Expiry is judged at now_ms, by default the time the set was loaded."""
        at = self.now_ms if now_ms is None else now_ms
        names = {rule_name.casefold(), rule_id.casefold()} - {""}
        for row, network in self._rows:
            if row.removed_ms is not None or row.expires_ms <= at:
                continue
            if row.rule != "*" and row.rule.casefold() not in names:
                continue
            if row.host and not _host_matches(row.host, fields):
                continue
            if network is not None and not _peer_in(network, fields):
                continue
            if row.port and not _port_matches(row.port, fields):
                continue
            return row
        return None


def _host_matches(host: str, fields: Mapping[str, Any]) -> bool:
    hostname = fields.get("hostname")
    # Hostnames compare as DNS does, without case; agent ids exactly.
    return fields.get("agent_id") == host or (
        isinstance(hostname, str) and hostname.casefold() == host.casefold()
    )


def _peer_in(network: IPv4Network | IPv6Network, fields: Mapping[str, Any]) -> bool:
    for name in PEER_FIELDS:
        if name in fields:
            try:
                return ip_address(str(fields[name]).strip()) in network
            except ValueError:
                return False
    return False


def _port_matches(port: int, fields: Mapping[str, Any]) -> bool:
    candidates = [fields.get(name) for name in PORT_FIELDS]
    ports = fields.get("ports")
    if isinstance(ports, list | tuple):
        candidates.extend(ports)
    return any(_as_port(value) == port for value in candidates)


def _as_port(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None

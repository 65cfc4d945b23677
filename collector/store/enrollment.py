"""Trust in the database: enrollment tokens, the certificates issued, revocations.

Who calls what: the CLI creates and revokes tokens, revokes and renames agents (short
transactions of its own beside the running collector: WAL and busy_timeout make that safe);
the writer process redeems tokens and records renewals (store/process.py), because it keeps
the agents' sequence state in memory and a re-enrolment changes it. Only hashes of tokens
are stored. Times are milliseconds since the epoch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from collector.errors import CollectorError, QueryError, StoreError
from collector.model import HostLabels
from collector.store.sql import transaction, translated
from collector.store.tiers import COLLECTOR_ROLE as TIER_ROLE

_INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, agent, agent_id, issued_ms, not_after_ms) VALUES (?, ?, ?, ?, ?)"
)


class TokenRefused(CollectorError):
    """The token cannot enroll anyone: unknown, expired, used up or revoked (said which)."""


class TokenRow(NamedTuple):
    id: int
    department: str
    county: str
    site: str
    role: str
    created_ms: int
    expires_ms: int
    uses_left: int
    uses: int
    status: str  # "active", "expired", "used", "revoked"
    note: str


class Enrolled(NamedTuple):
    """What a redeemed token did."""

    key: int  # agents.id
    labels: HostLabels
    # The agent id this host had before (a reinstalled agent with a new key), "" when new.
    replaced_agent_id: str


class CertificateStatus(NamedTuple):
    agent_id: str
    revoked: bool
    # The role label the agent enrolled with: "collector" for a lower tier (collector/tiers_policy.py).
    role: str = ""


class Revocation(NamedTuple):
    id: int
    serial: str
    agent_id: str
    reason: str


@contextmanager
def _transaction(db: sqlite3.Connection, what: str) -> Iterator[None]:
    with translated(what), transaction(db):
        yield


def create_token(
    db: sqlite3.Connection,
    token_hash: str,
    labels: HostLabels,
    *,
    now_ms: int,
    expires_ms: int,
    uses: int,
    note: str = "",
    replaces: int | None = None,
) -> int:
    if uses < 1:
        raise QueryError(f"a token must allow at least one use, not {uses}")
    if expires_ms <= now_ms:
        raise QueryError("a token must expire in the future")
    if replaces is not None and uses != 1:
        raise QueryError("a token that replaces an agent is for one enrollment (--uses 1)")
    with _transaction(db, "create the token"):
        cursor = db.execute(
            "INSERT INTO enrollment_tokens (token_hash, department, county, site, role, created_ms,"
            " expires_ms, uses_left, note, replaces) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (token_hash, *labels, now_ms, expires_ms, uses, note, replaces),
        )
    return int(cursor.lastrowid or 0)


def list_tokens(db: sqlite3.Connection, now_ms: int, *, all_tokens: bool = False) -> list[TokenRow]:
    """Newest first; only the usable ones unless ``all_tokens``."""
    try:
        rows = db.execute(
            "SELECT id, department, county, site, role, created_ms, expires_ms, uses_left, uses,"
            " revoked_ms, note FROM enrollment_tokens ORDER BY id DESC"
        ).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot list tokens: {exc}") from exc
    tokens = []
    for token_id, department, county, site, role, created, expires, left, uses, revoked, note in rows:
        status = _token_status(revoked, expires, left, now_ms)
        if all_tokens or status == "active":
            tokens.append(
                TokenRow(token_id, department, county, site, role, created, expires, left, uses, status, note)
            )
    return tokens


def revoke_token(db: sqlite3.Connection, token_id: int, now_ms: int) -> None:
    with _transaction(db, "revoke the token"):
        changed = db.execute(
            "UPDATE enrollment_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
            (now_ms, token_id),
        ).rowcount
        if not changed:
            exists = db.execute("SELECT 1 FROM enrollment_tokens WHERE id = ?", (token_id,)).fetchone()
            raise QueryError(f"token {token_id} " + ("is already revoked" if exists else "does not exist"))


def redeem(
    db: sqlite3.Connection,
    token_hash: str,
    *,
    now_ms: int,
    agent_id: str,
    hostname: str,
    machine_id: str,
    agent_version: str,
    serial: str,
    not_after_ms: int,
) -> Enrolled:
    """Use the token once and enrol the agent with its first certificate, in one transaction.

    A reinstalled host (its key new) takes over its old record only with a token made for that
    (``replaces``, from ``tokens create --replace AGENT``): history kept, labels from the new
    token, its sequence starts again, its old certificates revoked. Anything the host says about
    itself (machine id, hostname) would let one host hijack another's record, so it decides nothing.
    """
    with _transaction(db, "enroll the agent"):
        token = db.execute(
            "SELECT id, department, county, site, role, expires_ms, uses_left, revoked_ms, replaces"
            " FROM enrollment_tokens WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if token is None:
            raise TokenRefused("unknown enrollment token")
        token_id, *label_values, expires_ms, uses_left, revoked_ms, replaces = token
        status = _token_status(revoked_ms, expires_ms, uses_left, now_ms)
        if status != "active":
            raise TokenRefused(f"the enrollment token is {status}")
        labels = HostLabels(*label_values)
        db.execute(
            "UPDATE enrollment_tokens SET uses_left = uses_left - 1, uses = uses + 1 WHERE id = ?",
            (token_id,),
        )
        replaced = ""
        row = db.execute("SELECT id, revoked_ms FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        if row is not None and row[1] is not None:
            # A revoked key stays revoked: enrolling it again must not undo an operator's revocation.
            raise TokenRefused("this key's agent is revoked: enroll with a new key")
        if row is None and replaces is not None:
            # Only a token made for it (tokens create --replace) takes over an existing record: the
            # host's machine id and hostname are its own claims, and would let anyone hijack another's.
            row = db.execute("SELECT id, agent_id FROM agents WHERE id = ?", (replaces,)).fetchone()
            if row is None:
                raise TokenRefused("the agent this token was to replace no longer exists")
            replaced = row[1]
        # A lower tier's rows upstream are filed under its name: it is fixed at enrollment (a hello
        # renames nothing) and no second collector may take a name already in use.
        tier = labels.role == TIER_ROLE
        if tier:
            taken = db.execute(
                "SELECT agent_id FROM agents WHERE hostname = ? AND role = ? AND revoked_ms IS NULL"
                " AND id != ?",
                (hostname, TIER_ROLE, row[0] if row is not None else -1),
            ).fetchone()
            if taken is not None:
                raise TokenRefused(
                    f"a collector named {hostname!r} is already enrolled (agent {taken[0][:12]}): enroll"
                    " this tier with another --name, or revoke the other one first"
                )
        if row is None:
            cursor = db.execute(
                "INSERT INTO agents (agent_id, hostname, agent_version, department, county, site, role,"
                " first_seen_ms, last_seen_ms, machine_id, enrolled_ms, name_locked)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (agent_id, hostname, agent_version, *labels, now_ms, now_ms, machine_id, now_ms, int(tier)),
            )
            key = int(cursor.lastrowid or 0)
        else:
            key = int(row[0])
            db.execute(
                "UPDATE agents SET agent_id = ?, agent_version = ?, department = ?, county = ?, site = ?,"
                " role = ?, machine_id = ?, enrolled_ms = ?, revoked_ms = NULL,"
                " hostname = CASE WHEN name_locked THEN hostname ELSE ? END,"
                " name_locked = max(name_locked, ?),"
                # A new key is a new agent: its spool, and so its sequence, start afresh.
                " last_seq = CASE WHEN agent_id = ? THEN last_seq ELSE 0 END"
                " WHERE id = ?",
                (agent_id, agent_version, *labels, machine_id, now_ms, hostname, int(tier), agent_id, key),
            )
            if replaced:
                _revoke_certificates(db, key, now_ms, f"host re-enrolled as {agent_id}")
        db.execute(
            _INSERT_CERTIFICATE,
            (serial, key, agent_id, now_ms, not_after_ms),
        )
    return Enrolled(key, labels, replaced)


def record_renewal(
    db: sqlite3.Connection, agent_id: str, old_serial: str, serial: str, *, now_ms: int, not_after_ms: int
) -> None:
    """A fresh certificate for an admitted agent; the old one stays valid until it expires."""
    with _transaction(db, "record the renewed certificate"):
        row = db.execute(
            "SELECT agent, revoked_ms FROM certificates WHERE serial = ? AND agent_id = ?",
            (old_serial, agent_id),
        ).fetchone()
        if row is None or row[1] is not None:
            raise TokenRefused("the presented certificate is unknown or revoked: enroll again")
        db.execute(
            _INSERT_CERTIFICATE,
            (serial, row[0], agent_id, now_ms, not_after_ms),
        )


def certificate_status(db: sqlite3.Connection, serial: str) -> CertificateStatus | None:
    """The agent a certificate was issued to and whether it is revoked; None when never issued here."""
    try:
        row = db.execute(
            "SELECT c.agent_id, c.revoked_ms, COALESCE(a.role, '') FROM certificates c"
            " LEFT JOIN agents a ON a.id = c.agent WHERE c.serial = ?",
            (serial,),
        ).fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot look up certificate {serial}: {exc}") from exc
    return None if row is None else CertificateStatus(row[0], row[1] is not None, row[2])


def revocations_since(db: sqlite3.Connection, after_id: int) -> list[Revocation]:
    try:
        return [
            Revocation(*row)
            for row in db.execute(
                "SELECT id, serial, agent_id, reason FROM revocations WHERE id > ? ORDER BY id", (after_id,)
            )
        ]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read revocations: {exc}") from exc


def revoke_agent(db: sqlite3.Connection, key: int, now_ms: int, reason: str) -> int:
    """Revoke every certificate of the agent (agents.id); return how many were still valid."""
    with _transaction(db, "revoke the agent"):
        count = _revoke_certificates(db, key, now_ms, reason)
        db.execute("UPDATE agents SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL", (now_ms, key))
    return count


def rename_agent(db: sqlite3.Connection, key: int, name: str) -> None:
    name = name.strip()
    if not name or len(name) > 253 or any(ord(c) < 32 for c in name):
        raise QueryError("a name must be 1 to 253 printable characters")
    with _transaction(db, "rename the agent"):
        db.execute("UPDATE agents SET hostname = ?, name_locked = 1 WHERE id = ?", (name, key))


def _revoke_certificates(db: sqlite3.Connection, key: int, now_ms: int, reason: str) -> int:
    valid = db.execute(
        "SELECT serial, agent_id FROM certificates WHERE agent = ? AND revoked_ms IS NULL", (key,)
    ).fetchall()
    db.executemany(
        "UPDATE certificates SET revoked_ms = ?, reason = ? WHERE serial = ?",
        [(now_ms, reason, serial) for serial, _ in valid],
    )
    db.executemany(
        "INSERT INTO revocations (serial, agent_id, revoked_ms, reason) VALUES (?, ?, ?, ?)",
        [(serial, agent_id, now_ms, reason) for serial, agent_id in valid],
    )
    return len(valid)


def _token_status(revoked_ms: int | None, expires_ms: int, uses_left: int, now_ms: int) -> str:
    if revoked_ms is not None:
        return "revoked"
    if uses_left <= 0:
        return "used"
    if expires_ms <= now_ms:
        return "expired"
    return "active"

"""The forwarder's state directory: who we are upstream, how far we have read, how delivery goes.

Layout (default: ``upstream/`` beside the database)::

    <state>/
        enrollment.json, tls/   the client identity, exactly as an agent keeps it (agent/credentials.py)
        spool.db                the durable outbox (agent/spool.py): batches until the upstream acks them
        tier.json               this tier's name (the enrollment hostname) and the upstream's address
        cursors.json            how far each source has been read into the spool
        status.json             the running forwarder's view, rewritten every cycle, for `tiers status`

Cursors advance only after the batches they cover are in the spool, so a crash between the two
sends some facts again: the upstream's upsert makes that harmless.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.atomicfile import write_atomic
from collector.errors import CollectorError

STATE_DIR_NAME = "upstream"


def default_state_dir(db_path: Path) -> Path:
    return db_path.resolve().parent / STATE_DIR_NAME


@dataclass(frozen=True)
class TierIdentity:
    name: str
    upstream: str  # HOST:PORT of the upstream's mTLS port


@dataclass
class Cursors:
    """The newest change (tier_seq) read into the spool, per source; and the rollups."""

    incidents: int = 0
    migrations: int = 0
    relayed_incidents: int = 0
    relayed_migrations: int = 0
    relayed_rollups: int = 0
    # Hours from this one on are read again each cycle (the current one fills; the previous one
    # gets the last minutes late); 0: never read, start from the configured lookback.
    rollup_from_ms: int = 0
    # "zone\thour_ms" -> the figures last sent: an hour is sent again only when it changed.
    rollups_sent: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ForwarderStatus:
    """What `tiers status` shows of the running forwarder."""

    upstream: str = ""
    name: str = ""
    connected: bool = False
    acked_seq: int = 0
    last_ack_ms: int = 0
    last_cycle_ms: int = 0
    facts_sent: int = 0
    last_error: str = ""
    policy_version: str = ""
    interval_s: float = 5.0
    pid: int = 0


class TierState:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.identity_path = state_dir / "tier.json"
        self.cursors_path = state_dir / "cursors.json"
        self.status_path = state_dir / "status.json"
        self.spool_path = state_dir / "spool.db"

    def identity(self) -> TierIdentity:
        raw = self._read(self.identity_path)
        if raw is None:
            raise CollectorError(
                f"{self.state_dir} holds no tier enrollment: run `zonewatch-collector tiers enroll"
                " --upstream HOST:PORT --token TOKEN --ca CA.pem --name NAME` first"
            )
        try:
            return TierIdentity(str(raw["name"]), str(raw["upstream"]))
        except (KeyError, TypeError) as exc:
            raise CollectorError(
                f"{self.identity_path} is damaged ({exc}): enroll again with --force"
            ) from exc

    def save_identity(self, identity: TierIdentity) -> None:
        self._write(self.identity_path, asdict(identity))

    def cursors(self) -> Cursors:
        raw = self._read(self.cursors_path)
        if raw is None:
            return Cursors()
        try:
            known = {name: raw[name] for name in Cursors.__dataclass_fields__ if name in raw}
            return Cursors(**known)
        except TypeError as exc:
            raise CollectorError(
                f"{self.cursors_path} is damaged ({exc}); remove it to send everything again"
            ) from exc

    def save_cursors(self, cursors: Cursors) -> None:
        self._write(self.cursors_path, asdict(cursors))

    def status(self) -> ForwarderStatus | None:
        raw = self._read(self.status_path)
        if raw is None:
            return None
        known = {name: raw[name] for name in ForwarderStatus.__dataclass_fields__ if name in raw}
        return ForwarderStatus(**known)

    def save_status(self, status: ForwarderStatus) -> None:
        self._write(self.status_path, asdict(status))

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CollectorError(f"cannot read {path}: {exc}") from exc

    def _write(self, path: Path, value: Any) -> None:
        data = (json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, data, 0o644)
        except OSError as exc:
            raise CollectorError(f"cannot write {path}: {exc.strerror or exc}") from exc

"""`tiers enroll`: a lower collector becomes a client of its upstream, as an agent does.

The agent's enrollment does the work (agent/enroll.py: key made here, CA pinned, certificate
checked, state swapped in atomically); the tier's name is the enrollment hostname, the name the
upstream files everything from this tier under. The operator hands over the upstream's CA file;
its fingerprint is what the agent's enrollment pins.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.certinfo import pem_blocks
from agent.enroll import EnrollOptions, enroll
from agent.errors import AgentError
from collector.errors import CollectorError
from collector.store.tiers import COLLECTOR_ROLE
from collector.upstream.state import TierIdentity, TierState
from collector.upstream.wire import MAX_HOSTNAME


def ca_fingerprint(ca_path: Path) -> str:
    try:
        pem = ca_path.read_bytes()
    except OSError as exc:
        raise CollectorError(f"cannot read the upstream's CA {ca_path}: {exc.strerror or exc}") from exc
    blocks = pem_blocks(pem, "CERTIFICATE")
    if not blocks:
        raise CollectorError(f"{ca_path} holds no PEM certificate (the upstream's pki/ca.crt is wanted)")
    return hashlib.sha256(blocks[0]).hexdigest()


def check_name(name: str) -> str:
    if not name.strip() or name != name.strip():
        raise CollectorError("--name must be a non-empty tier name without leading or trailing spaces")
    if "/" in name or len(name) > MAX_HOSTNAME or not name.isprintable():
        raise CollectorError(f"--name {name[:64]!r}: no '/', no control characters, at most {MAX_HOSTNAME}")
    return name


def enroll_tier(
    upstream: str,
    token: str,
    ca_path: Path,
    name: str,
    state_dir: Path,
    *,
    enroll_port: int = 0,
    force: bool = False,
) -> str:
    """Enroll; the id the upstream knows this tier by. Labels (role "collector") come from the token."""
    options = EnrollOptions(
        collector=upstream,
        token=token,
        ca_fingerprint=ca_fingerprint(ca_path),
        state_dir=state_dir,
        hostname=check_name(name),
        enroll_port=enroll_port,
        force=force,
    )
    try:
        result = enroll(options)
    except AgentError as exc:
        raise CollectorError(str(exc)) from exc
    role = result.enrollment.labels.get("role", "")
    if role != COLLECTOR_ROLE:
        raise CollectorError(
            f"enrolled, but the token gave the role {role!r}, not {COLLECTOR_ROLE!r}: the upstream will"
            f" refuse this tier's facts. Ask for a token made with `tokens create --role {COLLECTOR_ROLE}`"
            " and enroll again with --force"
        )
    TierState(state_dir).save_identity(TierIdentity(name, upstream))
    return result.enrollment.agent_id

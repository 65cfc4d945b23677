"""The insecure agent's identity: a random id kept in its state directory so it survives restarts.

Only for ``insecure`` mode (a lab collector without TLS). An enrolled agent's id is derived from
its public key and read from its certificate (:mod:`agent.credentials`); this file plays no part.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from agent.errors import AgentError


def read_agent_id(state_dir: Path) -> str | None:
    """The insecure id if one was made, without making one."""
    try:
        return (state_dir / "agent_id").read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def load_or_create_agent_id(state_dir: Path) -> str:
    path = state_dir / "agent_id"
    try:
        if path.exists():
            agent_id = path.read_text(encoding="utf-8").strip()
            if agent_id:
                return agent_id
        state_dir.mkdir(parents=True, exist_ok=True)
        agent_id = secrets.token_hex(16)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(agent_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return agent_id
    except OSError as exc:
        raise AgentError(f"cannot keep the agent id in {state_dir}: {exc.strerror or exc}") from exc

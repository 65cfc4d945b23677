"""The policy the collector serves to agents, versioned by the hash of its content."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AgentPolicy:
    sample_interval_s: int = 10
    # Empty: every interface except loopback.
    interfaces: tuple[str, ...] = ()
    batch_max_facts: int = 500
    policy_refresh_s: int = 60

    @property
    def version(self) -> str:
        """A short content hash: equal policies have equal versions on every collector."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

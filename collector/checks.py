"""Field checks every edge shares: agents' facts (validate.py) and lower tiers' facts (upstream/wire.py).

A module of its own because validate.py calls upstream/wire.py for tier facts: the two cannot import
each other's helpers.
"""

from __future__ import annotations

from collector.errors import ValidationError

INT64_MAX = 2**63 - 1
# 2000-01-01: anything earlier is a broken clock, not an observation.
MIN_TIME_MS = 946_684_800_000


def text(value: str, field: str, max_len: int, *, required: bool = False) -> str:
    if required and not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters long, at most {max_len} allowed")
    if not value.isprintable():
        raise ValidationError(field, "contains control characters")
    return value

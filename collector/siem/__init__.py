"""SIEM export: incidents as RFC 5424 syslog over TCP or TLS, and as JSON lines, at least once.

config (where to, in which form), format (RFC 5424 and JSON from an incident document),
transport (the syslog client: RFC 6587 octet counting, delivery confirmed by the peer's TCP
acknowledgement), jsonl (the appended, fsynced file), exporter (the loop: read after the cursor,
deliver, advance). The field mapping is documented in docs/siem.md.
"""

from __future__ import annotations

from collector.errors import CollectorError


class SiemError(CollectorError):
    """A SIEM destination that is malformed (a bad URL, facility or SD-ID) or cannot be reached."""


class DeliveryError(SiemError):
    """Messages not confirmed delivered: the exporter resends them from its cursor."""

"""The fields of the events rules see, per category: the event contract, in one place.

The loader refuses a rule or sample that names a field its category does not have, because a misspelt
field never matches and the rule would silently never raise.
"""

from __future__ import annotations

HOST_FIELDS = ("agent_id", "hostname", "department", "county", "site", "role")
# Every event carries these besides its category's own fields.
COMMON_FIELDS = ("category", "time_ms", *HOST_FIELDS)

CATEGORY_FIELDS: dict[str, tuple[str, ...]] = {
    "access": (
        "direction", "peer_addr", "peer_zone", "peer_zone_kind", "peer_zone_admin", "peer_same_zone",
        "local_zone", "zone_allowed", "attempts", "half_open", "resets", "icmp_unreachable", "failed",
        "distinct_ports", "distinct_hosts", "ports", "service", "service_port", "bytes_in", "bytes_out",
        "window_ms",
    ),
    "listener": ("change", "protocol", "local_addr", "local_port", "pid", "process", "user", "cmdline"),
    "flow": (
        "protocol", "local_addr", "local_port", "remote_addr", "remote_port", "interface", "bytes_in",
        "bytes_out", "packets_in", "packets_out", "start_ms", "end_ms", "remote_zone", "remote_zone_kind",
        "zone_allowed", "direction", "pid", "process", "user", "cmdline",
    ),
    "zone_traffic": (
        "zone", "zone_kind", "zone_direction", "bytes_in", "bytes_out", "window_ms", "bps_in", "bps_out",
        "baseline_bps_out", "baseline_ratio",
    ),
    "interface": ("interface", "rx_bps", "tx_bps", "speed_bps", "utilization", "saturated_s"),
    "agent_health": (
        "cpu_percent", "rss_bytes", "spool_bytes", "spool_batches", "capture_packets", "capture_drops",
        "capture_loss_pct",
    ),
    "migration": ("network", "from_state", "to_state", "bytes_dedicated", "blockers", "reason"),
    "heartbeat": ("last_seen_ms", "silent_s", "interval_s", "intervals_missed"),
}  # fmt: skip

CATEGORIES = tuple(CATEGORY_FIELDS)
# A detection item on these matches when any element matches; group-by on them fans out.
LIST_FIELDS = frozenset({"ports", "blockers"})

# What a sample event gets when it leaves a host field out.
SAMPLE_HOST = {"agent_id": "sample-agent", "hostname": "sample-host", "department": "", "county": "",
               "site": "", "role": ""}  # fmt: skip
SAMPLE_START_MS = 1_000_000
SAMPLE_STEP_MS = 1000


def known_fields(category: str) -> frozenset[str]:
    """The fields an event of this category may carry (empty for an unknown category)."""
    own = CATEGORY_FIELDS.get(category)
    return frozenset((*COMMON_FIELDS, *own)) if own is not None else frozenset()

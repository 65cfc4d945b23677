"""The agent's view of itself, reported with every batch: what it costs and which sensors run."""

from __future__ import annotations

from typing import NamedTuple

import psutil


class Health(NamedTuple):
    cpu_percent: float  # of one core, since the previous reading
    rss_bytes: int
    spool_bytes: int
    spool_batches: int
    policy_version: str
    # sensor -> "on", "off: <why>", ...: an admin sees at once what this host does not report.
    sensors: dict[str, str]
    # Packets the capture received (dropped ones included) and dropped, since the agent started.
    capture_packets: int = 0
    capture_drops: int = 0


class SelfMonitor:
    """CPU and memory of this process; cheap (two /proc reads)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the first reading is relative to this one

    def cpu_and_rss(self) -> tuple[float, int]:
        with self._process.oneshot():
            return self._process.cpu_percent(None), self._process.memory_info().rss

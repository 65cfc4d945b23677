"""The retention schedule: one bounded maintenance step every interval, back to back while behind.

Steps reach the writer process through Ingest's request path, so each one queues
between two group commits and never runs during one; a commit waits at most one
short step. A step that fails is logged and tried again after the interval, and
ingest goes on: retention can wait, acknowledgements cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from collector.errors import CollectorError
from collector.ingest import Ingest
from collector.store.retention import MaintenanceReport, RetentionPolicy

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MaintenanceSchedule:
    def __init__(
        self,
        ingest: Ingest,
        policy: RetentionPolicy,
        *,
        interval_s: float,
        budget_rows: int,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._ingest = ingest
        self._policy = policy
        self._interval_s = interval_s
        self._budget_rows = budget_rows
        self._clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.failures = 0
        self.last_report: MaintenanceReport | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="zonewatch-maintenance")

    async def stop(self) -> None:
        """Stop after the step in flight, if any (never cancelled: its reply must be read)."""
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            behind = await self._step()
            if not behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def _step(self) -> bool:
        """Run one step; True when it left work for the next one."""
        try:
            report = await self._ingest.maintain(self._clock(), self._budget_rows, self._policy)
        except CollectorError as exc:
            self.failures += 1
            log.warning("retention step failed, next try in %g s: %s", self._interval_s, exc)
            return False
        self.steps += 1
        self.last_report = report
        if report.rows_done:
            log.debug("retention step: %s", report)
        return not report.done

"""The retention and migration schedules: one bounded step every interval, back to back while behind.

Steps reach the writer process through Ingest's request path, so each one queues
between two group commits and never runs during one; a commit waits at most one
short step. A step that fails is logged and tried again after the interval, and
ingest goes on: retention can wait, acknowledgements cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from collector.errors import CollectorError
from collector.ingest import Ingest
from collector.migration import MigrationPolicy
from collector.store.migration import MAX_AGENTS_PER_STEP
from collector.store.retention import MaintenanceReport, RetentionPolicy

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Periodic:
    """A step every ``interval_s``, back to back while the step says it is behind; stopped after
    the step in flight (never cancelled: its reply from the writer must be read)."""

    name = "zonewatch-periodic"

    def __init__(self, ingest: Ingest, interval_s: float, clock: Callable[[], int]) -> None:
        self._ingest = ingest
        self._interval_s = interval_s
        self._clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                behind = await self._step()
                self.steps += 1
            except CollectorError as exc:
                self.failures += 1
                log.warning("%s step failed, next try in %g s: %s", self.name, self._interval_s, exc)
                behind = False
            if not behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def _step(self) -> bool:
        """Run one step; True when it left work for the next one."""
        raise NotImplementedError


class MaintenanceSchedule(_Periodic):
    name = "zonewatch-retention"

    def __init__(
        self,
        ingest: Ingest,
        policy: RetentionPolicy,
        *,
        interval_s: float,
        budget_rows: int,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        super().__init__(ingest, interval_s, clock)
        self._policy = policy
        self._budget_rows = budget_rows
        self.last_report: MaintenanceReport | None = None

    async def _step(self) -> bool:
        report = await self._ingest.maintain(self._clock(), self._budget_rows, self._policy)
        self.last_report = report
        if report.rows_done:
            log.debug("retention step: %s", report)
        return not report.done


class MigrationSchedule(_Periodic):
    """Migration states decided every ``interval_s`` (collector/store/migration.py), in the writer
    process like retention; a catalog change asks for a full pass. Failures are logged and retried."""

    name = "zonewatch-migration"

    def __init__(
        self,
        ingest: Ingest,
        policy: MigrationPolicy,
        *,
        interval_s: float,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        super().__init__(ingest, interval_s, clock)
        self._policy = policy
        self._full = True  # the first pass after start decides every host
        self.transitions = 0

    def catalog_changed(self) -> None:
        self._full = True

    async def _step(self) -> bool:
        full, self._full = self._full, False
        try:
            report = await self._ingest.evaluate_migration(self._clock(), self._policy, full=full)
        except CollectorError:
            self._full = self._full or full
            raise
        self.transitions += report.transitions
        return report.agents >= MAX_AGENTS_PER_STEP


class DetectionSchedule(_Periodic):
    """Every ``interval_s``: the silence check (agents that stopped reporting), and the rules
    directory looked at, reloading the rules when a file was added, changed or removed. Reloads
    keep the engine's windows; a file that no longer loads keeps its previous version active."""

    name = "zonewatch-detection"

    def __init__(
        self,
        ingest: Ingest,
        rules_dir: Path | None,
        *,
        interval_s: float,
        clock: Callable[[], int] = wall_clock_ms,
        upstream_rules_dir: Path | None = None,
    ) -> None:
        super().__init__(ingest, interval_s, clock)
        # A lower tier watches its copy of the upstream's rules too (tiers_policy.py).
        self._rules_dirs = (rules_dir, upstream_rules_dir)
        self._fingerprint = rules_fingerprint(*self._rules_dirs)
        self.reloads = 0
        self.last_errors: list[str] = []

    async def reload(self) -> tuple[int, list[str]]:
        fingerprint = rules_fingerprint(*self._rules_dirs)
        count, errors = await self._ingest.reload_rules()
        self._fingerprint = fingerprint  # only now: a reload that failed is tried again next step
        self.reloads += 1
        report_rule_errors(errors, self.last_errors)
        self.last_errors = errors
        log.info("rules reloaded: %d in force", count)
        return count, errors

    async def _step(self) -> bool:
        if rules_fingerprint(*self._rules_dirs) != self._fingerprint:
            await self.reload()
        await self._ingest.check_silence(self._clock())
        return False


def rules_fingerprint(*directories: Path | None) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of every rule file: a change to any of them means a reload."""
    found: list[tuple[str, int, int]] = []
    for directory in directories:
        if directory is None:
            continue
        try:
            entries = [e for e in os.scandir(directory) if e.name.endswith((".yml", ".yaml"))]
            found.extend((e.path, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
        except OSError:
            continue
    return tuple(sorted(found))


def report_rule_errors(errors: Sequence[str], before: Sequence[str] = ()) -> None:
    """Each broken rule file once per change, as a warning: the previous version stays in force."""
    for error in errors:
        if error not in before:
            log.warning("rule not loaded (its previous version, if any, stays in force): %s", error)

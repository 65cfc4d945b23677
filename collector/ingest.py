"""Group commit: many streams' batches share one durable transaction.

Streams hand validated batches to `submit` and await the outcome. One task
drains everything queued into a group and sends it to the writer process
(store/process.py), which commits it in a single transaction; only its reply
resolves the futures, so an ack never precedes the COMMIT that makes it true.

Two groups are in flight at once: while the child commits one (and waits for
fsync), the next is already encoded and on its way, so neither process waits
for the other. Sending and receiving each have their own thread, which spends
its life blocked on the pipe rather than holding the GIL. Replies come back in
request order; `_replies` pairs them with their futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path
from typing import Any, NamedTuple

from collector.errors import CollectorError, StoreError
from collector.metrics import Histogram, IngestMeter, WriterFigures
from collector.migration import MigrationPolicy
from collector.model import AgentHello, CatalogRow, DetectionConfig, HostLabels, Settled, ValidBatch
from collector.store.enrollment import CertificateStatus, Enrolled, Revocation, TokenRefused
from collector.store.incidents import Raise
from collector.store.migration import EvaluationReport
from collector.store.process import WriterProcess
from collector.store.retention import MaintenanceReport, RetentionPolicy
from collector.store.writer import Rejected

log = logging.getLogger(__name__)

GROUPS_IN_FLIGHT = 2


class _Pending(NamedTuple):
    item: ValidBatch | Rejected
    future: asyncio.Future[Settled | Rejected]


class IngestStats(NamedTuple):
    batches: int
    facts: int
    commits: int
    rejected: int


class Ingest:
    def __init__(self, db_path: str | Path, *, max_group_facts: int = 100_000, retry_s: float = 1.0) -> None:
        self._db_path = Path(db_path)
        self._max_group_facts = max_group_facts
        self._send_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zonewatch-send")
        self._receive_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zonewatch-receive")
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._replies: deque[asyncio.Future[Any]] = deque()
        self._in_flight = asyncio.Semaphore(GROUPS_IN_FLIGHT)
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: WriterProcess | None = None
        self._failure: CollectorError | None = None
        self._failed_at = 0.0
        self._retry_s = retry_s
        self.batches = self.facts = self.commits = self.rejected = 0
        self.meter = IngestMeter()  # for /metrics (metrics.py): a few additions per batch

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._send_thread, WriterProcess, self._db_path)
        self._tasks = [
            asyncio.create_task(self._receive_replies(), name="zonewatch-writer-replies"),
            asyncio.create_task(self._group_commit(), name="zonewatch-group-commit"),
        ]

    def _failed(self) -> CollectorError | None:
        """The storage failure in force, if any. A failure is not forever: once ``retry_s`` has
        passed (and the writer process lives) the next request tries again, so a collector whose
        disk filled up resumes by itself when space returns. Nothing was acknowledged meanwhile:
        a failed group is rolled back and its agents keep its batches."""
        if self._failure is None:
            return None
        writer = self._writer
        if writer is None or not writer.alive or time.monotonic() - self._failed_at < self._retry_s:
            return self._failure
        log.warning("storage failed (%s); trying again", self._failure)
        self._failure = None
        return None

    async def _call(self, request: tuple[Any, ...], *, after_failure: bool = False) -> Any:
        """Send one request to the writer; the reply's value (or its StoreError)."""
        if (failure := self._failed()) is not None and not after_failure:
            raise failure
        writer = self._require_writer()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        # Appended and submitted in the same step: the send thread keeps submission
        # order, so _replies stays in the order the child answers in.
        self._replies.append(reply)
        sent = loop.run_in_executor(self._send_thread, writer.send, request)
        try:
            # Shielded: a caller cancelled before the send thread took the request (its RPC ended)
            # must not withdraw it, or its reply slot stays queued and every later reply goes to the
            # wrong caller.
            await asyncio.shield(sent)
        except StoreError as exc:
            self._fail(exc)
            raise
        return await reply

    async def register(self, hello: AgentHello, now_ms: int, *, enrolled: bool = False) -> int:
        return int(await self._call(WriterProcess.register_request(hello, now_ms, enrolled)))

    async def enroll(self, token_hash: str, **fields: Any) -> Enrolled:
        """Redeem the token and enrol the agent (store/enrollment.py redeem); TokenRefused says why not."""
        answer = await self._call(("enroll", token_hash, fields))
        if answer[0] == "refused":
            raise TokenRefused(answer[1])
        return Enrolled(answer[1], HostLabels(*answer[2]), answer[3])

    async def renew(
        self, agent_id: str, old_serial: str, serial: str, now_ms: int, not_after_ms: int
    ) -> None:
        answer = await self._call(("renew", agent_id, old_serial, serial, now_ms, not_after_ms))
        if answer[0] == "refused":
            raise TokenRefused(answer[1])

    async def certificate(self, serial: str) -> CertificateStatus | None:
        answer = await self._call(("certificate", serial))
        return None if answer is None else CertificateStatus(*answer)

    async def evaluate_migration(
        self, now_ms: int, policy: MigrationPolicy, *, full: bool = False
    ) -> EvaluationReport:
        """One migration step (store/migration.py evaluate), queued behind the commits already sent."""
        answer = await self._call(("migration", now_ms, astuple(policy), full))
        return EvaluationReport(*answer)

    async def raise_incident(self, incident: Raise) -> None:
        await self._call(("incident", tuple(incident)))

    async def configure_detection(self, config: DetectionConfig) -> tuple[int, list[str]]:
        """Give the rule engine its rules directory and the catalog's judgments; (rules, errors)."""
        count, errors = await self._call(("detection", config.encode()))
        return int(count), list(errors)

    async def reload_rules(self) -> tuple[int, list[str]]:
        """Load the rules again; a broken file keeps its previous version. (rules in force, errors)."""
        count, errors = await self._call(("reload_rules",))
        return int(count), list(errors)

    async def check_silence(self, now_ms: int) -> int:
        """Judge which agents went silent (heartbeat events); the number of incidents raised or updated."""
        return int(await self._call(("silence", now_ms)))

    async def revocations_since(self, after_id: int) -> list[Revocation]:
        return [Revocation(*r) for r in await self._call(("revocations", after_id))]

    async def store_catalog(self, zones: list[CatalogRow], version: str, now_ms: int) -> None:
        await self._call(WriterProcess.catalog_request(zones, version, now_ms))

    async def note_policy_version(self, agent_id: str, version: str) -> bool:
        return bool(await self._call(WriterProcess.policy_request(agent_id, version)))

    async def maintain(self, now_ms: int, budget_rows: int, policy: RetentionPolicy) -> MaintenanceReport:
        """One bounded retention step (store/retention.py), queued behind the commits already sent."""
        return WriterProcess.maintain_result(
            await self._call(WriterProcess.maintain_request(now_ms, budget_rows, policy))
        )

    def submit(self, item: ValidBatch | Rejected) -> asyncio.Future[Settled | Rejected]:
        """Queue a batch (or a rejection to record); the future resolves after COMMIT."""
        if (failure := self._failed()) is not None:
            raise failure
        future: asyncio.Future[Settled | Rejected] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        self.meter.submitted(_facts(item))
        return future

    def stats(self) -> IngestStats:
        return IngestStats(self.batches, self.facts, self.commits, self.rejected)

    async def writer_figures(self) -> WriterFigures:
        """The writer process's own figures (rule evaluation time, incidents raised), for /metrics."""
        rule_seconds, raised = await self._call(("metrics",))
        return WriterFigures(Histogram.from_state(rule_seconds), int(raised))

    @property
    def writer_pid(self) -> int | None:
        return None if self._writer is None else self._writer.pid

    async def close(self) -> None:
        """Commit everything already queued, then close the database."""
        if self._tasks:
            group_commit = self._tasks[1]
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await group_commit
            for _ in range(GROUPS_IN_FLIGHT):  # every reply is in
                await self._in_flight.acquire()
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            # The close request goes through the pipeline like any other: only the
            # receive thread ever reads the pipe.
            with contextlib.suppress(CollectorError):
                await self._call(WriterProcess.CLOSE_REQUEST, after_failure=True)
            writer, self._writer = self._writer, None
            await loop.run_in_executor(self._send_thread, writer.join)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._send_thread.shutdown(wait=True)
        self._receive_thread.shutdown(wait=True)

    def _require_writer(self) -> WriterProcess:
        if self._writer is None:
            raise CollectorError("ingest is not started")
        return self._writer

    async def _receive_replies(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self._require_writer()
        while True:
            try:
                value = await loop.run_in_executor(self._receive_thread, writer.receive)
                outcome: BaseException | None = None
            except StoreError as exc:
                if not self._replies:
                    return  # the child closed after the last reply: normal shutdown
                value, outcome = None, exc
            if not self._replies:
                continue
            reply = self._replies.popleft()
            if reply.done():
                continue
            if outcome is None:
                reply.set_result(value)
            else:
                reply.set_exception(outcome)

    async def _group_commit(self) -> None:
        stopping = False
        while not stopping:
            # A slot first, then the group: whatever queued while both slots were busy
            # goes out as one big group instead of a trickle of small ones.
            await self._in_flight.acquire()
            first = await self._queue.get()
            if first is None:
                self._in_flight.release()
                break
            group = [first]
            facts = _facts(first.item)
            while facts < self._max_group_facts and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
                facts += _facts(nxt.item)
            request = WriterProcess.commit_request([p.item for p in group])
            reply = asyncio.ensure_future(self._call(request))
            reply.add_done_callback(lambda done, group=group: self._settle(group, done))  # type: ignore[misc]

    def _settle(self, group: list[_Pending], reply: asyncio.Future[Any]) -> None:
        self._in_flight.release()
        if reply.cancelled() or reply.exception() is not None:
            self.meter.dropped(sum(_facts(p.item) for p in group))
        if reply.cancelled():
            return
        exc = reply.exception()
        if exc is not None:
            # Nothing of this group is acknowledged; agents keep it in their spool and send
            # it again. Requests are refused for retry_s, then storage is tried again
            # (_failed): a full disk that gets space back needs no restart.
            failure = exc if isinstance(exc, CollectorError) else StoreError(str(exc))
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            self._fail(failure)
            return
        self.commits += 1
        outcomes = WriterProcess.commit_result(reply.result())
        self.meter.settled([p.item for p in group], outcomes, time.time_ns() // 1_000_000)
        for pending, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Rejected):
                self.rejected += 1
            elif not outcome.duplicate:
                self.batches += 1
                self.facts += _facts(pending.item)
            if not pending.future.done():
                pending.future.set_result(outcome)

    def _fail(self, exc: CollectorError) -> None:
        self._failure = exc
        self._failed_at = time.monotonic()
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if pending is not None:
                self.meter.dropped(_facts(pending.item))
            if pending is not None and not pending.future.done():
                pending.future.set_exception(exc)


def _facts(item: ValidBatch | Rejected) -> int:
    return item.fact_count if isinstance(item, ValidBatch) else 1

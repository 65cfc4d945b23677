"""Group commit: many streams' batches share one durable transaction.

Streams hand validated batches to `submit` and await the outcome; one writer
task drains everything queued, commits it in a single transaction on a
dedicated thread (so the event loop keeps receiving while fsync runs), and only
then resolves the futures — an ack never precedes the COMMIT that makes it true.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from collector.errors import CollectorError, StoreError
from collector.model import AgentHello, Settled, ValidBatch
from collector.store import open_database
from collector.store.writer import Rejected, Writer


class _Pending(NamedTuple):
    item: ValidBatch | Rejected
    future: asyncio.Future[Settled | Rejected]


class IngestStats(NamedTuple):
    batches: int
    facts: int
    commits: int
    rejected: int


class Ingest:
    def __init__(self, db_path: str | Path, *, max_group_facts: int = 100_000) -> None:
        self._db_path = Path(db_path)
        self._max_group_facts = max_group_facts
        # One thread: the writer and its SQLite connection are used from it only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zonewatch-writer")
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._db: sqlite3.Connection | None = None
        self._writer: Writer | None = None
        self._failure: CollectorError | None = None
        self.batches = self.facts = self.commits = self.rejected = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._db, self._writer = await loop.run_in_executor(self._executor, self._open)
        self._task = asyncio.create_task(self._run(), name="zonewatch-group-commit")

    def _open(self) -> tuple[sqlite3.Connection, Writer]:
        db = open_database(self._db_path)
        return db, Writer(db)

    async def register(self, hello: AgentHello, now_ms: int) -> int:
        writer = self._require_writer()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, writer.register, hello, now_ms
        )

    def submit(self, item: ValidBatch | Rejected) -> asyncio.Future[Settled | Rejected]:
        """Queue a batch (or a rejection to record); the future resolves after COMMIT."""
        if self._failure is not None:
            raise self._failure
        future: asyncio.Future[Settled | Rejected] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        return future

    def stats(self) -> IngestStats:
        return IngestStats(self.batches, self.facts, self.commits, self.rejected)

    async def close(self) -> None:
        """Commit everything already queued, then close the database."""
        if self._task is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)

    def _require_writer(self) -> Writer:
        if self._writer is None:
            raise CollectorError("ingest is not started")
        return self._writer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self._require_writer()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
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
            try:
                outcomes = await loop.run_in_executor(self._executor, writer.commit, [p.item for p in group])
            except StoreError as exc:
                # Nothing of this group is acknowledged; agents keep it in their spool.
                self._failure = exc
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                self._fail_queued(exc)
                return
            self.commits += 1
            for pending, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Rejected):
                    self.rejected += 1
                elif not outcome.duplicate:
                    self.batches += 1
                    self.facts += _facts(pending.item)
                if not pending.future.done():
                    pending.future.set_result(outcome)

    def _fail_queued(self, exc: CollectorError) -> None:
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if pending is not None and not pending.future.done():
                pending.future.set_exception(exc)


def _facts(item: ValidBatch | Rejected) -> int:
    return item.fact_count if isinstance(item, ValidBatch) else 1

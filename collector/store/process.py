"""The ingest writer in a process of its own.

Validation (event loop) and SQLite inserts (writer) each need a core. In one
process they fight over the GIL: executemany gives it up and takes it back for
every row, and measured here a writer thread beside a busy event loop fell from
170 k to 5 k rows/s. So the Writer runs in a child process, fed over a pipe with
marshal (the fastest stdlib codec for tuples of ints, floats and strings; both
ends are our own code, so its lack of safety against hostile input is moot).

Calls are synchronous request/response; ingest.py makes them from one thread.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import marshal
import multiprocessing
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import astuple, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent import logfmt
from collector.detection import Detector
from collector.errors import CollectorError, StoreError
from collector.metrics import RULE_BUCKETS, Histogram
from collector.migration import MigrationPolicy
from collector.model import (
    AccessRow,
    AgentHello,
    CatalogRow,
    DetectionConfig,
    FlowRow,
    HealthRow,
    HostLabels,
    InventoryRow,
    ListenerRow,
    Settled,
    ValidBatch,
    ZoneTrafficRow,
)
from collector.store import enrollment
from collector.store.database import open_database
from collector.store.incidents import Raise, raise_incidents
from collector.store.migration import evaluate as evaluate_migration
from collector.store.retention import Maintenance, MaintenanceReport, RetentionPolicy
from collector.store.writer import Rejected, Writer

log = logging.getLogger(__name__)

_BATCH_FIELDS = tuple(f.name for f in fields(ValidBatch))
# ValidBatch fields holding NamedTuple rows, which marshal cannot carry: sent as plain tuples.
_ROW_TYPES = {
    _BATCH_FIELDS.index("zone_rows"): ZoneTrafficRow,
    _BATCH_FIELDS.index("flow_rows"): FlowRow,
    _BATCH_FIELDS.index("health_rows"): HealthRow,
    _BATCH_FIELDS.index("inventory_rows"): InventoryRow,
    _BATCH_FIELDS.index("access_rows"): AccessRow,
    _BATCH_FIELDS.index("listener_rows"): ListenerRow,
}


def _encode_item(item: ValidBatch | Rejected) -> tuple[Any, ...]:
    if isinstance(item, ValidBatch):
        # marshal takes plain tuples only, not NamedTuples.
        values = [getattr(item, name) for name in _BATCH_FIELDS]
        for index in _ROW_TYPES:
            values[index] = [tuple(row) for row in values[index]]
        return ("B", *values)
    return ("R", *item)


def _decode_item(data: tuple[Any, ...]) -> ValidBatch | Rejected:
    if data[0] == "B":
        values = list(data[1:])
        for index, row_type in _ROW_TYPES.items():
            values[index] = [row_type(*row) for row in values[index]]
        return ValidBatch(*values)
    return Rejected(*data[1:])


def _encode_outcome(outcome: Settled | Rejected) -> tuple[Any, ...]:
    return ("S" if isinstance(outcome, Settled) else "R", *outcome)


def _decode_outcome(data: tuple[Any, ...]) -> Settled | Rejected:
    return Settled(*data[1:]) if data[0] == "S" else Rejected(*data[1:])


def _serve(conn: Connection, db_path: str, log_settings: dict[str, Any] | None = None) -> None:
    """The child's main loop: one request, one reply, until close or EOF."""
    # Ctrl-C reaches the whole process group: the collector shuts down gracefully on it and closes our
    # pipe once its in-flight batches are committed. Interrupted here, a commit would fail half-way and
    # the user would see a KeyboardInterrupt traceback from a process they never started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_settings is not None:
        logfmt.configure(**log_settings)

    def reply(status: str, value: Any) -> None:
        conn.send_bytes(marshal.dumps((status, value)))

    # The rule engine holds up to ~100k window groups: with the default thresholds the cyclic collector
    # would spend more time scanning them than the rules take. Nothing here builds reference cycles.
    gc.set_threshold(100_000, 50, 1_000)
    try:
        db = open_database(db_path)
        writer = Writer(db)
        detector = Detector(db)
    except CollectorError as exc:
        reply("err", str(exc))
        return
    reply("ok", None)
    rule_seconds = Histogram(RULE_BUCKETS)  # per group commit judged
    try:
        while True:
            try:
                op, *args = marshal.loads(conn.recv_bytes())
            except EOFError:
                return  # the collector is gone; everything acknowledged is committed
            try:
                if op == "commit":
                    items = [_decode_item(i) for i in args[0]]
                    try:
                        outcomes = writer.commit(items)
                    except CollectorError:
                        detector.excuse(_wall_ms())  # agents are reporting; we cannot store it
                        raise
                    reply("ok", [_encode_outcome(o) for o in outcomes])
                    # After the reply: acks never wait for the rules, which judge what was stored.
                    started = time.perf_counter()
                    _detect(detector.observe, items, outcomes, writer.agent_key)
                    rule_seconds.observe(time.perf_counter() - started)
                elif op == "register":
                    fields, now_ms, enrolled = args
                    hello = AgentHello(
                        fields[0], fields[1], fields[2], HostLabels(*fields[3]), fields[4], fields[5]
                    )
                    key = writer.register(hello, now_ms, enrolled=enrolled)
                    reply("ok", key)
                    detector.forget_host(writer.agent_key(hello.agent_id) or 0)
                elif op == "enroll":
                    token_hash, fields = args
                    try:
                        done = enrollment.redeem(db, token_hash, **fields)
                    except enrollment.TokenRefused as exc:
                        reply("ok", ("refused", str(exc)))
                    else:
                        writer.reload_agent(fields["agent_id"], forget=done.replaced_agent_id)
                        detector.forget_host(done.key)
                        reply("ok", ("enrolled", done.key, tuple(done.labels), done.replaced_agent_id))
                elif op == "renew":
                    try:
                        enrollment.record_renewal(db, *args[:3], now_ms=args[3], not_after_ms=args[4])
                    except enrollment.TokenRefused as exc:
                        reply("ok", ("refused", str(exc)))
                    else:
                        reply("ok", ("renewed",))
                elif op == "certificate":
                    status = enrollment.certificate_status(db, args[0])
                    reply("ok", None if status is None else tuple(status))
                elif op == "migration":
                    now_ms, policy, full = args
                    evaluated = evaluate_migration(db, now_ms, MigrationPolicy(*policy), full=full)
                    reply("ok", tuple(evaluated))
                    _detect(detector.migration_events)
                elif op == "detection":
                    reply("ok", detector.configure(DetectionConfig.decode(args[0])))
                elif op == "reload_rules":
                    reply("ok", detector.reload())
                elif op == "silence":
                    reply("ok", _detect(detector.silence, args[0]))
                elif op == "incident":
                    try:
                        with writer.transaction():
                            raise_incidents(db, [Raise(*args[0])])
                    except sqlite3.Error as exc:
                        raise StoreError(f"cannot store the incident: {exc}") from exc
                    reply("ok", None)
                elif op == "revocations":
                    reply("ok", [tuple(r) for r in enrollment.revocations_since(db, args[0])])
                elif op == "catalog":
                    writer.store_catalog(*args)
                    reply("ok", None)
                elif op == "policy":
                    reply("ok", writer.note_policy_version(*args))
                elif op == "maintain":
                    # Between two commits, never during one: this loop is the only writer.
                    now_ms, budget_rows, policy = args
                    report = Maintenance(db, RetentionPolicy(*policy)).run_step(now_ms, budget_rows)
                    reply("ok", tuple(report))
                elif op == "metrics":  # for /metrics (collector/metrics.py)
                    reply("ok", (rule_seconds.state(), detector.raised))
                elif op == "close":
                    reply("ok", None)
                    return
                else:
                    reply("err", f"unknown writer operation {op!r}")
            except CollectorError as exc:
                reply("err", str(exc))
            except Exception as exc:  # a bug, not bad data: say so, roll back, keep serving
                reply("err", f"internal error in the database writer: {exc!r}")
    finally:
        db.close()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _detect(step: Callable[..., int], *args: Any) -> int:
    """Run one detection step; a failure is reported and never stops the writer (facts come first)."""
    try:
        return step(*args)
    except CollectorError as exc:
        log.warning("detection: %s", exc)
    except Exception:  # a bug in a rule or the engine: say so, keep storing
        log.exception("detection failed")
    return 0


class WriterProcess:
    """The parent's handle on the writer child.

    Requests are answered strictly in order, so a caller may send the next request
    before the previous reply arrives (ingest.py keeps two commit groups in flight:
    one committing, one being decoded by the child). send() and receive() may run
    on two different threads; each on one thread only. The blocking methods
    (commit, register, ...) do both and are for callers without pipelining.
    """

    def __init__(self, db_path: str | Path) -> None:
        # spawn, not fork: the parent runs gRPC's threads, which a fork would copy half-way.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve,
            args=(child, str(db_path), logfmt.current()),  # its warnings: same stderr, same format
            name="zonewatch-writer",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.receive()  # wait until the database is open (or report why not)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _died(self, exc: BaseException) -> StoreError:
        self._process.join(1.0)
        return StoreError(f"the database writer process stopped (exit code {self._process.exitcode})")

    def send(self, request: tuple[Any, ...]) -> None:
        try:
            self._conn.send_bytes(marshal.dumps(request))
        except OSError as exc:
            raise self._died(exc) from exc

    def receive(self) -> Any:
        """The next reply's value; StoreError for an error reply or a dead child."""
        try:
            status, value = marshal.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise self._died(exc) from exc
        if status != "ok":
            raise StoreError(value)
        return value

    @staticmethod
    def commit_request(items: list[ValidBatch | Rejected]) -> tuple[Any, ...]:
        return ("commit", [_encode_item(i) for i in items])

    @staticmethod
    def commit_result(value: Any) -> list[Settled | Rejected]:
        return [_decode_outcome(o) for o in value]

    @staticmethod
    def register_request(hello: AgentHello, now_ms: int, enrolled: bool = False) -> tuple[Any, ...]:
        return ("register", (*hello[:3], tuple(hello.labels), *hello[4:]), now_ms, enrolled)

    @staticmethod
    def catalog_request(zones: list[CatalogRow], version: str, now_ms: int) -> tuple[Any, ...]:
        return ("catalog", zones, version, now_ms)

    @staticmethod
    def policy_request(agent_id: str, version: str) -> tuple[Any, ...]:
        return ("policy", agent_id, version)

    @staticmethod
    def maintain_request(now_ms: int, budget_rows: int, policy: RetentionPolicy) -> tuple[Any, ...]:
        return ("maintain", now_ms, budget_rows, astuple(policy))

    @staticmethod
    def maintain_result(value: Any) -> MaintenanceReport:
        return MaintenanceReport(*value)

    def _call(self, request: tuple[Any, ...]) -> Any:
        self.send(request)
        return self.receive()

    def commit(self, items: list[ValidBatch | Rejected]) -> list[Settled | Rejected]:
        return self.commit_result(self._call(self.commit_request(items)))

    def register(self, hello: AgentHello, now_ms: int) -> int:
        return int(self._call(self.register_request(hello, now_ms)))

    def note_policy_version(self, agent_id: str, version: str) -> bool:
        return bool(self._call(self.policy_request(agent_id, version)))

    def maintain(self, now_ms: int, budget_rows: int, policy: RetentionPolicy) -> MaintenanceReport:
        return self.maintain_result(self._call(self.maintain_request(now_ms, budget_rows, policy)))

    CLOSE_REQUEST = ("close",)

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the child to finish (after every request already sent), then reap it."""
        if self._process.is_alive():
            with contextlib.suppress(StoreError):
                self._call(self.CLOSE_REQUEST)
        self.join(timeout_s)

    def join(self, timeout_s: float = 30.0) -> None:
        """Reap the child once it has answered CLOSE_REQUEST (pipelining callers send that themselves)."""
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

"""Self-monitoring: the collector's own figures as Prometheus metrics at GET /metrics (opt-in).

The exposition is written here, not with prometheus_client. Most figures are already plain counters
the ingest path keeps for itself (ingest.py, servicer.py), and the rule-evaluation time lives in the
writer child process, whose values must be handed to this process anyway: a client library would
only wrap them again, and its locked, labelled instruments would cost more on the hot path than an
integer increment. The text format (version 0.0.4) is small and stable, and the collector installs
from an offline bundle: one dependency fewer to carry. tests/collector/test_metrics.py parses the
output strictly.

A scrape (metrics_http.py serves it) runs on the collector's own event loop: it reads the counters,
asks the writer child for its figures (queued behind the commits in flight, with a timeout) and stats
two files and two processes; no thread touches the counters while the loop changes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil

from collector.errors import CollectorError
from collector.model import Settled, ValidBatch

if TYPE_CHECKING:  # both import this module
    from collector.ingest import Ingest
    from collector.servicer import AgentService

log = logging.getLogger(__name__)

# Seconds: from a few ms (one fsync) to the storage-failure retry range.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds the rule engine spends on one group commit's facts.
RULE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RATE_WINDOW_S = 10
WRITER_TIMEOUT_S = 2.0  # a scrape does not wait longer for the writer's figures; they are left out
_INDEX = re.compile(r"\[[^\]]*\]")  # indices and agent-chosen keys (sensor_status[name])


class Histogram:
    """Cumulative-on-output histogram: observe() is one bisect and three additions."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # value <= bound counts in that bucket
        self.sum += value
        self.count += 1

    def state(self) -> tuple[tuple[float, ...], list[int], float, int]:
        """Plain values, for the pipe from the writer process (marshal)."""
        return self.bounds, list(self.counts), self.sum, self.count

    @classmethod
    def from_state(cls, state: Sequence[Any]) -> Histogram:
        bounds, counts, total, count = state
        histogram = cls(bounds)
        histogram.counts, histogram.sum, histogram.count = list(counts), float(total), int(count)
        return histogram


class RateWindow:
    """Events per second over the last ``seconds``, from per-second buckets."""

    def __init__(self, seconds: int = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, count]

    def add(self, count: int) -> None:
        second = int(self._clock())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += count
            return
        buckets.append([second, count])
        while buckets[0][0] <= second - self._seconds:
            buckets.popleft()

    def rate(self) -> float:
        since = int(self._clock()) - self._seconds
        return sum(n for second, n in self._buckets if second > since) / self._seconds


class IngestMeter:
    """What the group commit settled: facts by kind, acks, duplicates, rejections, lag, facts waiting.

    Kept by ingest.py on every group, metrics endpoint or not: a handful of additions per batch (about
    4 us measured on a loaded 2-core machine: 0.4 % of a core at 10,000 agents reporting every 10 s).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.facts_by_kind: dict[str, int] = {}
        self.acked = 0
        self.duplicates = 0
        self.rejections: dict[tuple[str, str], int] = {}
        self.lag = Histogram(LAG_BUCKETS)
        self.rate = RateWindow(clock=clock)
        self.submitted_facts = 0
        self.settled_facts = 0

    @property
    def waiting_facts(self) -> int:
        """Facts received and queued or committing: not acknowledged yet."""
        return self.submitted_facts - self.settled_facts

    def submitted(self, facts: int) -> None:
        self.submitted_facts += facts

    def dropped(self, facts: int) -> None:
        """Facts that will not be acknowledged (storage failed): no longer waiting."""
        self.settled_facts += facts

    def settled(self, items: Iterable[Any], outcomes: Iterable[Any], now_ms: int) -> None:
        """One group's outcomes (Settled or Rejected per item), acknowledged at ``now_ms``."""
        kinds = self.facts_by_kind
        stored = settled = 0
        for item, outcome in zip(items, outcomes, strict=True):
            if not isinstance(item, ValidBatch):  # a refusal recorded for `health` (one "fact")
                settled += 1
                self.rejected(outcome.code, outcome.field)
                continue
            count = item.fact_count
            settled += count
            if not isinstance(outcome, Settled):  # refused by the writer (a sequence gone back)
                self.rejected(outcome.code, outcome.field)
                continue
            self.acked += 1
            self.lag.observe(max(now_ms - item.received_ms, 0) / 1000)
            if outcome.duplicate:
                self.duplicates += 1
                continue
            stored += count
            if item.sample_columns:
                kinds["interface_sample"] = kinds.get("interface_sample", 0) + len(item.sample_columns[0])
            if item.zone_rows:
                kinds["zone_traffic"] = kinds.get("zone_traffic", 0) + len(item.zone_rows)
            if item.flow_rows:
                kinds["flow"] = kinds.get("flow", 0) + len(item.flow_rows)
            for row in item.other_rows:
                kinds[row[1]] = kinds.get(row[1], 0) + 1
        self.settled_facts += settled
        if stored:
            self.rate.add(stored)

    def rejected(self, code: str, field: str) -> None:
        # Indices and keys out: batch.facts[3].x and batch.facts[7].x are one reason, and so are
        # sensor_status[a] and sensor_status[b] (agent-chosen names): the label set stays bounded by
        # the schema.
        key = (code, _INDEX.sub("[]", field))
        self.rejections[key] = self.rejections.get(key, 0) + 1


class WriterFigures(NamedTuple):
    """What the writer child hands back on request (store/process.py "metrics")."""

    rule_seconds: Histogram
    incidents_raised: int


class Sources:
    """Where the figures come from: the running collector's parts (server.py wires them)."""

    def __init__(self, ingest: Ingest, service: AgentService, db_path: Path) -> None:
        self.meter = ingest.meter
        self.db_path = db_path
        self._ingest = ingest
        self._service = service

    @property
    def open_streams(self) -> int:
        return self._service.open_streams

    @property
    def connected_agents(self) -> int:
        return self._service.connected_agents

    @property
    def throttled_seconds(self) -> float:
        return self._service.throttled_s

    @property
    def writer_pid(self) -> int | None:
        return self._ingest.writer_pid

    async def writer_figures(self) -> WriterFigures:
        return await self._ingest.writer_figures()


class Exposition:
    """Builds the text format: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        shown = ""
        if labels:
            shown = "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"
        self.lines.append(f"{name}{shown} {_number(value)}")

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.family(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, {"le": _number(bound)})
        self.sample(f"{name}_bucket", histogram.count, {"le": "+Inf"})
        self.sample(f"{name}_sum", histogram.sum)
        self.sample(f"{name}_count", histogram.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def render(sources: Sources) -> str:
    """The whole exposition, as of now."""
    meter = sources.meter
    out = Exposition()
    p = "zonewatch_"
    out.family(
        p + "facts_ingested_total", "counter", "Facts durably stored, by fact kind (duplicates not counted)."
    )
    for kind, count in sorted(meter.facts_by_kind.items()):
        out.sample(p + "facts_ingested_total", count, {"kind": kind})
    out.family(
        p + "batches_acked_total", "counter", "Batches acknowledged after their commit, duplicates included."
    )
    out.sample(p + "batches_acked_total", meter.acked)
    out.family(
        p + "batches_duplicate_total", "counter", "Batches acknowledged again: already stored (a resend)."
    )
    out.sample(p + "batches_duplicate_total", meter.duplicates)
    out.family(
        p + "ingest_facts_per_second", "gauge", f"Facts stored per second over the last {RATE_WINDOW_S} s."
    )
    out.sample(p + "ingest_facts_per_second", meter.rate.rate())
    out.histogram(
        p + "ingest_lag_seconds", "From a batch's receipt to its durable acknowledgement.", meter.lag
    )
    out.family(
        p + "ingest_waiting_facts", "gauge", "Facts received and not committed yet (queued or committing)."
    )
    out.sample(p + "ingest_waiting_facts", meter.waiting_facts)
    out.family(
        p + "rejections_total",
        "counter",
        "Batches, hellos, enrollments and admissions refused, by gRPC status code and field (as in the "
        "rejections table, indices left out).",
    )
    for (code, field), count in sorted(meter.rejections.items()):
        out.sample(p + "rejections_total", count, {"code": code, "field": field})
    try:
        figures: WriterFigures | None = await asyncio.wait_for(sources.writer_figures(), WRITER_TIMEOUT_S)
    except (CollectorError, TimeoutError) as exc:
        log.warning("metrics: the writer's figures are left out of this scrape: %s", exc or "timed out")
        figures = None
    if figures is not None:
        out.histogram(
            p + "rule_evaluation_seconds",
            "Time the rule engine took on one group commit's stored facts (in the writer process).",
            figures.rule_seconds,
        )
        out.family(p + "incidents_raised_total", "counter", "Incidents raised or raised again by the rules.")
        out.sample(p + "incidents_raised_total", figures.incidents_raised)
    out.family(p + "database_size_bytes", "gauge", "Size of the database file and of its write-ahead log.")
    db_path = Path(sources.db_path)
    for file, path in (("db", db_path), ("wal", Path(f"{db_path}-wal"))):
        out.sample(p + "database_size_bytes", _size(path), {"file": file})
    out.family(p + "report_streams_open", "gauge", "Report streams open now.")
    out.sample(p + "report_streams_open", sources.open_streams)
    out.family(p + "agents_connected", "gauge", "Agents with at least one Report stream open now.")
    out.sample(p + "agents_connected", sources.connected_agents)
    out.family(
        p + "agent_throttled_seconds_total",
        "counter",
        "Seconds agents' streams were read later for exceeding --agent-rate (their spools held the rest).",
    )
    out.sample(p + "agent_throttled_seconds_total", sources.throttled_seconds)
    processes = [("collector", _process(None))]
    if (pid := sources.writer_pid) is not None:
        processes.append(("writer", _process(pid)))
    out.family(
        p + "process_cpu_seconds_total", "counter", "CPU time (user and system) of each collector process."
    )
    usage = [(name, _usage(proc)) for name, proc in processes]
    for name, (cpu, _) in usage:
        if cpu is not None:
            out.sample(p + "process_cpu_seconds_total", cpu, {"process": name})
    out.family(p + "process_resident_memory_bytes", "gauge", "Resident memory of each collector process.")
    for name, (_, rss) in usage:
        if rss is not None:
            out.sample(p + "process_resident_memory_bytes", rss, {"process": name})
    return out.text()


_processes: dict[int | None, psutil.Process] = {}


def _process(pid: int | None) -> psutil.Process | None:
    """psutil's handle, kept between scrapes (it caches what never changes)."""
    if pid not in _processes:
        try:
            _processes[pid] = psutil.Process(pid)
        except psutil.Error:
            return None
    return _processes[pid]


def _usage(proc: psutil.Process | None) -> tuple[float | None, int | None]:
    if proc is None:
        return None, None
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return times.user + times.system, proc.memory_info().rss
    except psutil.Error:  # the writer restarting
        return None, None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

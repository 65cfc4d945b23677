"""Self-monitoring: the agent's own CPU and memory against a budget, and what it gives up when over.

Every interval the agent reads its CPU time (its threads and the children it reaped: `nft`, `ip`)
and its RSS. CPU is judged over a rolling window (30 s by default) and attributed to sensors, so the
report says *which* sensor cost too much: work done in the main thread is timed around each sensor
(thread CPU time plus the children it ran), the capture thread is read from /proc/self/task, and
what no sensor accounts for (the gRPC threads, the event loop, the spool) is "transport".

Over budget the agent degrades one step a window, in this order, and never exits because of it:

  steps 1-6  capture samples 1 in 2, 4, ... 64 packets (every packet still counted; figures scaled)
  steps 7-8  per-interval sensors run every 2x, then 4x the sampling interval
  step 9     capture off (the last resort)

Steps that do not apply are skipped (no capture running: straight to step 7). Over the RSS budget
it first gives memory back (gc + malloc_trim), then shrinks the capture tables to a quarter (when they
hold 2 MB or more: near-empty tables would free nothing); if CPU
is over too it takes the CPU steps, and if memory alone is over it goes to step 9 only when freeing
the capture's ring and tables would bring RSS under the budget (sampling and longer intervals free
no memory: taking them would cost data for nothing). It comes back one step at a time once CPU has
stayed under 70 % and RSS under 90 % of the budget (counting the memory the step back takes again)
for ``recover_windows`` whole windows (hysteresis); a step back that does not hold (over again
within two windows) doubles that wait, up to 8x, so a load at the line flaps rarely, not forever.

Clock, readings and memory release are injected: tests drive the state machine directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)

MB = 1024 * 1024
RECOVER_FRACTION = 0.7
RSS_RECOVER_FRACTION = 0.9
MAX_PATIENCE = 8
SAMPLING_STEPS = 6  # 1 in 2 ... 1 in 64
INTERVAL_STEPS = (2, 4)  # the cap: 4x the sampling interval
CAPTURE_OFF_STEP = SAMPLING_STEPS + len(INTERVAL_STEPS) + 1
TRANSPORT = "transport"  # what no sensor accounts for: gRPC threads, the event loop, the spool
_STATUS_MAX = 500  # the collector refuses a sensor status over 512 characters
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Budget:
    cpu_percent: float = 1.0  # of one core; 0: CPU not watched
    rss_mb: float = 40.0  # 0: memory not watched
    window_s: float = 30.0
    recover_windows: int = 3

    @property
    def enabled(self) -> bool:
        return self.cpu_percent > 0 or self.rss_mb > 0


class Reading(NamedTuple):
    at_s: float  # monotonic
    cpu_s: float  # process CPU, reaped children included, since start
    rss_bytes: int
    sensors_cpu_s: dict[str, float]  # CPU attributed to each sensor since start


class Step(NamedTuple):
    """What the agent runs at: the effect of one degradation level."""

    level: int
    sampling: int  # capture summarizes 1 packet in this many
    interval_factor: int  # per-interval sensors run every interval_factor x the interval
    capture_off: bool

    def describe(self) -> str:
        if self.level == 0:
            return "full rate"
        parts = []
        if self.capture_off:
            parts.append("capture off")
        elif self.sampling > 1:
            parts.append(f"capture sampled 1/{self.sampling}")
        if self.interval_factor > 1:
            parts.append(f"intervals x{self.interval_factor}")
        return f"step {self.level}: " + ", ".join(parts)


def step(level: int, capture: bool) -> Step:
    """Level 0 is full rate; see the module docstring for the order."""
    sampling = 2 ** min(level, SAMPLING_STEPS) if capture else 1
    beyond = level - SAMPLING_STEPS
    factor = INTERVAL_STEPS[min(beyond, len(INTERVAL_STEPS)) - 1] if beyond > 0 else 1
    return Step(level, sampling, factor, capture and level >= CAPTURE_OFF_STEP)


def _applies(level: int, capture: bool) -> bool:
    return capture or SAMPLING_STEPS < level < CAPTURE_OFF_STEP or level == 0


class CpuLedger:
    """CPU seconds per sensor since start: main-thread sections timed around their work (with the
    children they ran), and whole threads read from /proc/self/task."""

    def __init__(
        self,
        thread_clock: Callable[[], float] = time.thread_time,
        children_clock: Callable[[], float] | None = None,
        thread_cpu: Callable[[int], float | None] | None = None,
    ) -> None:
        self._thread_clock = thread_clock
        self._children_clock = children_clock or children_cpu_s
        self._thread_cpu = thread_cpu or task_cpu_s
        self._spent: dict[str, float] = {}
        self._threads: dict[int, tuple[str, float]] = {}  # native id -> (sensor, last CPU read)

    @contextlib.contextmanager
    def measure(self, sensor: str) -> Iterator[None]:
        thread0, children0 = self._thread_clock(), self._children_clock()
        try:
            yield
        finally:
            spent = self._thread_clock() - thread0 + self._children_clock() - children0
            self._spent[sensor] = self._spent.get(sensor, 0.0) + spent

    def track_thread(self, sensor: str, native_id: int | None) -> None:
        """Count everything this thread spends (from now on, and before) to ``sensor``."""
        if native_id is not None and native_id not in self._threads:
            self._threads[native_id] = (sensor, 0.0)

    def totals(self) -> dict[str, float]:
        totals = dict(self._spent)
        for tid, (sensor, last) in list(self._threads.items()):
            now = self._thread_cpu(tid)
            if now is not None and now >= last:  # a thread gone keeps what it spent
                self._threads[tid] = (sensor, now)
                last = now
            totals[sensor] = totals.get(sensor, 0.0) + last
        return totals


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def task_cpu_s(native_id: int) -> float | None:
    """utime + stime of one of our threads; None once it has ended."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def read_process(ledger: CpuLedger, monotonic: Callable[[], float] = time.monotonic) -> Reading:
    """This process now: CPU (with reaped children), RSS, and the ledger's attribution."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = own.ru_utime + own.ru_stime + children_cpu_s()
    try:
        with open("/proc/self/statm", "rb") as fh:
            rss = int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        rss = 0
    return Reading(monotonic(), cpu, rss, ledger.totals())


def release_memory() -> None:
    """Collect garbage and hand free heap pages back to the kernel (glibc's malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing more to give back
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc is loaded already


class Judgment(NamedTuple):
    """The figures of one window."""

    cpu_percent: float
    rss_bytes: int
    top_sensor: str  # the sensor that spent the most CPU in the window
    top_percent: float


# Flow tables smaller than this are not worth shrinking (3/4 of it is what shrinking frees).
TABLES_WORTH_SHRINKING = 2 * MB


class SelfWatch:
    """The budget's state machine: ``observe`` once an interval; it says when the state changed."""

    def __init__(
        self,
        budget: Budget,
        read: Callable[[], Reading],
        *,
        has_capture: Callable[[], bool] = lambda: False,
        capture_memory: Callable[[], int] = lambda: 0,
        table_memory: Callable[[], int] = lambda: 0,
        release: Callable[[], None] = release_memory,
    ) -> None:
        self.budget = budget
        self._read = read
        self._has_capture = has_capture
        self._capture_memory = capture_memory  # bytes the capture holds (ring, tables): freed when off
        self._freed_by_capture_off = 0  # what turning the capture off for memory was to free
        # The level before that jump: the way back returns there at once, not through CPU steps never taken.
        self._level_before_capture_off: int | None = None
        self._table_memory = table_memory  # bytes the capture's flow tables hold: shrinking frees 3/4
        self._release = release
        self.level = 0
        self.tables_shrunk = False
        self._released = False  # memory was given back in this episode over the RSS budget
        self._history: deque[Reading] = deque()
        self._calm_since: float | None = None
        self.last: Judgment | None = None
        self._over = ""  # why the last step up was taken, "" when the last judgment was within budget
        self._capture_seen = False
        self._recovered_at: float | None = None  # when the last step back was taken
        self._patience = 1  # x recover_windows: doubled when a step back did not hold
        self._said_stuck = False  # "nothing left to give up" logged (once until a step back)

    @property
    def step(self) -> Step:
        return step(self.level, self._capture())

    def _capture(self) -> bool:
        # A capture the budget turned off still counts as there (to come back to).
        self._capture_seen = self._capture_seen or self._has_capture()
        return self._has_capture() or (self._capture_seen and self.level >= CAPTURE_OFF_STEP)

    def observe(self) -> bool:
        """Take this interval's reading; True when the agent must change what it runs."""
        if not self.budget.enabled:
            return False
        reading = self._read()
        history = self._history
        history.append(reading)
        while len(history) > 2 and history[1].at_s <= reading.at_s - self.budget.window_s:
            history.popleft()
        base = history[0]
        span = reading.at_s - base.at_s
        if span < self.budget.window_s:
            return False
        self.last = judgment = self._judge(base, reading, span)
        cpu_limit, rss_limit = self.budget.cpu_percent, self.budget.rss_mb * MB
        cpu_over = cpu_limit > 0 and judgment.cpu_percent > cpu_limit
        rss_over = rss_limit > 0 and judgment.rss_bytes > rss_limit
        if cpu_over or rss_over:
            self._calm_since = None
            if (
                self._recovered_at is not None
                and reading.at_s - self._recovered_at <= 2 * self.budget.window_s
            ):
                # Over again right after a step back: wait twice as long before the next one.
                self._patience = min(self._patience * 2, MAX_PATIENCE)
            self._recovered_at = None
            return self._degrade(judgment, cpu_over, rss_over)
        if self._recovered_at is not None and reading.at_s - self._recovered_at > 2 * self.budget.window_s:
            self._recovered_at = None  # the step back held: patience relaxes again
            self._patience = max(1, self._patience // 2)
        # Memory that cannot be shed (code, interpreter) keeps RSS near its floor, so it is calm under
        # 90 % of the budget, counting what the step back would take again (the capture's memory).
        comeback = self._freed_by_capture_off if self.level == CAPTURE_OFF_STEP else 0
        calm = (cpu_limit <= 0 or judgment.cpu_percent < RECOVER_FRACTION * cpu_limit) and (
            rss_limit <= 0 or judgment.rss_bytes + comeback < RSS_RECOVER_FRACTION * rss_limit
        )
        if not calm:
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = base.at_s
        if (
            reading.at_s - self._calm_since
            < self._patience * self.budget.recover_windows * self.budget.window_s
        ):
            return False
        self._calm_since = None
        self._released = self._said_stuck = False
        self._recovered_at = reading.at_s
        return self._recover(judgment)

    def _judge(self, base: Reading, now: Reading, span: float) -> Judgment:
        spent = {
            name: max(0.0, cpu - base.sensors_cpu_s.get(name, 0.0)) for name, cpu in now.sensors_cpu_s.items()
        }
        total = max(0.0, now.cpu_s - base.cpu_s)
        spent[TRANSPORT] = max(0.0, total - sum(spent.values()))
        top = max(spent, key=lambda name: spent[name])
        return Judgment(total / span * 100, now.rss_bytes, top, spent[top] / span * 100)

    def _degrade(self, judgment: Judgment, cpu_over: bool, rss_over: bool) -> bool:
        b, figures = self.budget, []
        if cpu_over:
            figures.append(
                f"cpu {judgment.cpu_percent:.2f}% > {b.cpu_percent:g}%"
                f" ({judgment.top_sensor} {judgment.top_percent:.2f}%)"
            )
        if rss_over:
            figures.append(f"rss {judgment.rss_bytes / MB:.1f} MB > {b.rss_mb:g} MB")
        self._over = "; ".join(figures)
        capture = self._capture()
        if rss_over and not self._released:
            self._released = True
            self._release()
            action = "memory given back (gc, malloc_trim)"
        elif (
            rss_over and capture and not self.tables_shrunk and self._table_memory() >= TABLES_WORTH_SHRINKING
        ):
            # Only tables that hold something: an idle host's near-empty tables would free nothing, and
            # a quarter of the capacity would cost a busy moment its flows.
            self.tables_shrunk = True
            action = "capture tables shrunk to a quarter"
        elif not cpu_over:
            # Over on memory alone: sampling and longer intervals free no memory, so the only step left
            # is the capture's ring and tables, and only when that would bring RSS under the budget.
            freed = self._capture_memory() if capture and self.level < CAPTURE_OFF_STEP else 0
            if not freed or judgment.rss_bytes - freed > b.rss_mb * MB:
                self._history = deque([self._history[-1]])
                self._over += "; nothing left that would bring it under"
                if not self._said_stuck:
                    self._said_stuck = True
                    log.warning("over the agent's budget: %s", self._over)
                return False
            self._level_before_capture_off = self.level
            self.level, self._freed_by_capture_off = CAPTURE_OFF_STEP, freed
            action = self.step.describe()
        else:
            level = next(
                (n for n in range(self.level + 1, CAPTURE_OFF_STEP + 1) if _applies(n, capture)), None
            )
            if level is None:
                # Nothing left to give up: keep running as we are, and keep saying so.
                self._history = deque([self._history[-1]])
                if not self._said_stuck:
                    self._said_stuck = True
                    log.warning("over the agent's budget: %s; nothing left to give up", self._over)
                return False
            self.level = level
            action = self.step.describe()
        log.warning("over the agent's budget: %s; %s", self._over, action)
        self._history = deque([self._history[-1]])  # judge the new state on its own figures
        return True

    def _recover(self, judgment: Judgment) -> bool:
        capture = self._capture()
        before, self._level_before_capture_off = self._level_before_capture_off, None
        if self.level == CAPTURE_OFF_STEP and before is not None:
            self.level = before
            action = self.step.describe() if self.level else "back to full rate"
        elif self.level > 0:
            self.level = max((n for n in range(self.level) if _applies(n, capture)), default=0)
            action = self.step.describe() if self.level else "back to full rate"
        elif self.tables_shrunk:
            self.tables_shrunk = False
            action = "capture tables back to full size"
        else:
            self._over = ""
            return False
        if self.level == 0 and not self.tables_shrunk:
            self._over = ""
        log.warning(
            "within the agent's budget (cpu %.2f%% of %g%%, rss %.1f of %g MB): %s",
            judgment.cpu_percent,
            self.budget.cpu_percent,
            judgment.rss_bytes / MB,
            self.budget.rss_mb,
            action,
        )
        self._history = deque([self._history[-1]])
        return True

    def status(self) -> str:
        """One line for the health fact's "budget" entry."""
        b = self.budget
        if not b.enabled:
            return "off: no budget (cpu and rss budgets are 0)"
        j = self.last
        degraded = self.level > 0 or self.tables_shrunk
        if j is None:
            return f"on: ok, measuring (first {b.window_s:g} s window)"
        figures = self._figures(j)
        if not degraded and not self._over:
            return f"on: ok, {figures}"
        what = [self.step.describe()] if self.level else []
        if self.tables_shrunk:
            what.append("capture tables shrunk")
        state = "; ".join(what) or "memory given back"
        if self._over and self._over_now(j):
            return clip_status(f"over: {self._over}; {state}")
        back = self._patience * b.recover_windows * b.window_s
        return clip_status(f"degraded: {figures}; {state}; one step back after {back:g} s well within budget")

    def _over_now(self, j: Judgment) -> bool:
        b = self.budget
        return (b.cpu_percent > 0 and j.cpu_percent > b.cpu_percent) or (
            b.rss_mb > 0 and j.rss_bytes > b.rss_mb * MB
        )

    def _figures(self, j: Judgment) -> str:
        b = self.budget
        cpu = f"cpu {j.cpu_percent:.2f}% of {b.cpu_percent:g}% ({j.top_sensor} {j.top_percent:.2f}%)"
        rss = f"rss {j.rss_bytes / MB:.1f} of {b.rss_mb:g} MB"
        return ", ".join(part for part, on in ((cpu, b.cpu_percent > 0), (rss, b.rss_mb > 0)) if on)


def report_degradation(
    sensors: dict[str, str], step: Step, interval_s: float, capturing: bool, capture_stopped: bool
) -> None:
    """Say in each degraded sensor's own entry what the budget took from it (nothing is off silently)."""
    factor = step.interval_factor
    sensors["interfaces"] = (
        f"on: every {interval_s * factor:g} s (x{factor} by the agent's CPU budget)" if factor > 1 else "on"
    )
    if capture_stopped:
        sensors["capture"] = "off: stopped by the agent's budget (its last step)"
    elif step.sampling > 1 and capturing:
        note = f"sampled 1 in {step.sampling} by the agent's CPU budget: figures are scaled estimates"
        sensors["capture"] = f"on: {note}"
        for name in ("flows", "access"):
            # Both are set afresh every tick from the capture's own status: the note is added once.
            if sensors.get(name, "").startswith("on"):
                sensors[name] = clip_status(f"{sensors[name]}; {note}")
    else:
        sensors.pop("capture", None)


def clip_status(text: str) -> str:
    """At most what the collector takes as a sensor status (it refuses a longer one)."""
    return text if len(text) <= _STATUS_MAX else text[: _STATUS_MAX - 1] + "…"

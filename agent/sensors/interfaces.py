"""Per-interface traffic over a sampling interval, from the kernel's cumulative counters.

The kernel only offers running totals; the agent reports what happened between two
readings, so this module turns totals into deltas and rates.

Why a monotonic clock: rates divide by the interval. The wall clock can jump (NTP
step, an operator fixing the date, a VM resumed from suspend), which would turn one
interval into a negative or hour-long one and produce absurd rates. The monotonic
clock only moves forward, so ``interval_ms`` is the real time the deltas cover. When
it does not advance at all we report nothing rather than divide by zero.

Why a wrap heuristic: a counter that went backwards either wrapped or was reset.
Some drivers still keep 32-bit counters that wrap at 2**32 (about 4 GiB, minutes on a
busy link); others keep 64-bit ones. A reset happens when a driver reinitialises or an
interface is deleted and re-created under the same name, and the counter restarts at
0. The two need different answers: after a wrap the delta is ``2**32 - old + new``,
after a reset it is ``new``, and guessing wrong either invents gigabytes or loses them.
A previous value in the top half of the 32-bit (or 64-bit) range was close enough to
the edge to have wrapped; anything lower went backwards because it restarted, and the
sample is flagged ``counter_reset`` so the collector knows it covers only the time
since the reset.

psutil is asked for raw counters (``nowrap=False``): its own wrap handling keeps a
process-wide cache and treats every decrease as a wrap, which would hide resets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import NamedTuple

import psutil

from agent.errors import SensorError

_WRAP_32 = 2**32
_WRAP_64 = 2**64
_LOOPBACK = "lo"


class InterfaceSample(NamedTuple):
    """What one interface did over one interval; every counter is a delta >= 0."""

    interface: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_errors: int
    tx_errors: int
    rx_drops: int
    tx_drops: int
    interval_ms: int
    rx_bps: float
    tx_bps: float
    speed_bps: int  # 0 when the kernel does not know (virtual interfaces)
    utilization: float  # max(rx_bps, tx_bps) / speed_bps; -1.0 when speed is unknown
    counter_reset: bool


class RawCounters(NamedTuple):
    """The cumulative counters of one interface as the OS reports them."""

    bytes_sent: int
    bytes_recv: int
    packets_sent: int
    packets_recv: int
    errin: int
    errout: int
    dropin: int
    dropout: int
    speed_mbps: int
    isup: bool


def read_counters() -> dict[str, RawCounters]:
    """Read every interface's counters and link speed; never raises for a vanished interface.

    Counters and link state come from two separate kernel queries, so an interface can
    disappear (or appear) between them. One without counters is left out: there is
    nothing to measure. One without link stats keeps its counters with speed 0, because
    its traffic is still real.
    """
    try:
        io = psutil.net_io_counters(pernic=True, nowrap=False)
    except OSError as exc:
        raise SensorError(f"cannot read interface counters: {exc.strerror or exc}") from exc
    try:
        stats = psutil.net_if_stats()
    except OSError:
        # psutil already skips interfaces gone by the time it asks (ENODEV); any other
        # failure costs us only the link speed this round, not the traffic figures.
        stats = {}
    readings: dict[str, RawCounters] = {}
    for name, nic in io.items():
        link = stats.get(name)
        readings[name] = RawCounters(
            bytes_sent=nic.bytes_sent,
            bytes_recv=nic.bytes_recv,
            packets_sent=nic.packets_sent,
            packets_recv=nic.packets_recv,
            errin=nic.errin,
            errout=nic.errout,
            dropin=nic.dropin,
            dropout=nic.dropout,
            speed_mbps=link.speed if link is not None else 0,
            isup=link.isup if link is not None else False,
        )
    return readings


def counter_delta(old: int, new: int) -> tuple[int, bool]:
    """Return (delta, reset) between two readings of one cumulative counter.

    A decrease is a wrap only when the previous value sat in the top half of the
    counter's range; otherwise the counter restarted and ``new`` is all that was
    counted since.
    """
    if new >= old:
        return new - old, False
    if _WRAP_32 // 2 < old < _WRAP_32:
        return _WRAP_32 - old + new, False
    if old > _WRAP_64 // 2:
        return _WRAP_64 - old + new, False
    return new, True


class InterfaceSampler:
    """Turns successive counter readings into per-interval samples.

    The first reading of an interface only primes the sampler; it is reported from the
    next call on. The OS and the clock are injectable so tests can drive both.
    """

    def __init__(
        self,
        read: Callable[[], dict[str, RawCounters]] = read_counters,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        include: Collection[str] = (),
        exclude_loopback: bool = True,
    ) -> None:
        self._read = read
        self._monotonic_ns = monotonic_ns
        self._include = frozenset(include)
        self._exclude_loopback = exclude_loopback
        self._previous: dict[str, RawCounters] = {}
        self._previous_ns: int | None = None

    def sample(self) -> list[InterfaceSample]:
        """Read the counters now and return one sample per interface seen last time too, by name."""
        current = {name: raw for name, raw in self._read().items() if self._wanted(name)}
        now_ns = self._monotonic_ns()
        if self._previous_ns is None:
            self._previous, self._previous_ns = current, now_ns
            return []
        elapsed_ns = now_ns - self._previous_ns
        if elapsed_ns <= 0:
            # Keep the old reading: the next call then covers the whole real interval.
            return []
        samples = [
            _sample(name, self._previous[name], raw, elapsed_ns)
            for name, raw in sorted(current.items())
            if name in self._previous
        ]
        # Replacing the whole map forgets vanished interfaces (a re-created one starts
        # afresh) and primes new ones.
        self._previous, self._previous_ns = current, now_ns
        return samples

    def set_interfaces(self, include: Collection[str]) -> None:
        """Watch only these interfaces from now on (empty: all but loopback), as policy says."""
        self._include = frozenset(include)

    def _wanted(self, name: str) -> bool:
        if self._include:
            return name in self._include  # naming an interface, loopback included, means watch it
        return not (self._exclude_loopback and name == _LOOPBACK)


def _sample(name: str, old: RawCounters, new: RawCounters, elapsed_ns: int) -> InterfaceSample:
    # In InterfaceSample's order: rx then tx for bytes, packets, errors, drops.
    changes = [
        counter_delta(before, after)
        for before, after in (
            (old.bytes_recv, new.bytes_recv),
            (old.bytes_sent, new.bytes_sent),
            (old.packets_recv, new.packets_recv),
            (old.packets_sent, new.packets_sent),
            (old.errin, new.errin),
            (old.errout, new.errout),
            (old.dropin, new.dropin),
            (old.dropout, new.dropout),
        )
    ]
    rx_bytes, tx_bytes, rx_packets, tx_packets, rx_errors, tx_errors, rx_drops, tx_drops = (
        delta for delta, _ in changes
    )
    # Rates use the exact interval; rounding to milliseconds first would skew short ones.
    seconds = elapsed_ns / 1e9
    rx_bps = rx_bytes * 8 / seconds
    tx_bps = tx_bytes * 8 / seconds
    # Drivers that do not know the speed report 0, and some -1.
    speed_bps = new.speed_mbps * 1_000_000 if new.speed_mbps > 0 else 0
    return InterfaceSample(
        interface=name,
        rx_bytes=rx_bytes,
        tx_bytes=tx_bytes,
        rx_packets=rx_packets,
        tx_packets=tx_packets,
        rx_errors=rx_errors,
        tx_errors=tx_errors,
        rx_drops=rx_drops,
        tx_drops=tx_drops,
        interval_ms=max(1, round(elapsed_ns / 1e6)),
        rx_bps=rx_bps,
        tx_bps=tx_bps,
        speed_bps=speed_bps,
        utilization=max(rx_bps, tx_bps) / speed_bps if speed_bps > 0 else -1.0,
        counter_reset=any(reset for _, reset in changes),
    )

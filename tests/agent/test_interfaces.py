"""InterfaceSampler against a scripted OS and clock, plus once against the real loopback."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from agent.sensors import interfaces
from agent.sensors.interfaces import InterfaceSample, InterfaceSampler, RawCounters, read_counters

SECOND_NS = 1_000_000_000


def raw(**counters: int) -> RawCounters:
    """Counters of an idle, up interface of unknown speed, with the given fields overridden."""
    fields: dict[str, Any] = dict.fromkeys(RawCounters._fields, 0)
    fields["isup"] = True
    fields.update(counters)
    return RawCounters(**fields)


class FakeHost:
    """The OS and the monotonic clock, both set by the test between samples."""

    def __init__(self) -> None:
        self.nics: dict[str, RawCounters] = {}
        self.now_ns = 5 * SECOND_NS

    def read(self) -> dict[str, RawCounters]:
        return dict(self.nics)

    def monotonic_ns(self) -> int:
        return self.now_ns

    def sampler(self, **options: Any) -> InterfaceSampler:
        return InterfaceSampler(read=self.read, monotonic_ns=self.monotonic_ns, **options)


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


def by_name(samples: list[InterfaceSample]) -> dict[str, InterfaceSample]:
    return {sample.interface: sample for sample in samples}


def test_first_sample_only_primes(host: FakeHost) -> None:
    host.nics = {"eth0": raw(bytes_recv=10_000, bytes_sent=5_000)}
    sampler = host.sampler()

    assert sampler.sample() == []

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["eth0"]


def test_deltas_and_rates_over_the_interval(host: FakeHost) -> None:
    host.nics = {
        "eth0": raw(
            bytes_recv=1_000,
            bytes_sent=2_000,
            packets_recv=10,
            packets_sent=20,
            errin=1,
            errout=2,
            dropin=3,
            dropout=4,
            speed_mbps=1_000,
        )
    }
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += 2 * SECOND_NS
    host.nics = {
        "eth0": raw(
            bytes_recv=9_000,
            bytes_sent=3_000,
            packets_recv=110,
            packets_sent=25,
            errin=2,
            errout=4,
            dropin=6,
            dropout=8,
            speed_mbps=1_000,
        )
    }

    assert sampler.sample() == [
        InterfaceSample(
            interface="eth0",
            rx_bytes=8_000,
            tx_bytes=1_000,
            rx_packets=100,
            tx_packets=5,
            rx_errors=1,
            tx_errors=2,
            rx_drops=3,
            tx_drops=4,
            interval_ms=2_000,
            rx_bps=32_000.0,
            tx_bps=4_000.0,
            speed_bps=1_000_000_000,
            utilization=32_000 / 1_000_000_000,
            counter_reset=False,
        )
    ]


def test_rates_use_the_exact_interval_not_the_rounded_one(host: FakeHost) -> None:
    host.nics = {"eth0": raw()}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += 1_600_000  # 1.6 ms, reported as 2 ms
    host.nics = {"eth0": raw(bytes_recv=200)}
    (sample,) = sampler.sample()

    assert sample.interval_ms == 2
    assert sample.rx_bps == pytest.approx(200 * 8 / 0.0016)


def test_sub_millisecond_interval_is_reported_as_one_ms(host: FakeHost) -> None:
    host.nics = {"eth0": raw()}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += 300_000
    host.nics = {"eth0": raw(bytes_sent=30)}
    (sample,) = sampler.sample()

    assert sample.interval_ms == 1
    assert sample.tx_bps == pytest.approx(30 * 8 / 0.0003)


@pytest.mark.parametrize(
    ("old", "new", "delta", "reset"),
    [
        pytest.param(2**32 - 100, 50, 150, False, id="32-bit wrap"),
        pytest.param(2**31 + 1, 0, 2**31 - 1, False, id="32-bit wrap from just above half range"),
        pytest.param(2**64 - 100, 50, 150, False, id="64-bit wrap"),
        pytest.param(2**63 + 1, 0, 2**63 - 1, False, id="64-bit wrap from just above half range"),
        pytest.param(5_000, 300, 300, True, id="reset from low value"),
        pytest.param(2**31, 10, 10, True, id="reset from exactly half the 32-bit range"),
        pytest.param(2**40, 7, 7, True, id="reset of a 64-bit counter far from its edge"),
        pytest.param(2**63, 7, 7, True, id="reset from exactly half the 64-bit range"),
        pytest.param(100, 100, 0, False, id="unchanged"),
    ],
)
@pytest.mark.parametrize(
    ("field", "reported_as"),
    [
        ("bytes_recv", "rx_bytes"),
        ("bytes_sent", "tx_bytes"),
        ("packets_recv", "rx_packets"),
        ("packets_sent", "tx_packets"),
        ("errin", "rx_errors"),
        ("errout", "tx_errors"),
        ("dropin", "rx_drops"),
        ("dropout", "tx_drops"),
    ],
)
def test_counter_going_backwards_is_a_wrap_or_a_reset(
    host: FakeHost, field: str, reported_as: str, old: int, new: int, delta: int, reset: bool
) -> None:
    host.nics = {"eth0": raw(**{field: old})}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(**{field: new})}
    (sample,) = sampler.sample()

    assert getattr(sample, reported_as) == delta
    assert sample.counter_reset is reset
    others = [name for name in InterfaceSample._fields[1:9] if name != reported_as]
    assert [getattr(sample, name) for name in others] == [0] * 7


def test_one_reset_counter_flags_the_sample_and_the_others_keep_their_own_delta(host: FakeHost) -> None:
    host.nics = {"eth0": raw(bytes_recv=2**32 - 10, packets_sent=500, bytes_sent=1_000)}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=20, packets_sent=3, bytes_sent=1_400)}
    (sample,) = sampler.sample()

    assert sample.counter_reset is True
    assert (sample.rx_bytes, sample.tx_packets, sample.tx_bytes) == (30, 3, 400)


def test_after_a_wrap_the_next_interval_starts_from_the_wrapped_value(host: FakeHost) -> None:
    host.nics = {"eth0": raw(bytes_recv=2**32 - 100)}
    sampler = host.sampler()
    sampler.sample()
    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=50)}
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=80)}
    (sample,) = sampler.sample()

    assert (sample.rx_bytes, sample.counter_reset) == (30, False)


def test_new_interface_is_primed_then_reported(host: FakeHost) -> None:
    host.nics = {"eth0": raw()}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=10), "eth1": raw(bytes_recv=1_000_000)}
    assert [s.interface for s in sampler.sample()] == ["eth0"]

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=20), "eth1": raw(bytes_recv=1_000_500)}
    assert [(s.interface, s.rx_bytes) for s in sampler.sample()] == [("eth0", 10), ("eth1", 500)]


def test_vanished_interface_is_dropped_and_primed_again_when_it_returns(host: FakeHost) -> None:
    host.nics = {"eth0": raw(), "eth1": raw(bytes_recv=9_000)}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=10)}
    assert [s.interface for s in sampler.sample()] == ["eth0"]

    # Re-created with counters from zero: primed afresh, so not mistaken for a reset.
    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=20), "eth1": raw(bytes_recv=100)}
    assert [s.interface for s in sampler.sample()] == ["eth0"]

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=30), "eth1": raw(bytes_recv=160)}
    eth1 = by_name(sampler.sample())["eth1"]
    assert (eth1.rx_bytes, eth1.counter_reset) == (60, False)


def test_samples_are_sorted_by_interface_name(host: FakeHost) -> None:
    host.nics = {name: raw() for name in ("wlan0", "eth1", "br0", "eth0")}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["br0", "eth0", "eth1", "wlan0"]


@pytest.mark.parametrize("step_ns", [0, -SECOND_NS], ids=["clock stalled", "clock went back"])
def test_clock_not_advancing_reports_nothing_and_keeps_the_old_reading(host: FakeHost, step_ns: int) -> None:
    host.nics = {"eth0": raw(bytes_recv=1_000)}
    sampler = host.sampler()
    sampler.sample()
    start_ns = host.now_ns

    host.now_ns = start_ns + step_ns
    host.nics = {"eth0": raw(bytes_recv=3_000), "eth1": raw()}
    assert sampler.sample() == []

    host.now_ns = start_ns + 4 * SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=5_000), "eth1": raw()}
    (sample,) = sampler.sample()
    assert (sample.interface, sample.rx_bytes, sample.interval_ms) == ("eth0", 4_000, 4_000)
    assert sample.rx_bps == 8_000.0


def test_include_keeps_only_the_named_interfaces(host: FakeHost) -> None:
    host.nics = {name: raw() for name in ("eth0", "eth1", "wlan0", "lo")}
    sampler = host.sampler(include=("eth1", "wlan0", "ppp0"))
    sampler.sample()

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["eth1", "wlan0"]


def test_loopback_is_excluded_by_default_and_only_lo_counts_as_loopback(host: FakeHost) -> None:
    host.nics = {name: raw() for name in ("eth0", "lo", "lowpan0")}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["eth0", "lowpan0"]


def test_loopback_is_reported_when_not_excluded(host: FakeHost) -> None:
    host.nics = {name: raw() for name in ("eth0", "lo")}
    sampler = host.sampler(exclude_loopback=False)
    sampler.sample()

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["eth0", "lo"]


def test_naming_loopback_explicitly_watches_it(host: FakeHost) -> None:
    # An admin (or the policy) who lists "lo" means it: exclusion is only the default.
    host.nics = {name: raw() for name in ("eth0", "lo", "eth1")}
    sampler = host.sampler(include=("lo", "eth0"))
    sampler.sample()

    host.now_ns += SECOND_NS
    assert [s.interface for s in sampler.sample()] == ["eth0", "lo"]


@pytest.mark.parametrize(
    ("rx_bytes", "tx_bytes", "expected"),
    [
        pytest.param(6_250_000, 1_250_000, 0.5, id="rx busier"),
        pytest.param(1_250_000, 12_500_000, 1.0, id="tx busier, saturated"),
        pytest.param(0, 0, 0.0, id="idle"),
    ],
)
def test_utilization_is_the_busier_direction_over_link_speed(
    host: FakeHost, rx_bytes: int, tx_bytes: int, expected: float
) -> None:
    host.nics = {"eth0": raw(speed_mbps=100)}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"eth0": raw(bytes_recv=rx_bytes, bytes_sent=tx_bytes, speed_mbps=100)}
    (sample,) = sampler.sample()

    assert sample.speed_bps == 100_000_000
    assert sample.utilization == pytest.approx(expected)


@pytest.mark.parametrize("speed_mbps", [0, -1], ids=["unknown", "driver says -1"])
def test_utilization_is_negative_when_speed_is_unknown(host: FakeHost, speed_mbps: int) -> None:
    host.nics = {"veth0": raw(speed_mbps=speed_mbps)}
    sampler = host.sampler()
    sampler.sample()

    host.now_ns += SECOND_NS
    host.nics = {"veth0": raw(bytes_recv=1_000_000, speed_mbps=speed_mbps)}
    (sample,) = sampler.sample()

    assert (sample.speed_bps, sample.utilization) == (0, -1.0)
    assert sample.rx_bps == 8_000_000.0


class Snetio(NamedTuple):
    """The shape of psutil's per-interface counters (its own class is private)."""

    bytes_sent: int
    bytes_recv: int
    packets_sent: int
    packets_recv: int
    errin: int
    errout: int
    dropin: int
    dropout: int


class Snicstats(NamedTuple):
    """The shape of psutil's link stats."""

    isup: bool
    duplex: int
    speed: int
    mtu: int
    flags: str


def snetio(n: int) -> Snetio:
    return Snetio(n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7)


def snicstats(speed: int) -> Snicstats:
    return Snicstats(True, psutil.NIC_DUPLEX_FULL, speed, 1500, "up,running")


def test_read_counters_tolerates_interfaces_vanishing_between_the_two_queries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: dict[str, Any] = {}

    def net_io_counters(**kwargs: Any) -> dict[str, Any]:
        asked.update(kwargs)
        return {"eth0": snetio(100), "eth1": snetio(200)}

    # eth1 vanished before its link stats were read; eth2 appeared after the counters were.
    monkeypatch.setattr(interfaces.psutil, "net_io_counters", net_io_counters)
    monkeypatch.setattr(
        interfaces.psutil, "net_if_stats", lambda: {"eth0": snicstats(1000), "eth2": snicstats(10)}
    )

    readings = read_counters()

    assert asked == {"pernic": True, "nowrap": False}
    assert readings == {
        "eth0": RawCounters(100, 101, 102, 103, 104, 105, 106, 107, speed_mbps=1000, isup=True),
        "eth1": RawCounters(200, 201, 202, 203, 204, 205, 206, 207, speed_mbps=0, isup=False),
    }
    assert all(type(reading) is RawCounters for reading in readings.values())


def test_read_counters_keeps_traffic_when_link_stats_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def net_if_stats() -> dict[str, Any]:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(interfaces.psutil, "net_io_counters", lambda **_: {"eth0": snetio(1)})
    monkeypatch.setattr(interfaces.psutil, "net_if_stats", net_if_stats)

    assert read_counters() == {"eth0": RawCounters(1, 2, 3, 4, 5, 6, 7, 8, speed_mbps=0, isup=False)}


def sysfs_lo(counter: str) -> int | None:
    path = Path("/sys/class/net/lo/statistics") / counter
    return int(path.read_text()) if path.exists() else None


def test_real_loopback_traffic_is_counted() -> None:
    datagrams, payload = 50, 1_000
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        sampler = InterfaceSampler(include=("lo",), exclude_loopback=False)

        sysfs_before = {name: sysfs_lo(name) for name in ("rx_bytes", "rx_packets", "tx_bytes")}
        assert sampler.sample() == []
        for _ in range(datagrams):
            sender.sendto(b"z" * payload, receiver.getsockname())
        for _ in range(datagrams):
            receiver.recv(payload)
        samples = sampler.sample()
        sysfs_after = {name: sysfs_lo(name) for name in ("rx_bytes", "rx_packets", "tx_bytes")}

    (lo,) = samples
    assert lo.interface == "lo"
    assert lo.rx_packets >= datagrams
    assert lo.tx_packets >= datagrams
    assert lo.rx_bytes >= datagrams * payload
    assert lo.tx_bytes >= datagrams * payload
    assert lo.rx_bps > 0
    assert lo.interval_ms >= 1
    assert (lo.speed_bps, lo.utilization, lo.counter_reset) == (0, -1.0, False)
    # The kernel's own counters, read just outside the sampled interval, bound what we saw.
    for counter, seen in (
        ("rx_bytes", lo.rx_bytes),
        ("rx_packets", lo.rx_packets),
        ("tx_bytes", lo.tx_bytes),
    ):
        before, after = sysfs_before[counter], sysfs_after[counter]
        if before is not None and after is not None:
            assert seen <= after - before

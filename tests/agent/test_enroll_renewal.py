"""Certificate renewal: when it is due (with an injected clock), and a real renewal over mTLS
against the minimal collector, after which the agent reconnects with the new certificate and
delivers everything it spooled."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from enroll_collector import MiniCollector

from agent.config import AgentConfig
from agent.credentials import Credentials, IssuedCertificate, StatePaths, load_credentials
from agent.enroll import EnrollOptions, enroll
from agent.renewal import Renewal, renewal_due_ms
from agent.runner import Agent
from agent.sensors.interfaces import InterfaceSampler, RawCounters
from agent.spool import Spool
from agent.transport import RenewError, Transport
from collector import pki

DAY_MS = 86_400_000
TOKEN = "zwt_" + "r" * 43


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    directory = tmp_path_factory.mktemp("authority") / "pki"
    pki.init_pki(directory)
    return pki.load_pki(directory)


@pytest.fixture
def collector(authority: pki.Pki) -> Iterator[MiniCollector]:
    with MiniCollector(authority, token=TOKEN) as server:
        yield server


def enrolled(collector: MiniCollector, state: Path, *, age: timedelta = timedelta(0)) -> Credentials:
    """Enroll for real; ``age`` backdates the certificate the collector issues."""
    collector.issue_age = age
    enroll(
        EnrollOptions(
            collector=collector.target,
            token=TOKEN,
            ca_fingerprint=collector.authority.ca_fingerprint,
            state_dir=state,
            hostname="ga-ws-01",
            enroll_port=collector.enroll_port,
            timeout_s=5,
        )
    )
    collector.issue_age = timedelta(0)
    return load_credentials(state)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(asyncio.wait_for(scenario, 20))
    finally:
        gc.collect()  # see tests/agent/test_transport.py: grpc objects in cycles, finalized now


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class FakeRenewer:
    """Only for the timing tests: records when the agent asks, and fails every time."""

    def __init__(self) -> None:
        self.calls = 0
        self.reconnects = 0

    async def renew(self, csr_pem: bytes, timeout_s: float = 30.0) -> IssuedCertificate:
        self.calls += 1
        raise RenewError("UNAVAILABLE", "Renew: UNAVAILABLE: collector storage is failing; retry later")

    def use_tls(self, tls: object) -> None:
        self.reconnects += 1


# --- when --------------------------------------------------------------------------------------


def test_renewal_is_due_at_two_thirds_of_the_lifetime_plus_a_bounded_spread() -> None:
    assert renewal_due_ms(1000, 1000 + 90 * DAY_MS, 0.0) == 1000 + 60 * DAY_MS
    latest = renewal_due_ms(1000, 1000 + 90 * DAY_MS, 0.999999)
    assert 1000 + 62 * DAY_MS < latest < 1000 + 63 * DAY_MS  # at most 1/30 of the lifetime later
    assert renewal_due_ms(0, 3 * DAY_MS, 0.5) == 2 * DAY_MS + DAY_MS // 20


def test_checks_are_about_hourly_and_jittered(tmp_path: Path, collector: MiniCollector) -> None:
    credentials = enrolled(collector, tmp_path / "state")
    draws = iter([0.0, 0.0, 0.999999, 0.5])
    renewal = Renewal(tmp_path / "state", credentials, FakeRenewer(), rand=lambda: next(draws))  # type: ignore[arg-type]
    assert [round(renewal.next_check_s()) for _ in range(3)] == [2700, 4500, 3600]


def test_the_agent_asks_only_when_due_and_never_with_an_expired_certificate(
    tmp_path: Path, collector: MiniCollector, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = enrolled(collector, tmp_path / "state")
    cert = credentials.certificate
    due = renewal_due_ms(cert.not_before_ms, cert.not_after_ms, 0.25)
    now = [due - 1]
    renewer = FakeRenewer()
    renewal = Renewal(
        tmp_path / "state",
        credentials,
        renewer,  # type: ignore[arg-type]
        clock_ms=lambda: now[0],
        rand=lambda: 0.25,
    )
    assert renewal.due_ms == due

    async def scenario() -> None:
        assert not await renewal.check()
        assert renewer.calls == 0
        assert renewal.status().startswith("on: expires in 29 d (")

        now[0] = due
        with caplog.at_level(logging.WARNING, logger="agent.renewal"):
            assert not await renewal.check()
        assert renewer.calls == 1 and renewer.reconnects == 0
        assert "certificate renewal failed (expires in 29 d)" in caplog.text
        assert renewal.status().startswith("renewal failing: expires in 29 d (")
        assert "last attempt: Renew: UNAVAILABLE: collector storage is failing" in renewal.status()

        now[0] = cert.not_after_ms - 3 * DAY_MS
        await renewal.check()  # still due: asked again
        assert renewer.calls == 2
        assert renewal.status().startswith("renewal failing: expires in 3 d (")

        now[0] = cert.not_after_ms + 2 * 3_600_000
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="agent.renewal"):
            assert not await renewal.check()
        assert renewer.calls == 2, "an expired certificate cannot renew over mTLS: do not try"
        assert renewal.status().startswith("expired ")
        assert "(2 h ago): the collector refuses this agent; enroll again" in renewal.status()
        assert "certificate expired" in caplog.text

    run(scenario())
    assert StatePaths.of(tmp_path / "state").cert.read_bytes() == credentials.tls.cert_pem


# --- a real renewal ----------------------------------------------------------------------------


def test_a_failed_renewal_is_retried_and_a_missing_request_is_made_again(
    tmp_path: Path, collector: MiniCollector
) -> None:
    state = tmp_path / "state"
    credentials = enrolled(collector, state, age=timedelta(days=61))  # due now
    paths = StatePaths.of(state)
    spool = Spool(state / "spool.db")
    transport = Transport(collector.target, spool, lambda: b"", tls=credentials.tls)
    renewal = Renewal(state, credentials, transport, rand=lambda: 0.0)

    async def scenario() -> None:
        collector.fail_renewals = 1
        assert not await renewal.check()
        assert "UNAVAILABLE" in renewal.last_error
        assert paths.cert.read_bytes() == credentials.tls.cert_pem

        paths.csr.unlink()
        assert await renewal.check()
        await transport.close()

    run(scenario())
    spool.close()
    (serial,) = collector.renewed
    assert pki.identity_of(paths.cert.read_bytes()).serial == serial
    assert (
        x509.load_pem_x509_csr(paths.csr.read_bytes()).public_key()
        == x509.load_pem_x509_certificate(paths.cert.read_bytes()).public_key()
    )
    renewed = load_credentials(state)
    assert renewed.agent_id == credentials.agent_id
    assert renewed.enrollment.renewed_ms > 0
    assert renewed.certificate.not_after_ms > credentials.certificate.not_after_ms + 60 * DAY_MS


def test_the_running_agent_renews_reconnects_and_loses_nothing(
    tmp_path: Path, collector: MiniCollector
) -> None:
    state = tmp_path / "state"
    credentials = enrolled(collector, state, age=timedelta(days=61))  # 2/3 of 90 days have passed
    old_serial = f"{credentials.certificate.serial:032x}"
    raw = {"eth0": RawCounters(0, 0, 0, 0, 0, 0, 0, 0, 1000, True)}
    sampler = InterfaceSampler(read=lambda: dict(raw), monotonic_ns=time.monotonic_ns)
    config = AgentConfig(
        collector=collector.target,
        state_dir=state,
        interval_s=0.1,
        interfaces=("eth0",),
        zone_accounting="off",
        flows=False,
        department="configured-but-ignored",
    )
    agent = Agent(config, credentials=credentials, sampler=sampler, rand=lambda: 0.0)
    assert agent.labels["department"] == "市公安局"  # the enrolled labels, not the configured ones
    assert agent.sensors["certificate"].startswith("renewing: expires in 28 d")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await eventually(lambda: len(collector.renewed) == 1, "the renewal")
            new_serial = collector.renewed[0]
            await eventually(
                lambda: any(serial == new_serial for _, serial, _ in collector.batches),
                "a batch delivered with the new certificate",
            )
            assert agent.sensors["certificate"].startswith("on: expires in 89 d")
        finally:
            stop.set()
            await task

    run(scenario())
    new_serial = collector.renewed[0]
    assert collector.report_serials[0] == old_serial
    assert collector.report_serials[-1] == new_serial
    assert pki.identity_of(StatePaths.of(state).cert.read_bytes()).serial == new_serial
    record = json.loads(StatePaths.of(state).enrollment.read_text(encoding="utf-8"))
    assert record["renewed_ms"] > 0 and record["agent_id"] == credentials.agent_id
    delivered = {seq for agent_id, _, seq in collector.batches if agent_id == credentials.agent_id}
    with Spool(state / "spool.db") as spool:
        left = [b.seq for b in spool.pending()]
        last = spool.stats().next_seq - 1
    assert delivered | set(left) == set(range(1, last + 1)), "every batch delivered or still spooled"

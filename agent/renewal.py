"""Keeping the agent's certificate fresh: renew over mTLS once 2/3 of its lifetime has passed.

The agent checks at start and then about every hour (each wait drawn from 45 to 75 minutes, so a
fleet started together drifts apart). A certificate is due for renewal at 2/3 of its lifetime plus
a per-certificate spread of up to 1/30 of it (three days of a 90-day certificate): agents enrolled
in the same minute do not all ask the collector in the same second, and each still has more than a
quarter of its lifetime left to retry. Renewal sends a certificate request for the same key over
the current mTLS connection; the new certificate is stored atomically and the transport reconnects
with it between two streams. A failed renewal is logged and tried again at the next check.

The request sent is the one made at enrollment (``tls/agent.csr``): it is for the same key and
never expires, and reusing it keeps OpenSSL's Python bindings (``cryptography``, about 9 MB of RSS
for the rest of the process's life) out of the running agent. Only when that file is missing, or
the collector refuses it, is a fresh one made, which imports cryptography once.

Once the certificate has expired the collector refuses the TLS handshake, Renew included: the
agent says so loudly (log and the ``certificate`` entry of its health fact) and must be enrolled
again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.credentials import Credentials, StatePaths, store_csr, store_renewed
from agent.errors import AgentError
from agent.transport import RenewError, Transport

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the certificate's lifetime
SPREAD = 1 / 30  # of the lifetime, at most, added per certificate
CHECK_EVERY_S = 3600.0
DAY_MS = 86_400_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def renewal_due_ms(not_before_ms: int, not_after_ms: int, spread: float) -> int:
    """When a certificate valid from ``not_before_ms`` to ``not_after_ms`` is due; spread in [0, 1)."""
    lifetime = max(0, not_after_ms - not_before_ms)
    return not_before_ms + int(lifetime * (RENEW_AT + SPREAD * spread))


class Renewal:
    def __init__(
        self,
        state_dir: Path,
        credentials: Credentials,
        transport: Transport,
        *,
        hostname: str = "",
        clock_ms: Callable[[], int] = wall_ms,
        rand: Callable[[], float] = random.random,
        check_every_s: float = CHECK_EVERY_S,
    ) -> None:
        self._paths = StatePaths.of(state_dir)
        self.credentials = credentials
        self._transport = transport
        self._hostname = hostname
        self._clock_ms = clock_ms
        self._rand = rand
        self._check_every_s = check_every_s
        self._spread = rand()
        self.last_error = ""
        self.renewals = 0

    @property
    def due_ms(self) -> int:
        cert = self.credentials.certificate
        return renewal_due_ms(cert.not_before_ms, cert.not_after_ms, self._spread)

    @property
    def not_after_ms(self) -> int:
        return self.credentials.certificate.not_after_ms

    def next_check_s(self) -> float:
        return self._check_every_s * (0.75 + 0.5 * self._rand())

    def status(self) -> str:
        """The ``certificate`` entry of the health fact."""
        return certificate_status(self.not_after_ms, self.due_ms, self._clock_ms(), self.last_error)

    async def check(self) -> bool:
        """Renew if due; True when a new certificate is in use. Never raises for a failed renewal."""
        now = self._clock_ms()
        if now >= self.not_after_ms:
            log.error("certificate %s", self.status())
            return False
        if now < self.due_ms:
            return False
        try:
            renewed = await self._renew(now)
        except AgentError as exc:
            self.last_error = str(exc)
            log.warning(
                "certificate renewal failed (%s): %s; trying again at the next check",
                f"expires in {duration(self.not_after_ms - now)}",
                exc,
            )
            return False
        self.credentials = renewed
        self._spread = self._rand()
        self.last_error = ""
        self.renewals += 1
        self._transport.use_tls(renewed.tls)
        log.info(
            "certificate renewed: serial %x, valid until %s; reconnecting with it",
            renewed.certificate.serial,
            format_ms(renewed.certificate.not_after_ms),
        )
        return True

    async def _renew(self, now: int) -> Credentials:
        try:
            csr = self._paths.csr.read_bytes()
        except OSError:
            csr = self._fresh_csr()
        try:
            issued = await self._transport.renew(csr)
        except RenewError as exc:
            if exc.code != "INVALID_ARGUMENT":
                raise
            log.warning("the collector refused the stored certificate request (%s); making a new one", exc)
            issued = await self._transport.renew(self._fresh_csr())
        return store_renewed(self._paths.state_dir, self.credentials, issued, now)

    def _fresh_csr(self) -> bytes:
        from agent import enroll_keys  # cryptography: only here, and only when there is no usable CSR

        csr = enroll_keys.make_csr(enroll_keys.load_key(self._paths.key), self._hostname)
        store_csr(self._paths, csr)
        return csr


def certificate_status(not_after_ms: int, due_ms: int, now_ms: int, last_error: str = "") -> str:
    """How the certificate stands, in words; "on: ..." only while nothing needs an operator's look."""
    if now_ms >= not_after_ms:
        return (
            f"expired {format_ms(not_after_ms)} ({duration(now_ms - not_after_ms)} ago): the collector"
            " refuses this agent; enroll again with `zonewatch-agent enroll --force`"
        )
    left = f"expires in {duration(not_after_ms - now_ms)} ({format_ms(not_after_ms)})"
    if now_ms < due_ms:
        return f"on: {left}, renewal from {format_ms(due_ms)}"
    if last_error:
        return f"renewal failing: {left}; last attempt: {last_error}"[:500]
    return f"renewing: {left}"


def format_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration(ms: int) -> str:
    """A rough, readable span: "3 d", "5 h", "12 min"."""
    if ms >= 2 * DAY_MS:
        return f"{ms // DAY_MS} d"
    if ms >= 2 * 3_600_000:
        return f"{ms // 3_600_000} h"
    return f"{max(0, ms) // 60_000} min"

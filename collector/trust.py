"""Who may speak: enrollment, the identity behind every stream, revocation while streams run.

The servicer asks; this module decides, with the PKI (pki.py) and the records in the database
(store/enrollment.py, reached through the writer process). Nothing here trusts what an agent
says about itself: the agent id is the one derived from the key of the client certificate that
TLS verified, and a hello claiming another is refused with PERMISSION_DENIED.

- Enrollment (no client certificate yet, on the enrollment port): a token and a CSR buy a
  certificate. Failed attempts are counted per source address; after ``max_failures`` within
  ``failure_window_ms`` that address is locked out for ``lockout_ms`` (RESOURCE_EXHAUSTED),
  so tokens cannot be guessed online.
- Admission (mTLS port): the certificate must be one this collector issued, not revoked, and
  name the agent the hello names.
- Revocation: ``agents revoke`` writes to the database; ``watch_revocations`` reads the new
  revocations every ``poll_s`` and sets the event of every stream using a revoked certificate,
  on which the servicer ends the stream with PERMISSION_DENIED. New streams are refused at
  admission. Effective within a second, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from collector import pki
from collector.errors import CollectorError, ValidationError
from collector.ingest import Ingest
from collector.store.enrollment import TokenRefused
from collector.validate import MAX_HOSTNAME_LEN, MAX_LABEL_LEN, text
from protos.zonewatch.v1 import agent_pb2

log = logging.getLogger(__name__)

MAX_TOKEN_LEN = 200
MAX_MACHINE_ID_LEN = 64


class Refusal(CollectorError):
    """The call is refused: answer with this gRPC status code name and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Admission(NamedTuple):
    agent_id: str
    serial: str
    # The enrolled role label; "collector" is a lower tier, which gets the rule pack and catalog.
    role: str = ""


class TrustStats(NamedTuple):
    enrolled: int
    renewed: int
    refused_enrollments: int
    locked_out: int
    revoked_streams: int


class Trust:
    def __init__(
        self,
        ingest: Ingest,
        authority: pki.Pki | None,
        *,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        certificate_days: int = 90,
        max_failures: int = 5,
        failure_window_ms: int = 600_000,
        lockout_ms: int = 900_000,
        poll_s: float = 0.5,
    ) -> None:
        self._ingest = ingest
        self.authority = authority
        self._clock_ms = clock_ms
        self._days = certificate_days
        self._max_failures = max_failures
        self._window_ms = failure_window_ms
        self._lockout_ms = lockout_ms
        self._poll_s = poll_s
        self._failures: dict[str, deque[int]] = defaultdict(deque)
        self._locked_until: dict[str, int] = {}
        # serial -> events of the streams using it, set when it is revoked
        self._streams: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._last_revocation = 0
        self.enrolled = self.renewed = self.refused_enrollments = self.locked_out = self.revoked_streams = 0

    @property
    def secure(self) -> bool:
        """False in the --insecure lab mode: no TLS, identities as the agents state them."""
        return self.authority is not None

    def stats(self) -> TrustStats:
        return TrustStats(
            self.enrolled, self.renewed, self.refused_enrollments, self.locked_out, self.revoked_streams
        )

    # --- enrollment --------------------------------------------------------------------------

    async def enroll(self, request: agent_pb2.EnrollRequest, peer: str) -> agent_pb2.EnrollResponse:
        if self.authority is None:
            raise Refusal(
                "FAILED_PRECONDITION", "this collector runs without TLS (--insecure): nothing to enroll"
            )
        source = peer_host(peer)
        now = self._clock_ms()
        locked_until = self._locked_until.get(source, 0)
        if locked_until > now:
            self.locked_out += 1
            wait_s = (locked_until - now) // 1000 + 1
            raise Refusal(
                "RESOURCE_EXHAUSTED", f"too many failed enrollments from {source}; try again in {wait_s} s"
            )
        try:
            token = text(request.token, "token", MAX_TOKEN_LEN, required=True)
            hostname = text(request.hostname, "hostname", MAX_HOSTNAME_LEN, required=True)
            machine_id = text(request.machine_id, "machine_id", MAX_MACHINE_ID_LEN)
            version = text(request.agent_version, "agent_version", MAX_LABEL_LEN)
            token_hash = pki.token_hash(token)
        except (ValidationError, pki.PkiError) as exc:
            self._failed(source, now)
            raise Refusal("INVALID_ARGUMENT" if isinstance(exc, ValidationError) else "PERMISSION_DENIED",
                          str(exc)) from exc  # fmt: skip
        try:
            # Signed first, recorded second: a token is used up only with the certificate in hand.
            issued = pki.sign_agent_csr(self.authority, request.csr_pem, labels={}, days=self._days)
        except pki.PkiError as exc:
            raise Refusal("INVALID_ARGUMENT", f"csr_pem: {exc}") from exc
        try:
            done = await self._ingest.enroll(
                token_hash,
                now_ms=now,
                agent_id=issued.agent_id,
                hostname=hostname,
                machine_id=machine_id,
                agent_version=version,
                serial=issued.serial,
                not_after_ms=_ms(issued.not_after),
            )
        except TokenRefused as exc:
            self._failed(source, now)
            raise Refusal("PERMISSION_DENIED", str(exc)) from exc
        except CollectorError as exc:
            log.error("cannot record an enrollment: %s", exc)
            raise Refusal("UNAVAILABLE", "collector storage is failing; retry later") from exc
        self._failures.pop(source, None)
        self.enrolled += 1
        replaced = f", replacing {done.replaced_agent_id}" if done.replaced_agent_id else ""
        log.info("enrolled agent %s (%s) from %s%s", issued.agent_id, hostname, source, replaced)
        labels = done.labels
        return agent_pb2.EnrollResponse(
            certificate_pem=issued.pem,
            ca_pem=self.authority.ca_cert_pem,
            agent_id=issued.agent_id,
            not_after_ms=_ms(issued.not_after),
            labels=agent_pb2.HostLabels(
                department=labels.department, county=labels.county, site=labels.site, role=labels.role
            ),
        )

    async def renew(
        self, request: agent_pb2.RenewRequest, auth: Mapping[str, Any]
    ) -> agent_pb2.EnrollResponse:
        if self.authority is None:
            raise Refusal(
                "FAILED_PRECONDITION", "this collector runs without TLS (--insecure): nothing to renew"
            )
        admitted = await self.admit(auth, None)
        try:
            issued = pki.sign_agent_csr(self.authority, request.csr_pem, labels={}, days=self._days)
        except pki.PkiError as exc:
            raise Refusal("INVALID_ARGUMENT", f"csr_pem: {exc}") from exc
        if issued.agent_id != admitted.agent_id:
            raise Refusal("PERMISSION_DENIED", "a renewal is for the same key: enroll a new key with a token")
        try:
            await self._ingest.renew(
                admitted.agent_id, admitted.serial, issued.serial, self._clock_ms(), _ms(issued.not_after)
            )
        except TokenRefused as exc:
            raise Refusal("PERMISSION_DENIED", str(exc)) from exc
        except CollectorError as exc:
            raise Refusal("UNAVAILABLE", "collector storage is failing; retry later") from exc
        self.renewed += 1
        return agent_pb2.EnrollResponse(
            certificate_pem=issued.pem,
            ca_pem=self.authority.ca_cert_pem,
            agent_id=issued.agent_id,
            not_after_ms=_ms(issued.not_after),
        )

    # --- admission ---------------------------------------------------------------------------

    async def admit(self, auth: Mapping[str, Any], claimed: str | None) -> Admission:
        """The identity of a call on the mTLS port; ``claimed`` (a hello's agent id) must match it."""
        pem = _first(auth.get("x509_pem_cert"))
        if not pem:
            raise Refusal("UNAUTHENTICATED", "no client certificate: enroll this agent first")
        try:
            identity = pki.identity_of(pem)
        except pki.PkiError as exc:
            raise Refusal("UNAUTHENTICATED", str(exc)) from exc
        if claimed is not None and claimed != identity.agent_id:
            raise Refusal(
                "PERMISSION_DENIED",
                f"this certificate belongs to agent {identity.agent_id}, not {claimed}",
            )
        try:
            status = await self._ingest.certificate(identity.serial)
        except CollectorError as exc:
            raise Refusal("UNAVAILABLE", "collector storage is failing; retry later") from exc
        if status is None or status.agent_id != identity.agent_id:
            raise Refusal("PERMISSION_DENIED", "this certificate was not issued by this collector's records")
        if status.revoked:
            raise Refusal("PERMISSION_DENIED", f"the certificate of agent {identity.agent_id} is revoked")
        return Admission(identity.agent_id, identity.serial, status.role)

    async def revoked_since_admission(self, admission: Admission) -> bool:
        """Looked up again once the stream is watched, so a revocation in between is not missed."""
        try:
            status = await self._ingest.certificate(admission.serial)
        except CollectorError:
            return False  # storage failing: the stream fails on its own
        return status is None or status.revoked

    def watch(self, serial: str) -> asyncio.Event:
        """An event set when ``serial`` is revoked; ``unwatch`` it when the stream ends."""
        event = asyncio.Event()
        self._streams[serial].add(event)
        return event

    def unwatch(self, serial: str, event: asyncio.Event) -> None:
        events = self._streams.get(serial)
        if events is not None:
            events.discard(event)
            if not events:
                del self._streams[serial]

    async def watch_revocations(self, stop: asyncio.Event) -> None:
        """Until ``stop``: end the streams of every certificate revoked since the last look."""
        if self.authority is None:
            return
        first = True
        while not stop.is_set():
            try:
                for revocation in await self._ingest.revocations_since(self._last_revocation):
                    self._last_revocation = revocation.id
                    if first:
                        continue  # revoked before we started: refused at admission anyway
                    for event in self._streams.pop(revocation.serial, set()):
                        self.revoked_streams += 1
                        event.set()
                    log.info("certificate %s of agent %s revoked: %s", revocation.serial,
                             revocation.agent_id, revocation.reason)  # fmt: skip
                first = False
            except CollectorError as exc:
                log.warning("cannot read revocations: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._poll_s)

    def _failed(self, source: str, now: int) -> None:
        self.refused_enrollments += 1
        failures = self._failures[source]
        failures.append(now)
        while failures and failures[0] <= now - self._window_ms:
            failures.popleft()
        if len(failures) >= self._max_failures:
            self._locked_until[source] = now + self._lockout_ms
            failures.clear()
            log.warning("enrollment locked for %s after %d failed attempts", source, self._max_failures)
        if len(self._failures) > 10_000:  # bounded memory against address-spraying
            oldest = min(self._failures, key=lambda k: self._failures[k][-1] if self._failures[k] else 0)
            del self._failures[oldest]


def peer_host(peer: str) -> str:
    """The address part of a grpc peer string: "ipv4:10.0.0.7:5000" -> "10.0.0.7", "ipv6:[::1]:5" -> "::1"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0]
    return peer


def _first(value: Any) -> bytes:
    if isinstance(value, (list, tuple)):
        return value[0] if value else b""
    return value or b""


def _ms(when: datetime) -> int:
    return int(when.astimezone(UTC).timestamp() * 1000)

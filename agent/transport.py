"""Delivery: the spool's batches to the collector, exactly once in effect.

One Report stream at a time. After the hello the collector says how far it has
settled this agent (so a batch committed but whose ack was lost is not sent
again); then batches go out ahead of their acks, up to a window. Every ack
deletes what it covers from the spool; a rejection discards that one batch (an
invalid batch would be refused forever) and is logged. Any failure ends the
stream; the next one starts after a jittered, bounded backoff and resends
whatever is still spooled.

With TLS credentials (an enrolled agent) the channel is mTLS: the collector is verified against
the pinned CA under its fixed name, and our certificate is our identity. A renewed certificate
takes effect by ending the current stream, closing the channel and opening a new one: unacked
batches stay in the spool and go out again on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from agent.backoff import Backoff
from agent.credentials import IssuedCertificate, TlsCredentials
from agent.errors import TransportError
from agent.policy import PolicyUpdate
from agent.spool import Spool
from agent.wire import (
    POLICY_METHOD,
    RENEW_METHOD,
    REPORT_METHOD,
    parse_issued,
    parse_response,
    policy_update,
    renew_request,
    renumber_payload,
)
from protos.zonewatch.v1 import agent_pb2

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # We do our own reconnect with jitter; keep grpc's own retry from hiding failures,
    # and its connection backoff (up to 120 s by default) from outlasting ours.
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]
# Every collector certificate names this, whatever address agents use to reach it; the CA is
# ours alone, so the name only has to be the same everywhere.
COLLECTOR_TLS_NAME = "zonewatch-collector"
TLS_OPTIONS = [("grpc.ssl_target_name_override", COLLECTOR_TLS_NAME)]


UNREACHABLE_MAX_S = 8.0


class RenewError(TransportError):
    """The collector did not renew our certificate; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TransportStats:
    def __init__(self) -> None:
        self.connected = False
        self.attempts = 0  # streams opened, welcomed or not
        self.sessions = 0  # streams the collector welcomed
        self.acked_seq = 0
        self.rejected = 0
        self.last_error = ""


class Transport:
    def __init__(
        self,
        target: str,
        spool: Spool,
        hello: Callable[[], bytes],
        *,
        window: int = 32,
        ack_timeout_s: float = 30.0,
        stream_max_s: float = 600.0,
        backoff: Backoff | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        tls: TlsCredentials | None = None,
    ) -> None:
        self._target = target
        self._tls = tls  # None: plaintext (a lab collector, or --insecure)
        self._new_tls: TlsCredentials | None = None
        self._reconnect = asyncio.Event()
        self._spool = spool
        self._hello = hello
        self._window = window
        self._ack_timeout = ack_timeout_s
        self._stream_max = stream_max_s
        self._backoff = backoff or Backoff()
        self._monotonic = monotonic
        self._wake = asyncio.Event()
        # Set when the collector's policy version differs from ours: the policy loop wakes on it.
        self.policy_changed = asyncio.Event()
        self.policy_version = ""  # the policy the agent runs; set when it applies one
        self._channel: grpc.aio.Channel | None = None
        self.stats = TransportStats()

    def notify(self) -> None:
        """New batches are in the spool."""
        self._wake.set()

    @property
    def secure(self) -> bool:
        return self._tls is not None

    def use_tls(self, tls: TlsCredentials) -> None:
        """Connect with these credentials from the next stream on; end the current one now."""
        self._new_tls = tls
        self._reconnect.set()
        self._wake.set()

    def _open_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._tls.ca_pem,
                    private_key=self._tls.key_pem,
                    certificate_chain=self._tls.cert_pem,
                )
                self._channel = grpc.aio.secure_channel(
                    self._target, credentials, options=CHANNEL_OPTIONS + TLS_OPTIONS
                )
        return self._channel

    async def _take_new_credentials(self) -> None:
        """Between streams: drop the connection made with the old certificate."""
        if self._new_tls is None:
            return
        self._tls, self._new_tls = self._new_tls, None
        self._reconnect.clear()
        old, self._channel = self._channel, None
        if old is not None:
            # A GetPolicy call in flight gets a moment to finish; the policy loop retries otherwise.
            await old.close(grace=2.0)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, reconnecting with backoff."""
        while not stop.is_set():
            unreachable = False
            try:
                await self._session(stop)
                self._backoff.reset()
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.stats.connected:
                    self.stats.connected = False
                    continue  # a stream's planned end: reconnect at once
                self.stats.last_error = f"{exc.code().name}: {exc.details()}"
                unreachable = exc.code() == grpc.StatusCode.UNAVAILABLE and "storage" not in (
                    exc.details() or ""
                )
            except TransportError as exc:
                self.stats.last_error = str(exc)
            except Exception as exc:
                # Whatever ended the stream (a write racing the collector's close raises
                # InvalidStateError, a full disk SpoolError), delivery must go on.
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self.stats.connected = False
            # A collector we cannot reach (network down, collector stopped) is tried again at least
            # every UNREACHABLE_MAX_S, so delivery resumes within seconds of the link healing; one
            # that answers but refuses (storage failing, too many streams) gets up to the full 60 s.
            delay = self._backoff.next_delay(UNREACHABLE_MAX_S if unreachable else None)
            log.warning("collector %s: %s; retrying in %.1f s", self._target, self.stats.last_error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, stop: asyncio.Event) -> None:
        await self._take_new_credentials()
        self.stats.attempts += 1
        channel = self._open_channel()
        call = channel.stream_stream(
            REPORT_METHOD, request_serializer=None, response_deserializer=parse_response
        )(timeout=self._stream_max)
        try:
            await call.write(self._hello())
            first = await call.read()
            if first is grpc.aio.EOF:
                raise TransportError("the collector closed the stream before welcoming us")
            if first.WhichOneof("body") != "welcome":
                raise TransportError(f"expected a welcome, got {first.WhichOneof('body')}")
            acked = first.welcome.acked_seq
            next_seq = self._spool.stats().next_seq
            if acked >= next_seq:
                # The collector settled numbers this spool never handed out: the spool lost its
                # history. Reusing those numbers would make new batches look like replays.
                moved = self._spool.renumber_from(acked + 1, renumber_payload)
                log.warning(
                    "spool restarted at %d but the collector holds up to %d: renumbered %d batches from %d",
                    next_seq,
                    acked,
                    moved,
                    acked + 1,
                )
            self._spool.acknowledge(acked)
            self.stats.connected = True
            self.stats.sessions += 1
            self.stats.acked_seq = acked
            inflight: dict[int, float] = {}
            sender = asyncio.create_task(self._send(call, acked, inflight, stop))
            receiver = asyncio.create_task(self._receive(call, inflight))
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not sender.cancelled() and sender.exception() is None:
                receiver.cancel()  # asked to stop: whatever the receiver would say next is not an error
            else:
                sender.cancel()
            await asyncio.wait({sender, receiver})
            errors = [e for t in (sender, receiver) if not t.cancelled() and (e := t.exception()) is not None]
            if errors:
                # The collector's status says most; then our own diagnosis; then anything else.
                errors.sort(key=lambda e: 0 if isinstance(e, grpc.aio.AioRpcError) else
                            1 if isinstance(e, TransportError) else 2)  # fmt: skip
                raise errors[0]
        finally:
            call.cancel()

    async def _send(
        self, call: grpc.aio.StreamStreamCall, after: int, inflight: dict[int, float], stop: asyncio.Event
    ) -> None:
        sent_upto = after
        # A renewed certificate ends the stream as stop does: cleanly, the spool untouched.
        while not stop.is_set() and not self._reconnect.is_set():
            self._wake.clear()
            room = self._window - len(inflight)
            batches = self._spool.pending(after_seq=sent_upto, limit=room) if room > 0 else []
            for batch in batches:
                await call.write(batch.payload)
                inflight[batch.seq] = self._monotonic()
                sent_upto = batch.seq
            if inflight and self._monotonic() - min(inflight.values()) > self._ack_timeout:
                raise TransportError(f"no ack within {self._ack_timeout:.0f} s")
            if not batches or len(inflight) >= self._window:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
        await call.done_writing()

    async def _receive(self, call: grpc.aio.StreamStreamCall, inflight: dict[int, float]) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise TransportError("the collector ended the stream")
            kind = response.WhichOneof("body")
            if kind == "ack":
                acked = response.ack.acked_seq
                served = response.ack.policy_version
                if served and served != self.policy_version:
                    self.policy_changed.set()
                self._spool.acknowledge(acked)
                self._backoff.reset()  # the collector stores again: the next failure is a new outage
                self.stats.acked_seq = max(self.stats.acked_seq, acked)
                for seq in [s for s in inflight if s <= acked]:
                    del inflight[seq]
            elif kind == "rejection":
                rejection = response.rejection
                self.stats.rejected += 1
                log.error(
                    "collector rejected batch %d (%s): %s", rejection.seq, rejection.field, rejection.message
                )
                if rejection.seq and rejection.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                    self._spool.discard(rejection.seq)
                inflight.pop(rejection.seq, None)
                if rejection.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                    raise TransportError(f"collector refused batch {rejection.seq}: {rejection.message}")
            self._wake.set()

    async def get_policy(
        self, current_version: str, agent_id: str, timeout_s: float = 10.0
    ) -> PolicyUpdate | None:
        """The collector's policy if it differs from current_version, else None."""
        response = await self.get_policy_response(current_version, agent_id, timeout_s)
        if response.unchanged:
            return None
        try:
            return policy_update(response)
        except ValueError as exc:
            raise TransportError(f"GetPolicy: the collector sent a policy we cannot use: {exc}") from exc

    async def get_policy_response(
        self, current_version: str, agent_id: str, timeout_s: float = 10.0
    ) -> agent_pb2.GetPolicyResponse:
        """GetPolicy as the collector answered it (a lower-tier collector reads what agents ignore)."""
        channel = self._open_channel()
        method = channel.unary_unary(
            POLICY_METHOD,
            request_serializer=agent_pb2.GetPolicyRequest.SerializeToString,
            response_deserializer=agent_pb2.GetPolicyResponse.FromString,
        )
        try:
            response: agent_pb2.GetPolicyResponse = await method(
                agent_pb2.GetPolicyRequest(agent_id=agent_id, current_version=current_version),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise TransportError(f"GetPolicy: {exc.code().name}: {exc.details()}") from exc
        return response

    async def renew(self, csr_pem: bytes, timeout_s: float = 30.0) -> IssuedCertificate:
        """A fresh certificate for our key, asked for over the current mTLS connection."""
        channel = self._open_channel()
        method = channel.unary_unary(RENEW_METHOD, request_serializer=None, response_deserializer=None)
        try:
            data = await method(renew_request(csr_pem), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RenewError(exc.code().name, f"Renew: {exc.code().name}: {exc.details()}") from exc
        try:
            return parse_issued(data)
        except ValueError as exc:  # protobuf's DecodeError is a ValueError
            raise RenewError("INTERNAL", f"Renew: the collector's answer cannot be parsed: {exc}") from exc

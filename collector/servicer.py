"""The AgentService servicer: the only collector code that sees a gRPC context.

It stays thin: parse leniently, validate (validate.py), hand to the group
commit (ingest.py), answer in order. A Report stream keeps several batches in
flight so one agent's round trip does not wait for another's fsync, and an
invalid batch is answered in-band with a Rejection so the stream lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from collector import validate
from collector.errors import CollectorError, ValidationError
from collector.ingest import Ingest
from collector.model import Settled
from collector.policy import AgentPolicy, PolicySource
from collector.store.incidents import AGENT_CLONE, Raise
from collector.store.writer import Rejected
from collector.tiers_pack import COLLECTOR_ROLE, RulePack, catalog_yaml
from collector.trust import Admission, Refusal, Trust, peer_host
from collector.zones import ZoneCatalog
from protos.zonewatch.v1 import agent_pb2

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=Message)

SERVICE = "zonewatch.v1.AgentService"
# Batches one stream may have between receipt and ack; beyond it we stop
# reading, and HTTP/2 flow control pushes back on the agent.
MAX_IN_FLIGHT_PER_STREAM = 64


class Unparseable:
    """A request whose bytes are not a ReportRequest (bad UTF-8, truncated, ...)."""

    def __init__(self, error: str) -> None:
        self.error = error


def lenient(message: type[_M]) -> Callable[[bytes], _M | Unparseable]:
    """A deserializer that answers Unparseable instead of raising.

    Parsing here instead of in grpc's own deserializer keeps a malformed message (bad UTF-8,
    truncated) from killing the call with INTERNAL: it gets a clear status, or on a Report
    stream an in-band rejection.
    """

    def parse(data: bytes) -> _M | Unparseable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Unparseable(str(exc) or "cannot parse message")

    return parse


parse_report_request = lenient(agent_pb2.ReportRequest)
parse_enroll_request = lenient(agent_pb2.EnrollRequest)
parse_renew_request = lenient(agent_pb2.RenewRequest)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _refuse(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
    await context.abort(grpc.StatusCode[refusal.code], refusal.message)


class RateLimit:
    """A token bucket of facts per second for one agent's stream.

    Over its rate the stream is simply read later: HTTP/2 flow control stops the agent once
    its window of unacknowledged batches is full, and the excess waits in its spool. Nothing
    is refused, so nothing is lost, and the other agents' streams are not slowed.
    """

    def __init__(self, facts_per_s: float, burst_facts: float, monotonic: Callable[[], float]) -> None:
        self._rate = facts_per_s
        self._burst = burst_facts
        self._monotonic = monotonic
        self._tokens = burst_facts
        self._at = monotonic()

    def delay_for(self, facts: int) -> float:
        """Take ``facts`` from the bucket; the seconds to wait before reading more (0: none)."""
        now = self._monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        self._tokens -= facts
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class AgentService:
    def __init__(
        self,
        ingest: Ingest,
        policy: PolicySource,
        trust: Trust | None = None,
        clock_ms: Callable[[], int] = now_ms,
        *,
        agent_facts_per_s: float = 2_000.0,
        agent_burst_facts: float | None = None,
        max_streams: int = 20_000,
        hello_timeout_s: float = 30.0,
        rule_pack: RulePack | None = None,
    ) -> None:
        self._ingest = ingest
        self._policy = policy
        # Lower-tier collectors (role "collector") get the rule pack and catalog with the policy, under
        # a version of their own that changes with the pack (tiers_pack.py).
        self._rule_pack = rule_pack
        self._tier_reply: tuple[str, bytes] = ("", b"")
        self._trust = trust or Trust(ingest, None)
        self._agent_rate = agent_facts_per_s
        self._agent_burst = agent_burst_facts if agent_burst_facts is not None else 10 * agent_facts_per_s
        self._max_streams = max_streams
        self._hello_timeout = hello_timeout_s
        # agent id -> {peer address: open streams}: one identity used from two places is a clone.
        self._streams: dict[str, dict[str, int]] = {}
        self.open_streams = 0
        self.throttled_s = 0.0
        # The serialized answer for the policy in force, built once per version: thousands
        # of agents ask for the same catalog.
        self._policy_reply: tuple[str, bytes] = ("", b"")
        self._clock_ms = clock_ms
        self._confirmed: dict[str, str] = {}

    @property
    def connected_agents(self) -> int:
        """Agents with at least one Report stream open (for /metrics)."""
        return len(self._streams)

    async def report(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        admission: Admission | None = None
        if self._trust.secure:
            # Before anything else, and before it takes a slot: a caller without a certificate of
            # ours (the enrollment port asks for none) must not hold streams open.
            try:
                admission = await self._trust.admit(context.auth_context(), None)
            except Refusal as refusal:
                await self._refuse(context, refusal, "", "admission", context.peer())
        if self.open_streams >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the collector serves {self._max_streams} agent streams at most; retry later",
            )
        self.open_streams += 1
        try:
            await self._report(context, admission)
        finally:
            self.open_streams -= 1

    async def _report(self, context: grpc.aio.ServicerContext, admission: Admission | None) -> None:
        peer = context.peer()
        try:
            first = await asyncio.wait_for(context.read(), self._hello_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {self._hello_timeout:g} s"
            )
        if first is grpc.aio.EOF:
            return
        if isinstance(first, Unparseable) or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "the first message of a Report stream must be a hello"
            )
        try:
            hello = validate.hello(first.hello, self._clock_ms())
        except ValidationError as exc:
            self._record(
                Rejected(
                    first.hello.agent_id[:128], 0, self._clock_ms(), exc.code, exc.field, exc.message, peer
                )
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if admission is not None and hello.agent_id != admission.agent_id:
            refusal = Refusal(
                "PERMISSION_DENIED",
                f"this certificate belongs to agent {admission.agent_id}, not {hello.agent_id}",
            )
            await self._refuse(context, refusal, hello.agent_id, "admission", peer)
        try:
            acked = await self._ingest.register(hello, self._clock_ms(), enrolled=admission is not None)
        except CollectorError as exc:
            log.error("cannot register agent %s: %s", hello.agent_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "collector storage is failing; retry later")
        await context.write(
            agent_pb2.ReportResponse(
                welcome=agent_pb2.Welcome(
                    acked_seq=acked,
                    policy_version=self._announced_version(admission),
                    server_time_ms=self._clock_ms(),
                )
            )
        )
        replies: asyncio.Queue[asyncio.Future[Settled | Rejected] | None] = asyncio.Queue(
            MAX_IN_FLIGHT_PER_STREAM
        )
        await self._note_stream(hello.agent_id, peer, +1)
        # Tier facts are taken only from a certificate enrolled as a collector (never from a hello's claim).
        enrolled_role = admission.role if admission is not None else ""
        receiver = asyncio.create_task(self._receive(hello.agent_id, peer, replies, context, enrolled_role))
        sender = asyncio.create_task(
            self._send_replies(replies, context, lambda: self._announced_version(admission))
        )
        revoked = self._trust.watch(admission.serial) if admission else asyncio.Event()
        if admission is not None and await self._trust.revoked_since_admission(admission):
            revoked.set()  # revoked while we were registering it: the poller may have passed it by
        revocation = asyncio.create_task(revoked.wait())
        try:
            await asyncio.wait({receiver, sender, revocation}, return_when=asyncio.FIRST_COMPLETED)
            if revoked.is_set():
                storage_ok = True  # ended below: what was acked so far stays acked
            elif receiver.done() and not receiver.cancelled() and receiver.exception() is None:
                await replies.put(None)  # the agent is done sending: answer what is in flight
                storage_ok = await sender
            elif receiver.done() and isinstance(receiver.exception(), CollectorError):
                storage_ok = False
            elif receiver.done():
                receiver.result()  # the stream broke (cancelled by the agent): let grpc see why
                storage_ok = True
            else:
                storage_ok = sender.result()
        finally:
            for task in (receiver, sender, revocation):
                task.cancel()
            await asyncio.gather(receiver, sender, revocation, return_exceptions=True)
            if admission is not None:
                self._trust.unwatch(admission.serial, revoked)
            await self._note_stream(hello.agent_id, peer, -1)
        if revoked.is_set():
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"the certificate of agent {hello.agent_id} was revoked"
            )
        if not storage_ok:
            # Nothing unacknowledged is lost: the agent keeps it and retries after its backoff.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "collector storage is failing; retry later")

    async def _receive(
        self,
        agent_id: str,
        peer: str,
        replies: asyncio.Queue[asyncio.Future[Settled | Rejected] | None],
        context: grpc.aio.ServicerContext,
        enrolled_role: str = "",
    ) -> None:
        stream_last = 0
        limit = RateLimit(self._agent_rate, self._agent_burst, time.monotonic)
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            received = self._clock_ms()
            if isinstance(request, Unparseable):
                item: Any = Rejected(
                    agent_id,
                    0,
                    received,
                    "INVALID_ARGUMENT",
                    "request",
                    f"not a zonewatch.v1.ReportRequest: {request.error}",
                    peer,
                )
            elif request.WhichOneof("body") != "batch":
                item = Rejected(
                    agent_id,
                    0,
                    received,
                    "FAILED_PRECONDITION",
                    "request",
                    "only batches may follow the hello on a Report stream",
                    peer,
                )
            elif request.batch.seq <= stream_last and request.batch.seq != 0:
                item = Rejected(
                    agent_id,
                    request.batch.seq,
                    received,
                    "FAILED_PRECONDITION",
                    "batch.seq",
                    f"sequence {request.batch.seq} is not greater than {stream_last}, the previous "
                    "batch on this stream",
                    peer,
                )
            else:
                try:
                    item = validate.batch(request.batch, agent_id, received)
                    if item.tier_rows:
                        item = dataclasses.replace(item, sender_role=enrolled_role)
                    stream_last = item.seq
                except ValidationError as exc:
                    seq = request.batch.seq
                    # A sequence beyond int64 cannot be stored, not even in the rejection's row.
                    in_range = 0 < seq <= validate.INT64_MAX
                    item = Rejected(
                        agent_id, seq if in_range else 0, received, exc.code, exc.field, exc.message, peer
                    )
                    if in_range:
                        stream_last = seq
            try:
                future = self._ingest.submit(item)
            except CollectorError as exc:
                log.error("storage failing, refusing batches: %s", exc)
                raise
            await replies.put(future)
            facts = item.fact_count if not isinstance(item, Rejected) else 1
            if (delay := limit.delay_for(facts)) > 0:
                # Over its rate: read this agent's next batch later. Its spool holds the rest.
                self.throttled_s += delay
                await asyncio.sleep(delay)

    async def _send_replies(
        self,
        replies: asyncio.Queue[asyncio.Future[Settled | Rejected] | None],
        context: grpc.aio.ServicerContext,
        announced_version: Callable[[], str],
    ) -> bool:
        """Answer each batch in order; False as soon as storage fails (the stream must end)."""
        while (future := await replies.get()) is not None:
            try:
                outcome = await future
            except CollectorError:
                return False
            if isinstance(outcome, Rejected):
                reply = agent_pb2.ReportResponse(
                    rejection=agent_pb2.Rejection(
                        seq=outcome.seq,
                        code=grpc.StatusCode[outcome.code].value[0],
                        message=outcome.message,
                        field=outcome.field,
                    )
                )
            else:
                reply = agent_pb2.ReportResponse(
                    ack=agent_pb2.Ack(
                        acked_seq=outcome.acked_seq,
                        duplicate=outcome.duplicate,
                        policy_version=announced_version(),
                    )
                )
            try:
                await context.write(reply)
            except Exception:  # the stream went away; the agent will resend what it missed
                return True
        return True

    def _is_tier(self, role: str) -> bool:
        return role == COLLECTOR_ROLE and self._rule_pack is not None

    def _announced_version(self, admission: Admission | None) -> str:
        """The policy version a client is told in Welcome and Ack: a lower tier's includes the pack."""
        version = self._policy.policy.version
        if admission is not None and self._is_tier(admission.role):
            assert self._rule_pack is not None
            return self._rule_pack.version(version)
        return version

    def _record(self, rejected: Rejected) -> None:
        with contextlib.suppress(CollectorError):
            self._ingest.submit(rejected)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, refusal: Refusal, agent_id: str, field: str, peer: str
    ) -> None:
        """Record the refusal (rejections, by reason, for `health`) and end the call with it."""
        self._record(
            Rejected(agent_id[:128], 0, self._clock_ms(), refusal.code, field, refusal.message, peer)
        )
        await _refuse(context, refusal)

    async def _note_stream(self, agent_id: str, peer: str, change: int) -> None:
        """Count the agent's open streams per address; a second address at once is a cloned identity."""
        host = peer_host(peer)
        places = self._streams.setdefault(agent_id, {})
        places[host] = places.get(host, 0) + change
        if places[host] <= 0:
            del places[host]
        if not places:
            del self._streams[agent_id]
        elif change > 0 and len(places) > 1:
            others = sorted(set(places) - {host})
            log.warning("agent %s reports from %s and %s at once", agent_id, host, ", ".join(others))
            incident = Raise(
                AGENT_CLONE,
                agent_id,
                None,
                "high",
                f"agent {agent_id[:12]} reports from {len(places)} places at once: a cloned host or a "
                "stolen certificate",
                {"agent_id": agent_id, "addresses": sorted(places), "evidence": "concurrent streams"},
                self._clock_ms(),
            )
            try:
                await self._ingest.raise_incident(incident)
            except CollectorError as exc:
                log.error("cannot store the clone incident: %s", exc)

    async def get_policy(
        self, request: agent_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            agent_id, current = validate.policy_request(request)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        role = ""
        if self._trust.secure:
            try:
                admitted = await self._trust.admit(context.auth_context(), agent_id or None)
            except Refusal as refusal:
                await self._refuse(context, refusal, agent_id, "admission", context.peer())
            agent_id, role = admitted.agent_id, admitted.role
        policy = self._policy.policy
        version = policy.version
        if self._is_tier(role):
            assert self._rule_pack is not None
            version = self._rule_pack.version(version)
        if current == version:
            # The agent confirms it runs this version: record it once, not on every poll.
            if agent_id and self._confirmed.get(agent_id) != version:
                try:
                    if await self._ingest.note_policy_version(agent_id, version):
                        self._confirmed[agent_id] = version
                except CollectorError as exc:
                    log.warning("cannot record policy version: %s", exc)
            return agent_pb2.GetPolicyResponse(version=version, unchanged=True).SerializeToString()
        if self._is_tier(role):
            return self._tier_policy_reply(version, policy)
        if self._policy_reply[0] != version:
            reply = agent_pb2.GetPolicyResponse(
                version=version, policy=policy_message(policy, self._policy.catalog)
            )
            self._policy_reply = (version, reply.SerializeToString())
        return self._policy_reply[1]

    def _tier_policy_reply(self, version: str, policy: AgentPolicy) -> bytes:
        """The agents' policy plus the rule pack and catalog in force here, built once per version."""
        if self._tier_reply[0] != version:
            assert self._rule_pack is not None
            catalog = self._policy.catalog
            message = policy_message(policy, catalog)
            for name, text in self._rule_pack.files:
                message.rule_pack.add(name=name, text=text)
            message.catalog_yaml = catalog_yaml(catalog) if catalog is not None else ""
            reply = agent_pb2.GetPolicyResponse(version=version, policy=message)
            self._tier_reply = (version, reply.SerializeToString())
        return self._tier_reply[1]

    async def enroll(
        self, request: agent_pb2.EnrollRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        return await self._issue(request, context, "Enroll", lambda r: self._trust.enroll(r, context.peer()))

    async def renew(
        self, request: agent_pb2.RenewRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        return await self._issue(
            request, context, "Renew", lambda r: self._trust.renew(r, context.auth_context())
        )

    async def _issue(
        self,
        request: _M | Unparseable,
        context: grpc.aio.ServicerContext,
        kind: str,
        call: Callable[[_M], Awaitable[agent_pb2.EnrollResponse]],
    ) -> agent_pb2.EnrollResponse:
        """Enroll and Renew (``kind``): a certificate from the trust module, or the status refusing it."""
        if isinstance(request, Unparseable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a zonewatch.v1.{kind}Request: {request.error}"
            )
            raise AssertionError("not reached: abort raises")
        try:
            return await call(request)
        except Refusal as refusal:
            await self._refuse(context, refusal, "", kind.lower(), context.peer())
            raise AssertionError("not reached: abort raises") from refusal

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Report": grpc.stream_stream_rpc_method_handler(
                    self.report,
                    request_deserializer=parse_report_request,
                    response_serializer=agent_pb2.ReportResponse.SerializeToString,
                ),
                "GetPolicy": grpc.unary_unary_rpc_method_handler(
                    self.get_policy,
                    request_deserializer=agent_pb2.GetPolicyRequest.FromString,
                    response_serializer=None,  # get_policy returns bytes it serialized (and cached)
                ),
                "Enroll": grpc.unary_unary_rpc_method_handler(
                    self.enroll,
                    request_deserializer=parse_enroll_request,
                    response_serializer=agent_pb2.EnrollResponse.SerializeToString,
                ),
                "Renew": grpc.unary_unary_rpc_method_handler(
                    self.renew,
                    request_deserializer=parse_renew_request,
                    response_serializer=agent_pb2.EnrollResponse.SerializeToString,
                ),
            },
        )


def policy_message(policy: AgentPolicy, catalog: ZoneCatalog | None) -> agent_pb2.Policy:
    """The policy and its zone catalog as the agent receives them."""
    message = agent_pb2.Policy(
        sample_interval_s=policy.sample_interval_s,
        interfaces=list(policy.interfaces),
        batch_max_facts=policy.batch_max_facts,
        policy_refresh_s=policy.policy_refresh_s,
        zones_version=policy.zones_version,
    )
    if catalog is None:
        return message
    index = {zone.name: i for i, zone in enumerate(catalog.zones, start=1)}
    for zone in catalog.zones:
        message.zones.add(
            name=zone.name,
            kind=zone.kind,
            direction=zone.direction,
            department=zone.department,
            cidrs=[str(n) for n in zone.networks],
            capacity_bps=zone.capacity_bps,
        )
    for family, width in ((4, 4), (6, 16)):
        for first, last, owner in catalog.flatten(family):
            message.zone_ranges.add(
                first=first.to_bytes(width, "big"),
                last=last.to_bytes(width, "big"),
                zone=index[owner.name] if owner is not None else 0,
            )
    return message

"""A minimal real collector for the agent's enrollment tests: real TLS, real CA, real gRPC.

Enroll on a server-TLS port and Report, GetPolicy and Renew on an mTLS port, as the contract
says, signing with ``collector.pki`` (tests may import collector code; the agent may not). It knows
identity the way the collector does: from the peer certificate alone. It is not the collector
(which is built beside this): no database, no validation, no revocation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta

import grpc

from collector import pki
from protos.zonewatch.v1 import agent_pb2

LABELS = {"department": "市公安局", "county": "高新区", "site": "主机房", "role": "server"}


class MiniCollector:
    def __init__(self, authority: pki.Pki, *, token: str = "zwt_" + "t" * 43, days: int = 90) -> None:
        self.authority = authority
        self.tokens = {token}
        self.days = days
        # Backdate the next certificates by this much (so a test can make one due or expired).
        self.issue_age = timedelta(0)
        self.fail_renewals = 0  # answer this many Renew calls with UNAVAILABLE
        self.lockout_after = 3  # bad tokens before every Enroll is answered RESOURCE_EXHAUSTED
        self._bad_tokens = 0
        self.enroll_requests: list[agent_pb2.EnrollRequest] = []
        self.renewed: list[str] = []  # serials issued by Renew
        self.report_serials: list[str] = []  # the client certificate of every Report stream
        self.batches: list[tuple[str, str, int]] = []  # (agent id, certificate serial, seq)
        self._acked: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler(
            "zonewatch.v1.AgentService",
            {
                "Enroll": grpc.unary_unary_rpc_method_handler(self._enroll),
                "Renew": grpc.unary_unary_rpc_method_handler(self._renew),
                "GetPolicy": grpc.unary_unary_rpc_method_handler(self._get_policy),
                "Report": grpc.stream_stream_rpc_method_handler(self._report),
            },
        )
        self.server.add_generic_rpc_handlers([handler])
        identity = [(authority.server_key_pem, authority.server_chain_pem)]
        self.mtls_port = self.server.add_secure_port(
            "127.0.0.1:0",
            grpc.ssl_server_credentials(
                identity, root_certificates=authority.ca_cert_pem, require_client_auth=True
            ),
        )
        self.enroll_port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(identity))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    def __enter__(self) -> MiniCollector:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)

    def _issue(self, csr_pem: bytes, context: grpc.ServicerContext) -> agent_pb2.EnrollResponse:
        try:
            issued = pki.sign_agent_csr(
                self.authority,
                csr_pem,
                labels={k: v for k, v in LABELS.items() if v},
                days=self.days,
                now=datetime.now(UTC) - self.issue_age,
            )
        except pki.PkiError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return agent_pb2.EnrollResponse(
            certificate_pem=issued.pem,
            ca_pem=self.authority.ca_cert_pem,
            agent_id=issued.agent_id,
            not_after_ms=int(issued.not_after.timestamp() * 1000),
            labels=agent_pb2.HostLabels(**LABELS),
        )

    def _enroll(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        request = agent_pb2.EnrollRequest.FromString(data)
        with self._lock:
            self.enroll_requests.append(request)
            if self._bad_tokens >= self.lockout_after:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many failed enrollments")
            if request.token not in self.tokens:
                self._bad_tokens += 1
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown, expired or used token")
            self.tokens.discard(request.token)
        return self._issue(request.csr_pem, context).SerializeToString()

    def _peer(self, context: grpc.ServicerContext) -> pki.AgentIdentity:
        certs = context.auth_context().get("x509_pem_cert")
        if not certs:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        return pki.identity_of(certs[0])

    def _renew(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        peer = self._peer(context)
        request = agent_pb2.RenewRequest.FromString(data)
        with self._lock:
            if self.fail_renewals > 0:
                self.fail_renewals -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "collector storage is failing; retry later")
        response = self._issue(request.csr_pem, context)
        if response.agent_id != peer.agent_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "renewal is for the same key only")
        serial = pki.identity_of(response.certificate_pem).serial
        with self._lock:
            self.renewed.append(serial)
        return response.SerializeToString()

    def _get_policy(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        self._peer(context)
        return agent_pb2.GetPolicyResponse(version="p0", unchanged=True).SerializeToString()

    def _report(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = self._peer(context)
        hello = agent_pb2.ReportRequest.FromString(next(requests)).hello
        if hello.agent_id != peer.agent_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the hello names another agent")
        with self._lock:
            self.report_serials.append(peer.serial)
            acked = self._acked.get(peer.agent_id, 0)
        yield agent_pb2.ReportResponse(welcome=agent_pb2.Welcome(acked_seq=acked)).SerializeToString()
        for data in requests:
            seq = agent_pb2.ReportRequest.FromString(data).batch.seq
            with self._lock:
                self.batches.append((peer.agent_id, peer.serial, seq))
                self._acked[peer.agent_id] = max(seq, self._acked.get(peer.agent_id, 0))
            yield agent_pb2.ReportResponse(ack=agent_pb2.Ack(acked_seq=seq)).SerializeToString()

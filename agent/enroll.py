"""``zonewatch-agent enroll``: trade a one-time token for a client certificate.

1. Fetch the certificates the collector presents on its enrollment port and keep its CA only if it
   carries the fingerprint the operator gave (:func:`agent.enroll_keys.check_ca`).
2. Make the key on this host, in a staging directory (``tls.new/``), and a certificate request.
3. Call Enroll over TLS verified against that CA (server authentication only: we have no
   certificate yet), with the token, the request, the hostname and /etc/machine-id.
4. Check the answer (our key, our CA) and swap the staged directory in; record enrollment.json.

A failure at any step leaves the state directory as it was. An existing enrollment is replaced
only with ``force``; the spool is kept either way: its batches are delivered under the new
identity, and their sequence numbers continue.

This module imports cryptography (through :mod:`agent.enroll_keys`); the CLI imports it only for
``enroll``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent import __version__, enroll_keys
from agent.atomicfile import write_atomic
from agent.certinfo import CertificateInfo, read_certificate_pem
from agent.config import check_address
from agent.credentials import (
    Enrollment,
    IssuedCertificate,
    StatePaths,
    commit_enrollment,
    first_certificate_der,
    is_enrolled,
)
from agent.errors import ConfigError, EnrollError
from agent.transport import TLS_OPTIONS
from agent.wire import ENROLL_METHOD, enroll_request, parse_issued

MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class EnrollOptions:
    collector: str  # HOST:PORT of the collector's mTLS port
    token: str
    ca_fingerprint: str
    state_dir: Path
    hostname: str
    enroll_port: int = 0  # 0: the mTLS port + 1
    force: bool = False
    timeout_s: float = 30.0
    machine_id_path: Path = MACHINE_ID


@dataclass(frozen=True)
class EnrollResult:
    enrollment: Enrollment
    paths: StatePaths
    not_before_ms: int
    kept_spool: bool


def split_collector(collector: str) -> tuple[str, int]:
    """(host as a socket wants it, port) from HOST:PORT or [IPv6]:PORT."""
    try:
        check_address(collector)
    except ConfigError as exc:
        raise EnrollError(str(exc)) from exc
    host, _, port = collector.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def enroll_target(collector: str, enroll_port: int) -> str:
    host, _, _ = collector.rpartition(":")
    return f"{host}:{enroll_port}"


def read_machine_id(path: Path = MACHINE_ID) -> str:
    """The host's machine id, or "" when it has none we can read."""
    try:
        return path.read_text(encoding="ascii").strip()[:64]
    except (OSError, UnicodeDecodeError):
        return ""


def enroll(options: EnrollOptions) -> EnrollResult:
    host, port = split_collector(options.collector)
    enroll_port = options.enroll_port or port + 1
    if not 0 < enroll_port < 65536:
        raise EnrollError(f"the enrollment port must be in 1..65535, got {enroll_port}")
    if not options.token.strip():
        raise EnrollError("the enrollment token is empty")
    expected = enroll_keys.parse_fingerprint(options.ca_fingerprint)
    paths = StatePaths.of(options.state_dir)
    if is_enrolled(options.state_dir) and not options.force:
        raise EnrollError(
            f"{options.state_dir} already holds an enrollment; enrolling again gives this host a new"
            " identity (use --force to do so; the spool is kept)"
        )

    chain = enroll_keys.fetch_presented_chain(host, enroll_port, options.timeout_s)
    ca_pem = enroll_keys.check_ca(chain, expected)

    staged = paths.staging
    _prepare(staged)
    try:
        key = enroll_keys.create_key(staged.key)
        agent_id = enroll_keys.agent_id_of(key.public_key())
        csr = enroll_keys.make_csr(key, options.hostname)
        machine_id = read_machine_id(options.machine_id_path)
        request = enroll_request(options.token.strip(), csr, options.hostname, machine_id, __version__)
        target = enroll_target(options.collector, enroll_port)
        issued = _call_enroll(target, ca_pem, request, options.timeout_s)
        certificate = _check_issued(issued.certificate_pem, issued.ca_pem, ca_pem, agent_id)
        if issued.agent_id != agent_id:
            raise EnrollError(
                f"the collector named us {issued.agent_id[:64]!r}, but our key is agent {agent_id}"
            )
        for path, data in ((staged.cert, issued.certificate_pem), (staged.ca, ca_pem), (staged.csr, csr)):
            _write(path, data)
        enrollment = Enrollment(
            collector=options.collector,
            enroll_port=enroll_port,
            agent_id=agent_id,
            labels=issued.labels,
            not_after_ms=certificate.not_after_ms,
            enrolled_ms=time.time_ns() // 1_000_000,
        )
        commit_enrollment(staged, enrollment)
    finally:
        shutil.rmtree(staged.tls_dir, ignore_errors=True)
    kept_spool = (options.state_dir / "spool.db").exists()
    return EnrollResult(enrollment, paths, certificate.not_before_ms, kept_spool)


def _prepare(staged: StatePaths) -> None:
    try:
        staged.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(staged.tls_dir, ignore_errors=True)  # left by an enrollment that died
        staged.tls_dir.mkdir(mode=0o700)
        staged.tls_dir.chmod(0o700)  # whatever the umask
    except OSError as exc:
        raise EnrollError(f"cannot create {staged.tls_dir}: {exc.strerror or exc}") from exc


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, 0o644)
    except OSError as exc:
        raise EnrollError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _call_enroll(target: str, ca_pem: bytes, request: bytes, timeout_s: float) -> IssuedCertificate:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    options = [*TLS_OPTIONS, ("grpc.enable_retries", 0)]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        method = channel.unary_unary(ENROLL_METHOD, request_serializer=None, response_deserializer=None)
        try:
            data = method(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise EnrollError(explain_enroll_error(target, exc)) from exc
    try:
        return parse_issued(data)
    except ValueError as exc:
        raise EnrollError(f"the collector's Enroll answer cannot be parsed: {exc}") from exc


def explain_enroll_error(target: str, exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = " ".join(str(exc.details() if hasattr(exc, "details") else exc).split())[:300]
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (
            f"the collector refused the token ({details}): tokens are single-use and expire;"
            " ask for a new one (`zonewatch-collector tokens create`)"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (
            f"the collector has locked this address out after too many bad tokens ({details});"
            " wait, then try again with a valid token"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the collector refused the certificate request: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the collector's enrollment port at {target}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the collector at {target} did not answer Enroll in time"
    name = code.name if code is not None else "error"
    return f"Enroll at {target} failed: {name}: {details}"


def _check_issued(
    cert_pem: bytes, answered_ca_pem: bytes, pinned_ca_pem: bytes, agent_id: str
) -> CertificateInfo:
    try:
        certificate = read_certificate_pem(cert_pem)
        pinned = read_certificate_pem(pinned_ca_pem)
    except ValueError as exc:
        raise EnrollError(f"the collector sent a certificate that cannot be read ({exc})") from exc
    if certificate.agent_id != agent_id:
        raise EnrollError(
            f"the collector sent a certificate for another key (agent {certificate.agent_id},"
            f" ours is {agent_id})"
        )
    if not certificate.issued_by(pinned):
        raise EnrollError("the collector sent a certificate that the pinned CA did not issue")
    if answered_ca_pem and first_certificate_der(answered_ca_pem) != first_certificate_der(pinned_ca_pem):
        raise EnrollError("the collector's answer names a CA other than the pinned one: refusing it")
    return certificate

"""The enrolled identity in the state directory: its layout, loading it, replacing it.

Layout (``<state>`` is ``state_dir``)::

    <state>/                  spool.db stays here across enrollments
        enrollment.json 0644  collector, enroll_port, agent_id, labels, not_after_ms, enrolled_ms,
                              renewed_ms: what `run` and `status` need besides the certificate
        tls/            0700
            agent.key   0600  the agent's EC P-256 key, made on this host, never sent anywhere
            agent.crt   0644  the client certificate the collector issued for it
            ca.crt      0644  the collector's CA, pinned by fingerprint at enrollment
            agent.csr   0644  a certificate request for the same key, sent again at each renewal

Enrolling writes the new ``tls/`` beside the old one (``tls.new/``), swaps the two directories and
then rewrites enrollment.json, so a failed Enroll call leaves the previous identity as it was.
Loading cross-checks the files (certificate ↔ key ↔ CA ↔ enrollment.json) so that a mismatch is
one clear line at start, not a TLS handshake failure every few seconds.

No cryptography here: the running agent reads its certificate with :mod:`agent.certinfo`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from agent.atomicfile import fsync_directory, write_atomic
from agent.certinfo import (
    CertificateInfo,
    pem_blocks,
    public_key_of_private_key_pem,
    read_certificate_pem,
)
from agent.errors import CredentialsError, NotEnrolledError

NOT_ENROLLED_HINT = (
    "run `zonewatch-agent enroll --collector HOST:PORT --token TOKEN --ca-fingerprint SHA256`"
    " (or set insecure = true / --insecure for a lab collector without TLS)"
)


class StatePaths(NamedTuple):
    state_dir: Path
    enrollment: Path
    tls_dir: Path
    key: Path
    cert: Path
    ca: Path
    csr: Path

    @classmethod
    def of(cls, state_dir: Path, tls_name: str = "tls") -> StatePaths:
        tls = state_dir / tls_name
        return cls(
            state_dir,
            state_dir / "enrollment.json",
            tls,
            tls / "agent.key",
            tls / "agent.crt",
            tls / "ca.crt",
            tls / "agent.csr",
        )

    @property
    def staging(self) -> StatePaths:
        """Where an enrollment in progress builds its tls/ directory."""
        return StatePaths.of(self.state_dir, "tls.new")


@dataclass(frozen=True)
class Enrollment:
    """enrollment.json: what the collector told us at enrollment, and where to find it."""

    collector: str  # HOST:PORT of the mTLS port
    enroll_port: int
    agent_id: str
    labels: dict[str, str] = field(default_factory=dict)
    not_after_ms: int = 0
    enrolled_ms: int = 0
    renewed_ms: int = 0  # 0 until the first renewal

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: Path) -> Enrollment:
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
            enrollment = cls(**known)
            checks = (
                isinstance(enrollment.collector, str),
                isinstance(enrollment.enroll_port, int),
                isinstance(enrollment.agent_id, str),
                isinstance(enrollment.labels, dict)
                and all(isinstance(v, str) for v in enrollment.labels.values()),
                isinstance(enrollment.not_after_ms, int),
            )
            if not all(checks):
                raise TypeError("a field has the wrong type")
        except (ValueError, TypeError) as exc:
            raise CredentialsError(f"{source} is damaged ({exc}): enroll again with --force") from exc
        return enrollment


class TlsCredentials(NamedTuple):
    """PEM bytes for grpc.ssl_channel_credentials."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes


class IssuedCertificate(NamedTuple):
    """What Enroll and Renew answer, as the agent's own record."""

    certificate_pem: bytes
    ca_pem: bytes
    agent_id: str
    not_after_ms: int
    labels: dict[str, str]


class Credentials(NamedTuple):
    agent_id: str
    tls: TlsCredentials
    certificate: CertificateInfo
    enrollment: Enrollment

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.enrollment.labels)


def is_enrolled(state_dir: Path) -> bool:
    """Something of an enrollment is here (enroll refuses to replace it without --force)."""
    paths = StatePaths.of(state_dir)
    return paths.enrollment.exists() or paths.tls_dir.exists()


def read_enrollment(state_dir: Path) -> Enrollment | None:
    path = StatePaths.of(state_dir).enrollment
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return Enrollment.from_json(data, path)


def load_credentials(state_dir: Path) -> Credentials:
    """The enrolled identity, checked for consistency; NotEnrolledError when there is none."""
    paths = StatePaths.of(state_dir)
    if not paths.cert.exists():
        raise NotEnrolledError(f"not enrolled (no certificate in {paths.tls_dir}): {NOT_ENROLLED_HINT}")
    enrollment = read_enrollment(state_dir)
    if enrollment is None:
        raise CredentialsError(
            f"{paths.cert} exists but {paths.enrollment} does not (an enrollment interrupted?):"
            " enroll again with --force"
        )
    key_pem = _read_private(paths.key)
    cert_pem = _read(paths.cert)
    ca_pem = _read(paths.ca)
    certificate = _certificate(cert_pem, paths.cert)
    ca = _certificate(ca_pem, paths.ca)
    if not certificate.issued_by(ca):
        raise CredentialsError(
            f"{paths.cert} was not issued by the CA in {paths.ca}: enroll again with --force"
        )
    check_key_matches(key_pem, certificate, paths)
    if certificate.agent_id != enrollment.agent_id:
        raise CredentialsError(
            f"{paths.cert} belongs to agent {certificate.agent_id} but {paths.enrollment} names"
            f" {enrollment.agent_id[:64]!r}: enroll again with --force"
        )
    tls = TlsCredentials(ca_pem, key_pem, cert_pem)
    return Credentials(certificate.agent_id, tls, certificate, enrollment)


def check_key_matches(key_pem: bytes, certificate: CertificateInfo, paths: StatePaths) -> None:
    try:
        point = public_key_of_private_key_pem(key_pem)
    except ValueError as exc:
        raise CredentialsError(f"{paths.key} is not a PKCS#8 PEM private key ({exc})") from exc
    if point is not None and point != certificate.public_key:
        raise CredentialsError(f"{paths.key} is not the key of {paths.cert}: enroll again with --force")


def commit_enrollment(staged: StatePaths, enrollment: Enrollment) -> None:
    """Make the staged tls/ the agent's and record the enrollment; the previous identity is removed."""
    final = StatePaths.of(staged.state_dir)
    old = staged.state_dir / "tls.old"
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.tls_dir.exists():
            os.replace(final.tls_dir, old)
        os.replace(staged.tls_dir, final.tls_dir)
        fsync_directory(staged.state_dir)
        write_atomic(final.enrollment, enrollment.to_json(), 0o644)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        why = exc.strerror or exc
        raise CredentialsError(f"cannot store the enrollment in {staged.state_dir}: {why}") from exc


def store_renewed(
    state_dir: Path, current: Credentials, issued: IssuedCertificate, now_ms: int
) -> Credentials:
    """Keep a renewed certificate for the same key, atomically; return the credentials it makes."""
    paths = StatePaths.of(state_dir)
    certificate = _certificate(issued.certificate_pem, Path("the renewed certificate"))
    if certificate.agent_id != current.agent_id:
        raise CredentialsError(
            f"the collector renewed a certificate for another key (agent {certificate.agent_id}); kept ours"
        )
    if not certificate.issued_by(read_certificate_pem(current.tls.ca_pem)):
        raise CredentialsError("the renewed certificate was not issued by our CA; kept ours")
    on_disk = _certificate(_read(paths.cert), paths.cert)
    if on_disk.agent_id != current.agent_id:
        # `enroll --force` ran while this agent was running: its files are not ours to replace.
        raise CredentialsError(f"{paths.tls_dir} now holds agent {on_disk.agent_id}: restart the agent")
    enrollment = replace(current.enrollment, not_after_ms=certificate.not_after_ms, renewed_ms=now_ms)
    try:
        write_atomic(paths.cert, issued.certificate_pem, 0o644)
        write_atomic(paths.enrollment, enrollment.to_json(), 0o644)
    except OSError as exc:
        raise CredentialsError(f"cannot store the renewed certificate: {exc.strerror or exc}") from exc
    tls = current.tls._replace(cert_pem=issued.certificate_pem)
    return Credentials(current.agent_id, tls, certificate, enrollment)


def store_csr(paths: StatePaths, csr_pem: bytes) -> None:
    try:
        write_atomic(paths.csr, csr_pem, 0o644)
    except OSError as exc:
        raise CredentialsError(f"cannot write {paths.csr}: {exc.strerror or exc}") from exc


def first_certificate_der(pem: bytes) -> bytes | None:
    blocks = pem_blocks(pem, "CERTIFICATE")
    return blocks[0] if blocks else None


def _certificate(pem: bytes, source: Path) -> CertificateInfo:
    try:
        return read_certificate_pem(pem)
    except ValueError as exc:
        raise CredentialsError(f"{source} is not a usable PEM certificate ({exc})") from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CredentialsError(f"cannot read the agent key {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise CredentialsError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path},"
            " and enroll again with --force if others could have read it"
        )
    return _read(path)

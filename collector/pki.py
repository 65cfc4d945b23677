"""The collector's certificate authority: create it, load it, issue agent certificates, tokens.

Pure library code (no gRPC, no database): the CLI (`zonewatch-collector init`, `tokens create`),
the Enroll RPC and the mTLS wiring call these functions.

Layout of the PKI directory, created by :func:`init_pki`::

    <directory>/          0700  only the collector's user may enter it
        ca.key            0600  CA private key: EC P-256, PKCS#8 PEM, unencrypted (the
                                collector starts unattended; the file mode is the protection)
        ca.crt            0644  self-signed CA certificate: the trust anchor agents pin by
                                its SHA-256 fingerprint, see :func:`fingerprint`
        server.key        0600  the collector's TLS key: EC P-256, PKCS#8 PEM
        server.crt        0644  the collector's TLS certificate, signed by the CA, EKU serverAuth,
                                SAN DNS:zonewatch-collector plus the names given to init_pki
        server-chain.crt  0644  server.crt followed by ca.crt: what a TLS server presents, so an
                                enrolling agent sees the CA and can check its fingerprint

Agents verify the collector against the pinned CA and the fixed name ``zonewatch-collector``
(gRPC's ``ssl_target_name_override``), so an IP address or a renamed host never breaks TLS.

Every file is written atomically (temporary file, fsync, rename, fsync of the directory): a crash
leaves either the old file or the new one, never half a key. :func:`load_pki` refuses a key file
that its group or others may read.

An agent's identity is its key: the agent id is derived from the public key (:func:`agent_id_of`)
and is the only thing the collector reads from an agent certificate (:func:`identity_of`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector.errors import CollectorError

SERVER_NAME = "zonewatch-collector"
TOKEN_PREFIX = "zwt_"
# Agents and collector may disagree on the time by a few minutes; a certificate valid only from
# the exact second of issue would be refused by an agent whose clock is slightly behind.
CLOCK_SKEW = timedelta(minutes=5)
MAX_CSR_BYTES = 16 * 1024
MAX_LABELS = 16
ALLOWED_AGENT_KEYS = "EC P-256, EC P-384 or RSA of 2048 to 8192 bits"

_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_DNS_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")
_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_COLON_FINGERPRINT = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){31}")
_E = TypeVar("_E", bound=x509.ExtensionType)


class PkiError(CollectorError):
    """The PKI cannot be created or loaded, or refuses a CSR, certificate, fingerprint or token."""


class PkiPaths(NamedTuple):
    directory: Path
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    server_chain: Path

    @classmethod
    def of(cls, directory: Path) -> PkiPaths:
        return cls(
            directory,
            directory / "ca.key",
            directory / "ca.crt",
            directory / "server.key",
            directory / "server.crt",
            directory / "server-chain.crt",
        )


@dataclass(frozen=True)
class Pki:
    """A loaded, consistent PKI: the CA and the collector's own TLS identity."""

    paths: PkiPaths
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey

    @property
    def ca_cert_pem(self) -> bytes:
        """The trust anchor: ``root_certificates`` for clients, for the server to check agents."""
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def server_key_pem(self) -> bytes:
        return _key_pem(self.server_key)

    @property
    def server_chain_pem(self) -> bytes:
        # Built from the loaded certificates rather than read from server-chain.crt, so a
        # hand-replaced server.crt can never be presented with a stale chain.
        return self.server_cert.public_bytes(serialization.Encoding.PEM) + self.ca_cert_pem

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca_cert)


class IssuedCert(NamedTuple):
    pem: bytes
    agent_id: str
    serial: str  # 32 lowercase hex digits, the key for revocation
    not_after: datetime


class AgentIdentity(NamedTuple):
    agent_id: str
    serial: str
    not_after: datetime


# --- creating and loading ---------------------------------------------------------------------


def init_pki(
    directory: Path,
    *,
    common_name: str = "zonewatch collector CA",
    server_names: Sequence[str] = (),
    ca_days: int = 3650,
    server_days: int = 825,
    now: datetime | None = None,
    force: bool = False,
) -> PkiPaths:
    """Create the CA and the collector's TLS certificate in ``directory`` (see the module doc)."""
    paths = PkiPaths.of(directory)
    if ca_days <= 0 or server_days <= 0:
        raise PkiError("certificate lifetimes must be at least one day")
    if not common_name.strip():
        raise PkiError("the CA needs a non-empty common name")
    sans = _server_sans(server_names)
    existing = [p.name for p in paths[1:] if p.exists()]
    if existing and not force:
        raise PkiError(
            f"{directory} already holds a PKI ({', '.join(existing)}); replacing it forces every agent"
            " to enroll again: use force to do so"
        )
    start = _now(now)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        raise PkiError(f"cannot create {directory}: {exc.strerror or exc}") from exc

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name.strip())])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), start, start + timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]),
            ca_name,
            server_key.public_key(),
            start,
            min(start + timedelta(days=server_days), ca_cert.not_valid_after_utc),
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    server_pem = server_cert.public_bytes(serialization.Encoding.PEM)
    # Keys first and ca.crt last: a crash part-way leaves no ca.crt that names a missing key.
    _write_atomic(paths.ca_key, _key_pem(ca_key), 0o600)
    _write_atomic(paths.server_key, _key_pem(server_key), 0o600)
    _write_atomic(paths.server_cert, server_pem, 0o644)
    _write_atomic(paths.server_chain, server_pem + ca_pem, 0o644)
    _write_atomic(paths.ca_cert, ca_pem, 0o644)
    return paths


def load_pki(directory: Path) -> Pki:
    """Load and cross-check the PKI in ``directory``; refuse keys readable by group or others."""
    paths = PkiPaths.of(directory)
    if not paths.ca_cert.exists():
        raise PkiError(f"no CA in {directory}: create one with `zonewatch-collector init`")
    ca_cert = _read_cert(paths.ca_cert)
    ca_key = _read_key(paths.ca_key)
    server_cert = _read_cert(paths.server_cert)
    server_key = _read_key(paths.server_key)
    constraints = _extension(ca_cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise PkiError(f"{paths.ca_cert} is not a CA certificate")
    if not _same_key(ca_key, ca_cert):
        raise PkiError(f"{paths.ca_key} is not the key of {paths.ca_cert}")
    if not _same_key(server_key, server_cert):
        raise PkiError(f"{paths.server_key} is not the key of {paths.server_cert}")
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{paths.server_cert} was not signed by the CA in {paths.ca_cert}") from exc
    return Pki(paths, ca_cert, ca_key, server_cert, server_key)


# --- fingerprints and agent identity ----------------------------------------------------------


def fingerprint(cert: x509.Certificate, *, prefixed: bool = False) -> str:
    """SHA-256 of the DER certificate in lowercase hex, or as ``SHA256:<hex>`` when ``prefixed``."""
    digest = cert.fingerprint(hashes.SHA256()).hex()
    return f"SHA256:{digest}" if prefixed else digest


def parse_fingerprint(text: str) -> str:
    """Normalise a SHA-256 fingerprint as an operator may paste it, to 64 lowercase hex digits.

    Accepted: hex with or without colons between bytes, any case, with or without ``sha256:``.
    """
    value = text.strip().lower()
    value = value.removeprefix("sha256:")
    if _COLON_FINGERPRINT.fullmatch(value):
        return value.replace(":", "")
    if _HEX_FINGERPRINT.fullmatch(value):
        return value
    raise PkiError(
        f"not a SHA-256 fingerprint: {text[:100]!r} (expected 64 hex digits, optionally"
        " colon-separated, optionally prefixed with SHA256:)"
    )


def agent_id_of(public_key: CertificatePublicKeyTypes) -> str:
    """The agent id: first 32 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:32]


def sign_agent_csr(
    pki: Pki,
    csr_pem: bytes,
    *,
    labels: Mapping[str, str],
    days: int = 90,
    now: datetime | None = None,
) -> IssuedCert:
    """Issue a client certificate for the key in ``csr_pem``.

    The CSR contributes its public key and nothing else: its subject and extensions are ignored,
    the CN is the agent id the collector derives from the key. ``labels`` (from the enrollment
    token) are copied into OU attributes for an operator reading the certificate; the collector
    never reads them back.
    """
    if days <= 0:
        raise PkiError("an agent certificate must be valid for at least one day")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError(f"certificate request too large ({len(csr_pem)} bytes, at most {MAX_CSR_BYTES})")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError("not a PEM certificate signing request") from exc
    try:
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"unsupported key in certificate request: use {ALLOWED_AGENT_KEYS}") from exc
    _check_agent_key(public_key)
    if not signature_ok:
        raise PkiError("certificate request signature does not verify: tampered, or not signed by its key")
    if isinstance(csr.signature_hash_algorithm, (hashes.MD5, hashes.SHA1)):
        raise PkiError("certificate request signed with a broken hash (MD5 or SHA-1)")

    start = _now(now)
    agent_id = agent_id_of(public_key)
    serial = _random_serial()
    not_after = min(start + timedelta(days=days), pki.ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]
        + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, label) for label in _label_values(labels)]
    )
    ca_ski = _extension(pki.ca_cert, x509.SubjectKeyIdentifier)
    builder = (
        _builder(subject, pki.ca_cert.subject, public_key, start, not_after, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca_ski is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    cert = builder.sign(pki.ca_key, hashes.SHA256())
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), agent_id, f"{serial:032x}", not_after)


def identity_of(cert: bytes | str) -> AgentIdentity:
    """The agent behind a peer certificate (PEM or DER), as TLS handed it to the servicer.

    TLS has already checked the CA's signature; this refuses a certificate whose CN is not the id
    derived from its own key.
    """
    data = cert.encode("ascii") if isinstance(cert, str) else cert
    try:
        parsed = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(data)
        )
        public_key = parsed.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError("the peer certificate cannot be parsed") from exc
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError(f"the peer certificate has {len(names)} common names, expected one: the agent id")
    common_name = names[0].value
    expected = agent_id_of(public_key)
    if common_name != expected:
        raise PkiError(
            f"the peer certificate names agent {str(common_name)[:64]!r} but its key is agent {expected}"
        )
    return AgentIdentity(expected, f"{parsed.serial_number:032x}", parsed.not_valid_after_utc)


# --- enrollment tokens ------------------------------------------------------------------------


def new_token() -> str:
    """A one-time enrollment token: ``zwt_`` and 256 random bits, URL-safe; show it once, store its hash."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """SHA-256 hex of the token, what the database stores. Refuses text that is not a token."""
    value = token.strip()
    if not value.startswith(TOKEN_PREFIX) or not re.fullmatch(r"[A-Za-z0-9_-]{40,100}", value):
        raise PkiError(f"not an enrollment token (they look like {TOKEN_PREFIX}…, 47 characters)")
    return hashlib.sha256(value.encode("ascii")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Compare a presented token with a stored hash in constant time."""
    try:
        presented = token_hash(token)
    except PkiError:
        return False
    return hmac.compare_digest(presented, stored_hash.lower())


# --- helpers ----------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    # X.509 times have one-second resolution; dropping microseconds keeps what we return equal
    # to what the certificate says.
    return now.astimezone(UTC).replace(microsecond=0)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    start: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial if serial is not None else _random_serial())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(not_after)
    )


def _random_serial() -> int:
    serial = 0
    while serial == 0:  # RFC 5280: positive
        serial = secrets.randbits(128)
    return serial


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _server_sans(server_names: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
    for raw in server_names:
        name = raw.strip().lower().rstrip(".")
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not _DNS_NAME.fullmatch(name):
                raise PkiError(f"server name {raw!r} is neither a DNS name nor an IP address") from None
            general = x509.DNSName(name)
        if general not in sans:
            sans.append(general)
    return sans


def _check_agent_key(key: CertificatePublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
        return
    if isinstance(key, rsa.RSAPublicKey) and 2048 <= key.key_size <= 8192:
        return
    if isinstance(key, rsa.RSAPublicKey):
        described = f"RSA {key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        described = f"EC {key.curve.name}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        # gRPC's TLS does not offer Ed25519 signatures, so such a certificate could not connect.
        described = "Ed25519"
    else:
        described = type(key).__name__
    raise PkiError(f"certificate request key {described} is not allowed: use {ALLOWED_AGENT_KEYS}")


def _label_values(labels: Mapping[str, str]) -> list[str]:
    if len(labels) > MAX_LABELS:
        raise PkiError(f"too many labels ({len(labels)}, at most {MAX_LABELS})")
    values = []
    for key, value in sorted(labels.items()):
        if not _LABEL_KEY.fullmatch(key):
            raise PkiError(f"label name {key[:40]!r} must be lowercase letters, digits, '_', '.', '-'")
        text = f"{key}={value}"
        if not value or len(text) > 64 or not value.isprintable():
            raise PkiError(f"label {key}: the value must be printable and 'name=value' at most 64 characters")
        values.append(text)
    return values


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return agent_id_of(key.public_key()) == agent_id_of(cert.public_key())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate") from exc


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise PkiError(
                f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path},"
                " and consider the key compromised if others could read it"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key")
    return key


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, mode)  # exact mode whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc

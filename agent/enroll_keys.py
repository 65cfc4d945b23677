"""The agent's side of enrollment: its key, its certificate request, and pinning the collector's CA.

The key is generated on the host and never leaves it: EC P-256, PKCS#8 PEM, mode 0600, written
atomically. The agent id is derived from the public key exactly as the collector derives it
(``collector.pki.agent_id_of``; the agent does not import collector code, a test keeps the two equal).

Before it has a CA to trust, an enrolling agent connects without verification, takes the
certificates the collector presents and keeps the CA only if its SHA-256 fingerprint is the one the
operator gave it (:func:`check_ca`): the fingerprint replaces certificate verification for that one
connection, and the CA it yields verifies every later one.
"""

from __future__ import annotations

import _ssl
import hashlib
import re
import socket
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from agent.atomicfile import write_atomic
from agent.errors import EnrollError

_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_COLON_FINGERPRINT = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){31}")

__all__ = [
    "EnrollError",
    "agent_id_of",
    "check_ca",
    "create_key",
    "fetch_presented_chain",
    "load_key",
    "make_csr",
    "parse_fingerprint",
]


def create_key(path: Path, *, overwrite: bool = False) -> ec.EllipticCurvePrivateKey:
    """Generate the agent's key and keep it in ``path`` (0600); refuse to replace one unless asked."""
    if path.exists() and not overwrite:
        raise EnrollError(
            f"{path} already holds a key; replacing it gives the agent a new identity (overwrite to do so)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EnrollError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    _write_atomic(path, pem, 0o600)
    return key


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the agent's key; refuse one that its group or others may read."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise EnrollError(
                f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path},"
                " and consider enrolling with a new key if others could read it"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise EnrollError(f"cannot read the agent key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EnrollError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnrollError(f"{path} is not an EC P-256 key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, hostname: str) -> bytes:
    """A PEM certificate request for ``key``. The hostname is a courtesy: the collector ignores it."""
    common_name = hostname.strip()[:64] or "zonewatch-agent"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def agent_id_of(public_key: CertificatePublicKeyTypes) -> str:
    """The agent id: first 32 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:32]


def parse_fingerprint(text: str) -> str:
    """64 lowercase hex digits from hex with or without colons, any case, optional ``sha256:``."""
    value = text.strip().lower().removeprefix("sha256:")
    if _COLON_FINGERPRINT.fullmatch(value):
        return value.replace(":", "")
    if _HEX_FINGERPRINT.fullmatch(value):
        return value
    raise EnrollError(
        f"not a SHA-256 fingerprint: {text[:100]!r} (expected 64 hex digits, optionally"
        " colon-separated, optionally prefixed with SHA256:)"
    )


def check_ca(chain_der: Sequence[bytes], expected_fingerprint: str) -> bytes:
    """The CA PEM from a presented chain (leaf first), if it is the one the operator pinned.

    The CA must carry the expected fingerprint, be a CA, and have signed the leaf: the TLS
    handshake proved the server holds the leaf's key, so the server is one the CA vouches for.
    """
    expected = parse_fingerprint(expected_fingerprint)
    if not chain_der:
        raise EnrollError("the collector presented no certificate")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        raise EnrollError("the collector presented a certificate that cannot be parsed") from exc
    matching = [cert for cert in chain if cert.fingerprint(hashes.SHA256()).hex() == expected]
    if not matching:
        raise EnrollError(
            f"the collector presented no certificate with fingerprint SHA256:{expected}:"
            " wrong collector, or a man in the middle"
        )
    ca = matching[0]
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise EnrollError(f"the certificate with fingerprint SHA256:{expected} is not a CA")
    try:
        chain[0].verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollError(
            f"the CA with fingerprint SHA256:{expected} did not sign the collector's certificate:"
            " wrong collector, or a man in the middle"
        ) from exc
    return ca.public_bytes(serialization.Encoding.PEM)


def fetch_presented_chain(host: str, port: int, timeout: float) -> list[bytes]:
    """Complete a TLS handshake with ``host:port`` and return the DER certificates it presented.

    Nothing is verified here: :func:`check_ca` with the pinned fingerprint takes that place.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])  # a gRPC server may refuse a client that does not speak HTTP/2
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None) as tls,
        ):
            chain = _unverified_chain(tls)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot fetch the collector's certificates from {host}:{port}: {exc}") from exc
    if not chain:
        raise EnrollError(f"the collector at {host}:{port} presented no certificate")
    return chain


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    # SSLSocket.get_unverified_chain() is public from Python 3.13 and returns DER bytes; before,
    # only the private SSL object has it (3.10+), returning _ssl.Certificate objects.
    public = getattr(tls, "get_unverified_chain", None)
    source: Any = public() if public is not None else tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [_der(cert) for cert in source or []]


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes):
        return cert
    return bytes(cert.public_bytes(_ssl.ENCODING_DER))


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise EnrollError(f"cannot write {path}: {exc.strerror or exc}") from exc

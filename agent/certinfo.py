"""What the running agent needs from its certificate and key, read from the DER without cryptography.

The running agent must know its id (SHA-256 of the certificate's SubjectPublicKeyInfo), when its
certificate expires, and that its key belongs to it. ``import cryptography.x509`` loads OpenSSL's
bindings and costs the process about 9 MB of RSS for as long as it lives (measured: 38.5 → 47.5 MB),
a quarter of the agent's budget, for three fields. X.509's outer structure is fixed and DER is
strict (definite lengths, one encoding per value), so a reader for exactly those fields is a few
dozen lines; ``tests/agent/test_enroll_certinfo.py`` checks it against cryptography on EC and RSA
certificates with both time encodings, and against truncated and malformed input.

Nothing here verifies a signature: TLS does that (the collector checks ours, we check its).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import re
from datetime import UTC, datetime
from typing import NamedTuple

_SEQUENCE = 0x30
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT, in a TBSCertificate
_EC_PUBLIC_KEY = 0xA1  # [1] EXPLICIT, in an ECPrivateKey (RFC 5915)
_EXTENSIONS = 0xA3  # [3] EXPLICIT, in a TBSCertificate
_OID = 0x06
_BOOLEAN = 0x01
_KEY_ID = 0x80  # [0] IMPLICIT keyIdentifier, in an AuthorityKeyIdentifier
_SUBJECT_KEY_ID = bytes.fromhex("0603551d0e")  # OID 2.5.29.14, encoded
_AUTHORITY_KEY_ID = bytes.fromhex("0603551d23")  # OID 2.5.29.35, encoded

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)


class CertificateInfo(NamedTuple):
    serial: int
    issuer_der: bytes  # the issuer Name, as encoded
    subject_der: bytes
    not_before_ms: int
    not_after_ms: int
    spki_der: bytes  # SubjectPublicKeyInfo, tag and length included
    subject_key_id: bytes | None = None
    authority_key_id: bytes | None = None

    def issued_by(self, ca: CertificateInfo) -> bool:
        """Names ``ca`` as its issuer: by name, and by key identifier when both carry one (two CAs
        made with the same name are told apart by their keys)."""
        if self.issuer_der != ca.subject_der:
            return False
        return (
            self.authority_key_id is None
            or ca.subject_key_id is None
            or (self.authority_key_id == ca.subject_key_id)
        )

    @property
    def agent_id(self) -> str:
        return agent_id_of_spki(self.spki_der)

    @property
    def public_key(self) -> bytes:
        """The key itself (the BIT STRING of the SubjectPublicKeyInfo): an EC point, an RSA key."""
        return public_key_of_spki(self.spki_der)


def agent_id_of_spki(spki_der: bytes) -> str:
    """The agent id: first 32 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    return hashlib.sha256(spki_der).hexdigest()[:32]


def pem_blocks(pem: bytes, label: str) -> list[bytes]:
    """The DER contents of every ``-----BEGIN <label>-----`` block; ValueError if one is not base64."""
    blocks = []
    for match in _PEM_BLOCK.finditer(pem):
        if match.group(1).decode("ascii") != label:
            continue
        try:
            blocks.append(base64.b64decode(b"".join(match.group(2).split()), validate=True))
        except binascii.Error as exc:
            raise ValueError(f"a {label} block is not base64") from exc
    return blocks


def read_certificate_pem(pem: bytes) -> CertificateInfo:
    """The first certificate in ``pem``; ValueError when there is none or it is malformed."""
    blocks = pem_blocks(pem, "CERTIFICATE")
    if not blocks:
        raise ValueError("no PEM certificate")
    return read_certificate(blocks[0])


def read_certificate(der: bytes) -> CertificateInfo:
    """Serial, issuer, subject, validity and public key of a DER certificate; ValueError if malformed."""
    (content_start, _), after = _expect(der, 0, _SEQUENCE)  # Certificate
    if after != len(der):
        raise ValueError("trailing bytes after the certificate")
    (start, end), _ = _expect(der, content_start, _SEQUENCE)  # TBSCertificate
    pos = start
    if pos < end and der[pos] == _VERSION:
        _, pos = _expect(der, pos, _VERSION)
    (serial_start, serial_end), pos = _expect(der, pos, _INTEGER)
    _, pos = _expect(der, pos, _SEQUENCE)  # signature algorithm
    issuer_at = pos
    _, pos = _expect(der, pos, _SEQUENCE)
    issuer = der[issuer_at:pos]
    (validity_start, validity_end), pos = _expect(der, pos, _SEQUENCE)
    not_before, after = _time(der, validity_start)
    not_after, after = _time(der, after)
    if after != validity_end:
        raise ValueError("malformed validity")
    subject_at = pos
    _, pos = _expect(der, pos, _SEQUENCE)
    subject = der[subject_at:pos]
    spki_at = pos
    _, pos = _expect(der, pos, _SEQUENCE)
    if pos > end:
        raise ValueError("the public key runs past the TBSCertificate")
    spki = der[spki_at:pos]
    public_key_of_spki(spki)  # well-formed, or ValueError now rather than later
    extensions: dict[bytes, bytes] = {}
    while pos < end:  # issuerUniqueID [1], subjectUniqueID [2], extensions [3]
        tag = der[pos]
        (field_start, field_end), pos = _expect(der, pos, tag)
        if tag == _EXTENSIONS:
            extensions = _extensions(der, field_start, field_end)
    if pos != end:
        raise ValueError("malformed TBSCertificate")
    serial = int.from_bytes(der[serial_start:serial_end], "big", signed=True)
    ski = aki = None
    if _SUBJECT_KEY_ID in extensions:
        (start, stop), _ = _expect(extensions[_SUBJECT_KEY_ID], 0, _OCTET_STRING)
        ski = extensions[_SUBJECT_KEY_ID][start:stop]
    if _AUTHORITY_KEY_ID in extensions:
        value = extensions[_AUTHORITY_KEY_ID]
        (start, stop), _ = _expect(value, 0, _SEQUENCE)
        if start < stop and value[start] == _KEY_ID:
            (id_start, id_end), _ = _expect(value, start, _KEY_ID)
            aki = value[id_start:id_end]
    return CertificateInfo(serial, issuer, subject, not_before, not_after, spki, ski, aki)


def _extensions(der: bytes, start: int, end: int) -> dict[bytes, bytes]:
    """Encoded OID -> extnValue contents, from a TBSCertificate's [3] field."""
    (pos, stop), after = _expect(der, start, _SEQUENCE)
    if after != end:
        raise ValueError("malformed extensions")
    found = {}
    while pos < stop:
        (ext_start, ext_end), pos = _expect(der, pos, _SEQUENCE)
        oid_at = ext_start
        _, at = _expect(der, oid_at, _OID)
        oid = der[oid_at:at]
        if at < ext_end and der[at] == _BOOLEAN:
            _, at = _expect(der, at, _BOOLEAN)
        (value_start, value_end), at = _expect(der, at, _OCTET_STRING)
        if at != ext_end:
            raise ValueError("malformed extension")
        found[oid] = der[value_start:value_end]
    return found


def public_key_of_spki(spki_der: bytes) -> bytes:
    (start, end), _ = _expect(spki_der, 0, _SEQUENCE)
    _, pos = _expect(spki_der, start, _SEQUENCE)  # algorithm
    (key_start, key_end), pos = _expect(spki_der, pos, _BIT_STRING)
    if pos != end or key_end == key_start or spki_der[key_start] != 0:
        raise ValueError("malformed SubjectPublicKeyInfo")
    return spki_der[key_start + 1 : key_end]


def public_key_of_private_key_pem(pem: bytes) -> bytes | None:
    """The EC public point a PKCS#8 EC key file carries (RFC 5915 ``publicKey``), or None if it has none.

    ValueError when the file is not a PKCS#8 key. Compared with the certificate's key, it catches a
    key and a certificate that do not belong together before TLS fails with a vaguer message.
    """
    blocks = pem_blocks(pem, "PRIVATE KEY")
    if not blocks:
        raise ValueError("no PKCS#8 PEM private key")
    der = blocks[0]
    (start, _), _ = _expect(der, 0, _SEQUENCE)  # PrivateKeyInfo
    _, pos = _expect(der, start, _INTEGER)
    _, pos = _expect(der, pos, _SEQUENCE)  # algorithm
    (key_start, key_end), _ = _expect(der, pos, _OCTET_STRING)
    inner = der[key_start:key_end]
    try:
        (ec_start, ec_end), _ = _expect(inner, 0, _SEQUENCE)  # ECPrivateKey
        _, pos = _expect(inner, ec_start, _INTEGER)
        _, pos = _expect(inner, pos, _OCTET_STRING)
    except ValueError:
        return None  # not an EC key: nothing to compare here
    while pos < ec_end:
        tag = inner[pos]
        (field_start, _field_end), pos = _expect(inner, pos, tag)
        if tag == _EC_PUBLIC_KEY:
            (point_start, point_end), _ = _expect(inner, field_start, _BIT_STRING)
            if point_end == point_start or inner[point_start] != 0:
                raise ValueError("malformed EC public key")
            return inner[point_start + 1 : point_end]
    return None


def _expect(der: bytes, pos: int, tag: int) -> tuple[tuple[int, int], int]:
    """((content start, content end), position after) of the element at ``pos``, which must be ``tag``."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    if der[pos] != tag:
        raise ValueError(f"expected DER tag {tag:#04x} at byte {pos}, found {der[pos]:#04x}")
    first = der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(der):
            raise ValueError("unsupported or truncated DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return (pos, pos + length), pos + length


def _time(der: bytes, pos: int) -> tuple[int, int]:
    """An X.509 Time (UTCTime or GeneralizedTime, both in UTC with seconds) as Unix milliseconds."""
    if pos >= len(der):
        raise ValueError("truncated DER")
    tag = der[pos]
    (start, end), after = _expect(der, pos, tag)
    text = der[start:end].decode("ascii", "replace")
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text  # RFC 5280 4.1.2.5.1
    elif not (tag == _GENERALIZED_TIME and re.fullmatch(r"\d{14}Z", text)):
        raise ValueError(f"malformed certificate time {text!r}")
    try:
        when = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"malformed certificate time {text!r}") from exc
    return calendar.timegm(when.utctimetuple()) * 1000, after

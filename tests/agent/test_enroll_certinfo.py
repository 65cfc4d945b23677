"""agent.certinfo reads what cryptography reads, and refuses what it cannot read with ValueError only."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import certinfo, enroll_keys
from collector import pki


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    directory = tmp_path_factory.mktemp("authority") / "pki"
    pki.init_pki(directory)
    return pki.load_pki(directory)


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, start: datetime, end: datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "测试 host")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2**127 + 12345)
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def check_against_cryptography(der: bytes) -> certinfo.CertificateInfo:
    expected = x509.load_der_x509_certificate(der)
    info = certinfo.read_certificate(der)
    assert info.serial == expected.serial_number
    assert info.issuer_der == expected.issuer.public_bytes()
    assert info.subject_der == expected.subject.public_bytes()
    assert info.not_before_ms == ms(expected.not_valid_before_utc)
    assert info.not_after_ms == ms(expected.not_valid_after_utc)
    assert info.spki_der == spki(expected)
    return info


def test_an_agent_certificate_reads_as_the_collector_issued_it(authority: pki.Pki, tmp_path: Path) -> None:
    key = enroll_keys.create_key(tmp_path / "agent.key")
    issued = pki.sign_agent_csr(authority, enroll_keys.make_csr(key, "h"), labels={"department": "市公安局"})
    (der,) = certinfo.pem_blocks(issued.pem, "CERTIFICATE")
    info = check_against_cryptography(der)
    assert info == certinfo.read_certificate_pem(issued.pem)
    assert info.agent_id == issued.agent_id == enroll_keys.agent_id_of(key.public_key())
    assert f"{info.serial:032x}" == issued.serial
    assert info.not_after_ms == ms(issued.not_after)
    ca = certinfo.read_certificate_pem(authority.ca_cert_pem)
    assert info.issued_by(ca) and info.authority_key_id == ca.subject_key_id is not None
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert info.public_key == point
    assert certinfo.public_key_of_private_key_pem((tmp_path / "agent.key").read_bytes()) == point


def test_a_ca_with_the_same_name_but_another_key_did_not_issue_it(authority: pki.Pki, tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "twin")  # same default CA name
    twin = certinfo.read_certificate_pem((tmp_path / "twin" / "ca.crt").read_bytes())
    server = certinfo.read_certificate_pem(authority.server_chain_pem)
    ours = certinfo.read_certificate_pem(authority.ca_cert_pem)
    assert twin.subject_der == ours.subject_der
    assert server.issued_by(ours) and not server.issued_by(twin)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
        (datetime(2025, 2, 28, 12, 0, 1, tzinfo=UTC), datetime(2051, 6, 1, tzinfo=UTC)),  # GeneralizedTime
    ],
)
def test_both_time_encodings_and_rsa_keys(start: datetime, end: datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = check_against_cryptography(self_signed(key, start, end))
    assert (info.not_before_ms, info.not_after_ms) == (ms(start), ms(end))
    assert (info.subject_key_id, info.authority_key_id) == (None, None)
    rsa_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert certinfo.public_key_of_private_key_pem(rsa_pem) is None  # nothing to compare: not refused


def test_a_chain_yields_every_certificate_in_order(authority: pki.Pki) -> None:
    blocks = certinfo.pem_blocks(authority.server_chain_pem, "CERTIFICATE")
    assert blocks == [
        authority.server_cert.public_bytes(serialization.Encoding.DER),
        authority.ca_cert.public_bytes(serialization.Encoding.DER),
    ]
    assert certinfo.pem_blocks(authority.server_key_pem, "CERTIFICATE") == []


def test_damaged_certificates_raise_value_error_and_nothing_else(authority: pki.Pki) -> None:
    der = authority.server_cert.public_bytes(serialization.Encoding.DER)
    for cut in range(len(der)):
        with pytest.raises(ValueError):
            certinfo.read_certificate(der[:cut])
    with pytest.raises(ValueError, match="trailing"):
        certinfo.read_certificate(der + b"\0")
    for position in range(len(der)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(der)
            damaged[position] ^= flip
            with contextlib.suppress(ValueError):  # anything else fails the test
                certinfo.read_certificate(bytes(damaged))
    with pytest.raises(ValueError, match="no PEM certificate"):
        certinfo.read_certificate_pem(b"not a certificate")
    with pytest.raises(ValueError, match="not base64"):
        certinfo.read_certificate_pem(b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="no PKCS#8"):
        certinfo.public_key_of_private_key_pem(authority.ca_cert_pem)


def test_an_invalid_date_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime(2025, 1, 2, tzinfo=UTC)
    der = self_signed(key, start, start + timedelta(days=30))
    assert b"250102000000Z" in der
    with pytest.raises(ValueError, match="malformed certificate time"):
        certinfo.read_certificate(der.replace(b"250102000000Z", b"250231000000Z"))

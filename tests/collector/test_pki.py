"""The collector's CA and the agent's enrollment keys: real files, real crypto, real TLS and gRPC."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import enroll_keys
from agent.enroll_keys import EnrollError
from collector import pki
from collector.pki import Pki, PkiError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("authority") / "pki"
    pki.init_pki(directory, server_names=["10.8.0.1", "Collector.Example.GOV.cn", "::1"])
    return pki.load_pki(directory)


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("other") / "pki"
    pki.init_pki(directory)
    return pki.load_pki(directory)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-host")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- init and load ----------------------------------------------------------------------------


def test_init_creates_the_layout_with_private_modes(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki", now=NOW)

    assert mode(paths.directory) == 0o700
    assert mode(paths.ca_key) == 0o600
    assert mode(paths.server_key) == 0o600
    for public in (paths.ca_cert, paths.server_cert, paths.server_chain):
        assert mode(public) == 0o644
    assert sorted(p.name for p in paths.directory.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server-chain.crt",
        "server.crt",
        "server.key",
    ]
    assert b"BEGIN PRIVATE KEY" in paths.ca_key.read_bytes()  # PKCS#8
    chain = x509.load_pem_x509_certificates(paths.server_chain.read_bytes())
    assert [der(c) for c in chain] == [
        der(x509.load_pem_x509_certificate(paths.server_cert.read_bytes())),
        der(x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())),
    ]


def test_init_refuses_to_replace_a_pki_unless_forced(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_pki(directory)
    before = pki.load_pki(directory).ca_fingerprint

    with pytest.raises(PkiError, match=r"already holds a PKI \(.*ca\.crt.*\).*enroll again"):
        pki.init_pki(directory)
    assert pki.load_pki(directory).ca_fingerprint == before

    pki.init_pki(directory, force=True)
    assert pki.load_pki(directory).ca_fingerprint != before


def test_init_rejects_a_server_name_that_is_neither_dns_nor_ip(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="'bad name!' is neither a DNS name nor an IP address"):
        pki.init_pki(tmp_path / "pki", server_names=["bad name!"])
    assert not (tmp_path / "pki").exists()


def test_ca_certificate_is_a_path_length_zero_ca_for_signing(authority: Pki) -> None:
    ca = authority.ca_cert
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_verifies_against_the_ca_and_names_the_collector(authority: Pki) -> None:
    server = authority.server_cert
    server.verify_directly_issued_by(authority.ca_cert)

    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["zonewatch-collector", "collector.example.gov.cn"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.8.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_load_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki")
    paths.server_key.chmod(0o644)
    with pytest.raises(PkiError, match=r"server\.key is readable by others \(mode 0644\): run chmod 600"):
        pki.load_pki(paths.directory)


def test_load_refuses_a_server_certificate_from_another_ca(tmp_path: Path) -> None:
    ours = pki.init_pki(tmp_path / "ours")
    theirs = pki.init_pki(tmp_path / "theirs")
    ours.server_cert.write_bytes(theirs.server_cert.read_bytes())
    ours.server_key.write_bytes(theirs.server_key.read_bytes())
    with pytest.raises(PkiError, match=r"server\.crt was not signed by the CA"):
        pki.load_pki(ours.directory)


def test_load_refuses_a_key_that_does_not_match_its_certificate(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki")
    paths.server_key.write_bytes(paths.ca_key.read_bytes())
    with pytest.raises(PkiError, match=r"server\.key is not the key of .*server\.crt"):
        pki.load_pki(paths.directory)


def test_load_explains_a_missing_pki(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"no CA in .*zonewatch-collector init"):
        pki.load_pki(tmp_path / "nothing")


# --- agent certificates -----------------------------------------------------------------------


def test_agent_csr_yields_a_certificate_named_by_its_key_on_both_sides(
    authority: Pki, tmp_path: Path
) -> None:
    key = enroll_keys.create_key(tmp_path / "agent" / "agent.key")
    csr = enroll_keys.make_csr(key, "host-17.bureau.example")

    issued = pki.sign_agent_csr(authority, csr, labels={"site": "北京", "zone": "dmz"}, days=30, now=NOW)

    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(authority.ca_cert)
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == issued.agent_id == pki.agent_id_of(key.public_key())
    assert enroll_keys.agent_id_of(key.public_key()) == pki.agent_id_of(key.public_key())
    assert len(issued.agent_id) == 32 and issued.agent_id == issued.agent_id.lower()
    assert "host-17" not in cert.subject.rfc4514_string()  # the CSR's subject is not copied
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [
        "site=北京",
        "zone=dmz",
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert issued.serial == f"{cert.serial_number:032x}" and len(issued.serial) == 32
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == issued.not_after == NOW + timedelta(days=30)
    assert pki.identity_of(issued.pem) == pki.AgentIdentity(issued.agent_id, issued.serial, issued.not_after)
    assert pki.identity_of(der(cert)) == pki.identity_of(issued.pem)


def test_each_certificate_gets_a_fresh_serial(authority: Pki) -> None:
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()))
    serials = {pki.sign_agent_csr(authority, csr, labels={}).serial for _ in range(5)}
    assert len(serials) == 5


def test_agent_certificate_never_outlives_the_ca(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "pki", ca_days=10, now=NOW)
    authority = pki.load_pki(tmp_path / "pki")
    issued = pki.sign_agent_csr(
        authority, csr_for(ec.generate_private_key(ec.SECP256R1())), labels={}, days=90, now=NOW
    )
    assert issued.not_after == authority.ca_cert.not_valid_after_utc == NOW + timedelta(days=10)


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)],
    ids=["ec-p384", "rsa-2048"],
)
def test_other_allowed_keys_are_signed(authority: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    issued = pki.sign_agent_csr(authority, csr_for(key), labels={})
    assert issued.agent_id == pki.agent_id_of(key.public_key())


def test_garbage_csr_is_rejected(authority: Pki) -> None:
    with pytest.raises(PkiError, match="not a PEM certificate signing request"):
        pki.sign_agent_csr(authority, b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", labels={})
    with pytest.raises(PkiError, match="too large"):
        pki.sign_agent_csr(authority, b"x" * 20_000, labels={})


def test_tampered_csr_is_rejected(authority: Pki) -> None:
    csr = x509.load_pem_x509_csr(csr_for(ec.generate_private_key(ec.SECP256R1())))
    tampered = der_to_pem(csr.public_bytes(serialization.Encoding.DER).replace(b"agent-host", b"agent-hosX"))
    with pytest.raises(PkiError, match="signature does not verify: tampered"):
        pki.sign_agent_csr(authority, tampered, labels={})


@pytest.mark.parametrize(
    ("key", "described"),
    [
        (rsa.generate_private_key(65537, 1024), "RSA 1024"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (ec.generate_private_key(ec.SECP521R1()), "EC secp521r1"),
    ],
    ids=["rsa-1024", "ed25519", "ec-p521"],
)
def test_disallowed_key_types_are_rejected(authority: Pki, key: rsa.RSAPrivateKey, described: str) -> None:
    with pytest.raises(PkiError, match=f"key {described} is not allowed: use EC P-256, EC P-384 or RSA"):
        pki.sign_agent_csr(authority, csr_for(key), labels={})


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"Site": "x"}, "label name 'Site'"),
        ({"site": ""}, "label site: the value must be printable"),
        ({"site": "a\nb"}, "label site: the value must be printable"),
        ({"site": "x" * 60}, "at most 64 characters"),
        ({f"k{i}": "v" for i in range(17)}, "too many labels"),
    ],
)
def test_bad_labels_are_rejected(authority: Pki, labels: dict[str, str], message: str) -> None:
    with pytest.raises(PkiError, match=message):
        pki.sign_agent_csr(authority, csr_for(ec.generate_private_key(ec.SECP256R1())), labels=labels)


def test_identity_of_refuses_a_certificate_whose_name_is_not_its_key(authority: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    victim = pki.agent_id_of(ec.generate_private_key(ec.SECP256R1()).public_key())
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, victim)]))
        .issuer_name(authority.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(authority.ca_key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match=f"names agent '{victim}' but its key is agent"):
        pki.identity_of(pem(forged))
    with pytest.raises(PkiError, match="cannot be parsed"):
        pki.identity_of(b"not a certificate")


# --- fingerprints and tokens ------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_der(authority: Pki) -> None:
    digest = authority.ca_cert.fingerprint(hashes.SHA256()).hex()
    assert pki.fingerprint(authority.ca_cert) == digest == authority.ca_fingerprint
    assert pki.fingerprint(authority.ca_cert, prefixed=True) == f"SHA256:{digest}"


@pytest.mark.parametrize(
    "form",
    [
        lambda h: h,
        lambda h: h.upper(),
        lambda h: f"SHA256:{h}",
        lambda h: f"  sha256:{h.upper()}\n",
        lambda h: ":".join(h[i : i + 2] for i in range(0, 64, 2)),
        lambda h: "Sha256:" + ":".join(h[i : i + 2] for i in range(0, 64, 2)).upper(),
    ],
    ids=["hex", "upper", "prefixed", "lower-prefix-padded", "colons", "prefixed-colons-upper"],
)
def test_fingerprint_parsing_accepts_the_usual_forms(authority: Pki, form: Callable[[str], str]) -> None:
    digest = authority.ca_fingerprint
    text = form(digest)
    assert pki.parse_fingerprint(text) == digest
    assert enroll_keys.parse_fingerprint(text) == digest


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "abc",
        "g" * 64,
        "a" * 63,
        "a" * 65,
        "sha1:" + "a" * 64,
        "a:" * 32,
        "aa:bb" + "c" * 60,
        "SHA256: " + "a" * 64,
    ],
)
def test_fingerprint_parsing_rejects_junk(junk: str) -> None:
    with pytest.raises(PkiError, match="not a SHA-256 fingerprint"):
        pki.parse_fingerprint(junk)
    with pytest.raises(EnrollError, match="not a SHA-256 fingerprint"):
        enroll_keys.parse_fingerprint(junk)


def test_tokens_are_prefixed_random_and_stored_as_hashes() -> None:
    tokens = {pki.new_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert token.startswith("zwt_") and len(token) == 47
    assert len(base64.urlsafe_b64decode(token[4:] + "=")) == 32  # 256 random bits
    stored = pki.token_hash(token)
    assert len(stored) == 64 and token not in stored
    assert pki.token_hash(f" {token}\n") == stored
    assert pki.token_matches(token, stored)
    assert not pki.token_matches(pki.new_token(), stored)
    assert not pki.token_matches("zwt_short", stored)
    with pytest.raises(PkiError, match="not an enrollment token"):
        pki.token_hash("password123")


# --- the agent's key and the pinned CA --------------------------------------------------------


def test_agent_key_is_private_and_never_silently_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent.key"
    key = enroll_keys.create_key(path)
    assert mode(path) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    assert enroll_keys.agent_id_of(enroll_keys.load_key(path).public_key()) == enroll_keys.agent_id_of(
        key.public_key()
    )

    with pytest.raises(EnrollError, match="already holds a key; replacing it gives the agent a new identity"):
        enroll_keys.create_key(path)
    replaced = enroll_keys.create_key(path, overwrite=True)
    assert enroll_keys.agent_id_of(replaced.public_key()) != enroll_keys.agent_id_of(key.public_key())

    path.chmod(0o640)
    with pytest.raises(EnrollError, match=r"readable by others \(mode 0640\)"):
        enroll_keys.load_key(path)


def test_check_ca_accepts_the_pinned_chain(authority: Pki) -> None:
    chain = [der(authority.server_cert), der(authority.ca_cert)]
    pinned = pki.fingerprint(authority.ca_cert, prefixed=True)
    assert enroll_keys.check_ca(chain, pinned) == authority.ca_cert_pem


def test_check_ca_refuses_a_wrong_fingerprint(authority: Pki, other_authority: Pki) -> None:
    chain = [der(authority.server_cert), der(authority.ca_cert)]
    with pytest.raises(EnrollError, match=r"presented no certificate with fingerprint .*man in the middle"):
        enroll_keys.check_ca(chain, other_authority.ca_fingerprint)


def test_check_ca_refuses_a_ca_that_did_not_sign_the_leaf(authority: Pki, other_authority: Pki) -> None:
    chain = [der(authority.server_cert), der(other_authority.ca_cert)]
    with pytest.raises(EnrollError, match="did not sign the collector's certificate"):
        enroll_keys.check_ca(chain, other_authority.ca_fingerprint)


def test_check_ca_refuses_a_pinned_certificate_that_is_not_a_ca(authority: Pki) -> None:
    chain = [der(authority.server_cert), der(authority.ca_cert)]
    with pytest.raises(EnrollError, match="is not a CA"):
        enroll_keys.check_ca(chain, pki.fingerprint(authority.server_cert))


@dataclass
class TlsServer:
    port: int
    handshakes: list[str]


@pytest.fixture
def tls_server(authority: Pki) -> Iterator[TlsServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(authority.paths.server_chain, authority.paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    server = TlsServer(listener.getsockname()[1], [])

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            server.handshakes.append(tls.version() or "")
            tls.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    thread.join(timeout=10)
    listener.close()


def test_fetch_presented_chain_returns_what_a_tls_server_presents(
    authority: Pki, tls_server: TlsServer
) -> None:
    chain = enroll_keys.fetch_presented_chain("127.0.0.1", tls_server.port, timeout=10)
    assert chain == [der(authority.server_cert), der(authority.ca_cert)]
    assert enroll_keys.check_ca(chain, authority.ca_fingerprint) == authority.ca_cert_pem


def test_fetch_presented_chain_explains_an_unreachable_collector() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(EnrollError, match=f"cannot fetch the collector's certificates from 127.0.0.1:{port}"):
        enroll_keys.fetch_presented_chain("127.0.0.1", port, timeout=5)


# --- the pieces fit gRPC's mTLS ---------------------------------------------------------------


def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    peer = context.auth_context().get("x509_pem_cert")
    if not peer:
        return b"anonymous"
    return pki.identity_of(peer[0]).agent_id.encode()


def test_grpc_mtls_names_the_agent_by_its_key(authority: Pki, tmp_path: Path) -> None:
    """Enrollment end to end, minus the RPC: pin, fetch, check, request, sign, connect, identify.

    grpc's Python ``require_client_auth=False`` does not even ask for a client certificate, so the
    peer certificate is only seen on a port that requires one: the enrollment port (server TLS
    only) and the reporting port (mTLS) are two listeners with two credentials.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "zonewatch.test.Probe",
        {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)},
    )
    server.add_generic_rpc_handlers([handler])
    identity = [(authority.server_key_pem, authority.server_chain_pem)]
    mtls_port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            identity, root_certificates=authority.ca_cert_pem, require_client_auth=True
        ),
    )
    enroll_port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            identity, root_certificates=authority.ca_cert_pem, require_client_auth=False
        ),
    )
    server.start()
    try:
        chain = enroll_keys.fetch_presented_chain("127.0.0.1", enroll_port, timeout=10)
        ca_pem = enroll_keys.check_ca(chain, pki.fingerprint(authority.ca_cert, prefixed=True))
        key = enroll_keys.create_key(tmp_path / "agent.key")
        issued = pki.sign_agent_csr(authority, enroll_keys.make_csr(key, "host-1"), labels={})
        key_pem = (tmp_path / "agent.key").read_bytes()
        options = [("grpc.ssl_target_name_override", "zonewatch-collector")]

        def ask(port: int, credentials: grpc.ChannelCredentials) -> bytes:
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
                result: bytes = channel.unary_unary("/zonewatch.test.Probe/WhoAmI")(b"", timeout=10)
                return result

        with_cert = grpc.ssl_channel_credentials(ca_pem, private_key=key_pem, certificate_chain=issued.pem)
        assert (
            ask(mtls_port, with_cert).decode() == issued.agent_id == enroll_keys.agent_id_of(key.public_key())
        )
        assert ask(enroll_port, grpc.ssl_channel_credentials(ca_pem)) == b"anonymous"
        assert ask(enroll_port, with_cert) == b"anonymous"  # no CertificateRequest: the cert is never sent
        with pytest.raises(grpc.RpcError) as refused:
            ask(mtls_port, grpc.ssl_channel_credentials(ca_pem))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def der_to_pem(data: bytes) -> bytes:
    body = base64.encodebytes(data)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"

"""Trust, end to end on a real collector: enrollment over TLS, identity from the certificate over
mTLS, revocation of open streams without a restart, token rules and the lockout."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Collector, Stream, now_ms, run_cli

from agent import enroll_keys
from agent.wire import hello_request
from collector import pki
from collector.model import HostLabels
from collector.store import enrollment
from collector.store.database import open_database
from protos.zonewatch.v1 import agent_pb2

ENROLL = "/zonewatch.v1.AgentService/Enroll"
RENEW = "/zonewatch.v1.AgentService/Renew"
POLICY = "/zonewatch.v1.AgentService/GetPolicy"
NAME = ("grpc.ssl_target_name_override", pki.SERVER_NAME)


class Host:
    """An agent's key and certificate, made the way the agent makes them."""

    def __init__(self, directory: Path, hostname: str, machine_id: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = enroll_keys.create_key(directory / "agent.key")
        self.key_pem = (directory / "agent.key").read_bytes()
        self.agent_id = enroll_keys.agent_id_of(self.key.public_key())
        self.hostname = hostname
        self.machine_id = machine_id
        self.cert_pem = b""

    def csr(self) -> bytes:
        return enroll_keys.make_csr(self.key, self.hostname)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    db = tmp_path / "collector.db"
    run_cli("zonewatch-collector", "init", "--db", str(db))
    c = Collector(db, tls=True)
    yield c
    c.stop()


def ca_pem(collector: Collector) -> bytes:
    return (collector.db.parent / "pki" / "ca.crt").read_bytes()


def token(
    collector: Collector,
    uses: int = 1,
    expires_ms: int = 3_600_000,
    replaces: int | None = None,
    **labels: str,
) -> str:
    text = pki.new_token()
    db = open_database(collector.db)
    try:
        enrollment.create_token(
            db,
            pki.token_hash(text),
            HostLabels(**{"department": "", "county": "", "site": "", "role": "", **labels}),
            now_ms=now_ms(),
            expires_ms=now_ms() + expires_ms,
            uses=uses,
            replaces=replaces,
        )
    finally:
        db.close()
    return text


def enroll(collector: Collector, host: Host, token_text: str) -> agent_pb2.EnrollResponse:
    with grpc.secure_channel(
        f"127.0.0.1:{collector.enroll_port}", grpc.ssl_channel_credentials(ca_pem(collector)), [NAME]
    ) as channel:
        call = channel.unary_unary(
            ENROLL,
            request_serializer=agent_pb2.EnrollRequest.SerializeToString,
            response_deserializer=agent_pb2.EnrollResponse.FromString,
        )
        request = agent_pb2.EnrollRequest(
            token=token_text, csr_pem=host.csr(), hostname=host.hostname, machine_id=host.machine_id
        )
        reply: agent_pb2.EnrollResponse = call(request, timeout=10)
    host.cert_pem = reply.certificate_pem
    return reply


def mtls(collector: Collector, host: Host) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca_pem(collector), host.key_pem, host.cert_pem)
    return grpc.secure_channel(collector.target, credentials, [NAME])


def hello(agent_id: str, hostname: str = "h", department: str = "") -> bytes:
    labels = {"department": department}
    return hello_request(agent_id, hostname, "test", labels, "", now_ms()).SerializeToString()


def report(collector: Collector, host: Host, claimed: str | None = None) -> Stream:
    agent_id = claimed or host.agent_id
    return Stream(collector.target, agent_id, hello(agent_id, host.hostname), channel=mtls(collector, host))


def agent_row(db: Path, agent_id: str) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return dict(row) if row else {}
    finally:
        con.close()


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_an_enrolled_agent_reports_over_mtls_with_the_labels_of_its_token(
    tmp_path: Path, collector: Collector
) -> None:
    host = Host(tmp_path / "a", "ga-ws-01")
    reply = enroll(collector, host, token(collector, department="市公安局", county="高新区"))
    assert reply.agent_id == host.agent_id
    assert reply.labels.department == "市公安局" and reply.ca_pem == ca_pem(collector)
    assert reply.not_after_ms > now_ms() + 89 * 86_400_000
    stream = report(collector, host)
    try:
        assert stream.welcome.WhichOneof("body") == "welcome"
        assert stream.batch(1).ack.acked_seq == 1
    finally:
        stream.close()
    # The host said nothing about labels in its hello; the token's labels stand.
    row = agent_row(collector.db, host.agent_id)
    assert (row["department"], row["county"], row["hostname"]) == ("市公安局", "高新区", "ga-ws-01")


def test_a_certificate_cannot_speak_for_another_agent(tmp_path: Path, collector: Collector) -> None:
    a, b = Host(tmp_path / "a", "a"), Host(tmp_path / "b", "b")
    enroll(collector, a, token(collector))
    enroll(collector, b, token(collector))
    with pytest.raises(grpc.RpcError) as info:
        report(collector, b, claimed=a.agent_id)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"belongs to agent {b.agent_id}, not {a.agent_id}" in str(info.value.details())
    assert agent_row(collector.db, a.agent_id)["last_seq"] == 0  # nothing stored for A


def test_no_client_certificate_no_report(tmp_path: Path, collector: Collector) -> None:
    channel = grpc.secure_channel(collector.target, grpc.ssl_channel_credentials(ca_pem(collector)), [NAME])
    with pytest.raises(grpc.RpcError) as info:
        Stream(collector.target, "x" * 32, hello("x" * 32), channel=channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails
    # ... and the enrollment port, which asks for none, admits no Report either.
    plain = grpc.secure_channel(
        f"127.0.0.1:{collector.enroll_port}", grpc.ssl_channel_credentials(ca_pem(collector)), [NAME]
    )
    with pytest.raises(grpc.RpcError) as info:
        Stream(collector.target, "x" * 32, hello("x" * 32), channel=plain)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_revoked_agent_is_cut_off_within_a_second_open_stream_included(
    tmp_path: Path, collector: Collector
) -> None:
    host = Host(tmp_path / "a", "ga-ws-02")
    enroll(collector, host, token(collector))
    stream = report(collector, host)
    assert stream.batch(1).ack.acked_seq == 1
    revoked_at = time.monotonic()
    run_cli("zonewatch-collector", "agents", "revoke", host.agent_id[:12], "--db", str(collector.db))
    with pytest.raises(grpc.RpcError) as info:
        next(stream.responses)  # the stream ends by itself: no batch needed
    elapsed = time.monotonic() - revoked_at
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert elapsed < 1.5, f"revocation took {elapsed:.2f} s"  # the CLI's own start-up is in this figure
    stream.close()
    with pytest.raises(grpc.RpcError) as info:
        report(collector, host)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in str(info.value.details())


def test_tokens_are_single_use_expire_and_lock_out_guessers(tmp_path: Path, collector: Collector) -> None:
    once = token(collector)
    enroll(collector, Host(tmp_path / "a", "a"), once)
    with pytest.raises(grpc.RpcError) as info:
        enroll(collector, Host(tmp_path / "b", "b"), once)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "used" in str(info.value.details())
    expired = token(collector, expires_ms=1)
    time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as info:
        enroll(collector, Host(tmp_path / "c", "c"), expired)
    assert "expired" in str(info.value.details())
    # Three more wrong guesses make five failures from this address: locked out, even with a good token.
    for guess in range(3):
        with pytest.raises(grpc.RpcError):
            enroll(collector, Host(tmp_path / f"d{guess}", "d"), pki.new_token())
    good = token(collector)
    with pytest.raises(grpc.RpcError) as info:
        enroll(collector, Host(tmp_path / "e", "e"), good)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many failed enrollments from 127.0.0.1" in str(info.value.details())


def test_a_reinstalled_host_takes_over_its_record(tmp_path: Path, collector: Collector) -> None:
    first = Host(tmp_path / "first", "ga-db-01", machine_id="0123456789abcdef0123456789abcdef")
    enroll(collector, first, token(collector, department="市公安局"))
    stream = report(collector, first)
    assert stream.batch(5).ack.acked_seq == 5
    stream.close()
    key = agent_row(collector.db, first.agent_id)["id"]
    # What a host says about itself takes over nothing: same machine id and hostname, a new record.
    impostor = Host(tmp_path / "impostor", "ga-db-01", machine_id=first.machine_id)
    enroll(collector, impostor, token(collector, department="市公安局"))
    assert agent_row(collector.db, impostor.agent_id)["id"] != key
    assert agent_row(collector.db, first.agent_id)["id"] == key
    # A token made for it (tokens create --replace) does.
    again = Host(tmp_path / "again", "ga-db-01", machine_id=first.machine_id)  # new key, same machine
    enroll(collector, again, token(collector, replaces=key, department="市公安局"))
    row = agent_row(collector.db, again.agent_id)
    assert row["id"] == key and row["last_seq"] == 0  # the same record; its sequence starts afresh
    assert agent_row(collector.db, first.agent_id) == {}
    stream = report(collector, again)
    assert stream.welcome.welcome.acked_seq == 0 and stream.batch(1).ack.acked_seq == 1
    stream.close()
    with pytest.raises(grpc.RpcError) as info:
        report(collector, first)  # the old installation's certificate is revoked
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_key_cannot_enroll_itself_back(tmp_path: Path, collector: Collector) -> None:
    host = Host(tmp_path / "a", "ga-ws-09")
    enroll(collector, host, token(collector))
    run_cli("zonewatch-collector", "agents", "revoke", host.agent_id, "--db", str(collector.db))
    with pytest.raises(grpc.RpcError) as info:
        enroll(collector, host, token(collector))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in str(info.value.details())


def test_renewal_gives_the_same_key_a_fresh_certificate(tmp_path: Path, collector: Collector) -> None:
    host = Host(tmp_path / "a", "a")
    first = enroll(collector, host, token(collector))
    with mtls(collector, host) as channel:
        renew = channel.unary_unary(
            RENEW,
            request_serializer=agent_pb2.RenewRequest.SerializeToString,
            response_deserializer=agent_pb2.EnrollResponse.FromString,
        )
        renewed = renew(agent_pb2.RenewRequest(csr_pem=host.csr()), timeout=10)
        other = Host(tmp_path / "b", "b")
        assert code_of(lambda: renew(agent_pb2.RenewRequest(csr_pem=other.csr()), timeout=10)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    assert renewed.agent_id == host.agent_id and renewed.certificate_pem != first.certificate_pem
    host.cert_pem = renewed.certificate_pem
    stream = report(collector, host)
    assert stream.batch(1).ack.acked_seq == 1
    stream.close()


def test_bad_enrollment_input_gets_a_clear_status(tmp_path: Path, collector: Collector) -> None:
    host = Host(tmp_path / "a", "a")
    with grpc.secure_channel(
        f"127.0.0.1:{collector.enroll_port}", grpc.ssl_channel_credentials(ca_pem(collector)), [NAME]
    ) as channel:
        raw = channel.unary_unary(ENROLL, request_serializer=None, response_deserializer=None)
        good = token(collector)
        cases = {
            b"\x0a\x03\xff\xfe\xfd": "not a zonewatch.v1.EnrollRequest",  # token: invalid UTF-8
            agent_pb2.EnrollRequest(token=good, csr_pem=b"junk", hostname="a").SerializeToString(): "csr_pem",
            agent_pb2.EnrollRequest(token=good, csr_pem=host.csr()).SerializeToString(): "hostname",
        }
        for request, expected in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                raw(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in str(info.value.details())
    # None of that used the token up.
    enroll(collector, host, good)


def test_policy_is_served_only_to_enrolled_agents(tmp_path: Path, collector: Collector) -> None:
    host = Host(tmp_path / "a", "a")
    enroll(collector, host, token(collector))
    request = agent_pb2.GetPolicyRequest(agent_id=host.agent_id)
    with mtls(collector, host) as channel:
        call = channel.unary_unary(
            POLICY,
            request_serializer=agent_pb2.GetPolicyRequest.SerializeToString,
            response_deserializer=agent_pb2.GetPolicyResponse.FromString,
        )
        assert call(request, timeout=10).version
        spoofed = agent_pb2.GetPolicyRequest(agent_id="f" * 32)
        assert code_of(lambda: call(spoofed, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED


def test_serve_without_a_pki_says_how_to_make_one(tmp_path: Path) -> None:
    result = run_cli("zonewatch-collector", "serve", "--db", str(tmp_path / "c.db"), check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "zonewatch-collector init" in last and "--insecure" in last


def test_tokens_command_prints_the_enroll_command_once_and_stores_a_hash(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    out = run_cli("zonewatch-collector", "init", "--db", str(db)).stdout
    fingerprint = out.split("CA fingerprint")[1].split()[0]
    out = run_cli(
        "zonewatch-collector", "tokens", "create", "--db", str(db), "--department", "市人社局",
        "--uses", "3", "--collector", "10.10.0.5:7390",
    ).stdout  # fmt: skip
    text = out.split(": ", 1)[1].split()[0]
    assert (
        f"zonewatch-agent enroll --collector 10.10.0.5:7390 --token {text} --ca-fingerprint {fingerprint}"
        in out
    )
    con = sqlite3.connect(db)
    try:
        stored = con.execute("SELECT token_hash, uses_left, department FROM enrollment_tokens").fetchall()
    finally:
        con.close()
    assert stored == [(pki.token_hash(text), 3, "市人社局")]
    listed = run_cli("zonewatch-collector", "tokens", "list", "--db", str(db), "--format", "json").stdout
    assert text not in listed and "市人社局" in listed
    run_cli("zonewatch-collector", "tokens", "revoke", "1", "--db", str(db))
    again = run_cli("zonewatch-collector", "tokens", "revoke", "1", "--db", str(db), check=False)
    assert again.returncode == 2 and "already revoked" in again.stderr

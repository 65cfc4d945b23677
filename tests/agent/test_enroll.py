"""`zonewatch-agent enroll`, `run` and `status` against a minimal real collector: real CA, TLS, gRPC.

The collector is ``enroll_collector.MiniCollector`` (signing with collector.pki); the state
directory is a real one in tmp_path; the command line is called in-process.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from enroll_collector import LABELS, MiniCollector

from agent import cli, enroll_keys
from agent.credentials import StatePaths, load_credentials
from agent.errors import CredentialsError, NotEnrolledError
from agent.spool import Spool
from collector import pki

TOKEN = "zwt_" + "a" * 43
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    directory = tmp_path_factory.mktemp("authority") / "pki"
    pki.init_pki(directory)
    return pki.load_pki(directory)


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    directory = tmp_path_factory.mktemp("other") / "pki"
    pki.init_pki(directory)
    return pki.load_pki(directory)


@pytest.fixture
def collector(authority: pki.Pki) -> Iterator[MiniCollector]:
    with MiniCollector(authority, token=TOKEN) as server:
        yield server


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def agent_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def enroll(
    capsys: pytest.CaptureFixture[str],
    collector: MiniCollector,
    state: Path,
    *extra: str,
    token: str = TOKEN,
    fingerprint: str | None = None,
) -> tuple[int, str, str]:
    return agent_cli(
        capsys,
        "enroll",
        "--collector",
        collector.target,
        "--enroll-port",
        str(collector.enroll_port),
        "--token",
        token,
        "--ca-fingerprint",
        fingerprint or pki.fingerprint(collector.authority.ca_cert, prefixed=True),
        "--state-dir",
        str(state),
        "--hostname",
        "ga-ws-01",
        "--timeout",
        "5",
        *extra,
    )


def one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    if line.startswith("{"):  # stderr is not a terminal: the error is a JSON log event (agent/logfmt.py)
        event = json.loads(line)
        assert event["level"] == "error" and event["exit_status"] == 2, line
        line = f"zonewatch-agent: error: {event['msg']}"
    assert line.startswith("zonewatch-agent: error: ")
    return line


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- enroll -----------------------------------------------------------------------------------


def test_enroll_stores_the_identity_with_private_modes(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    code, out, err = enroll(capsys, collector, state)
    assert code == 0, err
    paths = StatePaths.of(state)
    assert sorted(p.name for p in state.iterdir()) == ["enrollment.json", "tls"]  # no staging left over
    assert sorted(p.name for p in paths.tls_dir.iterdir()) == [
        "agent.crt",
        "agent.csr",
        "agent.key",
        "ca.crt",
    ]
    assert mode(paths.tls_dir) == 0o700
    assert mode(paths.key) == 0o600
    assert (mode(paths.cert), mode(paths.ca), mode(paths.enrollment)) == (0o644, 0o644, 0o644)

    key = enroll_keys.load_key(paths.key)
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    agent_id = pki.agent_id_of(key.public_key())
    assert pki.identity_of(paths.cert.read_bytes()).agent_id == agent_id
    assert paths.ca.read_bytes() == collector.authority.ca_cert_pem
    assert x509.load_pem_x509_csr(paths.csr.read_bytes()).public_key() == key.public_key()

    record = json.loads(paths.enrollment.read_text(encoding="utf-8"))
    assert record["collector"] == collector.target
    assert record["enroll_port"] == collector.enroll_port
    assert record["agent_id"] == agent_id
    assert record["labels"] == LABELS
    assert record["not_after_ms"] == int(cert.not_valid_after_utc.timestamp() * 1000)
    assert record["enrolled_ms"] > 0 and record["renewed_ms"] == 0

    (request,) = collector.enroll_requests
    assert (request.token, request.hostname) == (TOKEN, "ga-ws-01")
    assert request.csr_pem == paths.csr.read_bytes()
    expected_machine_id = ""
    if os.access("/etc/machine-id", os.R_OK):
        expected_machine_id = Path("/etc/machine-id").read_text(encoding="ascii").strip()
    assert request.machine_id == expected_machine_id

    assert f"enrolled as agent {agent_id}" in out
    assert "department=市公安局 county=高新区 site=主机房 role=server" in out
    assert f"valid until {cert.not_valid_after_utc:%Y-%m-%d}" in out


def test_a_collector_with_another_ca_is_refused_and_nothing_is_written(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path, other_authority: pki.Pki
) -> None:
    code, _, err = enroll(capsys, collector, state, fingerprint=other_authority.ca_fingerprint)
    assert "wrong collector, or a man in the middle" in one_line_error(code, err)
    assert not collector.enroll_requests, "the token must not be offered to an unverified collector"
    assert not StatePaths.of(state).tls_dir.exists() and not StatePaths.of(state).enrollment.exists()


def test_a_refused_token_is_one_line_and_keeps_the_enrollment_in_place(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    assert enroll(capsys, collector, state)[0] == 0
    before = {p.name: p.read_bytes() for p in StatePaths.of(state).tls_dir.iterdir()}
    code, _, err = enroll(capsys, collector, state, "--force")  # the token is spent
    line = one_line_error(code, err)
    assert "refused the token (unknown, expired or used token)" in line
    assert "ask for a new one" in line
    assert {p.name: p.read_bytes() for p in StatePaths.of(state).tls_dir.iterdir()} == before
    assert not (state / "tls.new").exists()
    load_credentials(state)  # still whole


def test_too_many_bad_tokens_lock_the_address_out(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    for _ in range(collector.lockout_after):
        code, _, err = enroll(capsys, collector, state, token="zwt_" + "x" * 43)
        assert "refused the token" in one_line_error(code, err)
    code, _, err = enroll(capsys, collector, state)  # even the good token, for a while
    line = one_line_error(code, err)
    assert "locked this address out after too many bad tokens (too many failed enrollments)" in line
    assert not (state / "tls").exists() and not (state / "tls.new").exists()


def test_force_replaces_the_identity_and_keeps_the_spool(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    assert enroll(capsys, collector, state)[0] == 0
    first = load_credentials(state)
    with Spool(state / "spool.db") as spool:
        spool.append(lambda seq: (b"batch %d" % seq, 1, 0, 0))
        spool.append(lambda seq: (b"batch %d" % seq, 1, 0, 0))

    collector.tokens.add("zwt_" + "b" * 43)
    code, _, err = enroll(capsys, collector, state, token="zwt_" + "b" * 43)
    assert "already holds an enrollment" in one_line_error(code, err)
    assert "--force" in err
    assert len(collector.enroll_requests) == 1, "refused before contacting the collector"

    code, out, err = enroll(capsys, collector, state, "--force", token="zwt_" + "b" * 43)
    assert code == 0, err
    second = load_credentials(state)
    assert second.agent_id != first.agent_id
    assert second.tls.key_pem != first.tls.key_pem
    assert sorted(p.name for p in state.iterdir()) == ["enrollment.json", "spool.db", "tls"]
    assert "spool           kept" in out
    with Spool(state / "spool.db") as spool:
        assert [b.seq for b in spool.pending()] == [1, 2]
        assert spool.stats().next_seq == 3  # sequence numbers continue under the new identity


def test_enroll_explains_an_unreachable_collector(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code = cli.main(
        [
            *("enroll", "--collector", "127.0.0.1:9", "--enroll-port", "9", "--token", TOKEN),
            *("--ca-fingerprint", "ab" * 32, "--state-dir", str(state), "--timeout", "2"),
        ]
    )
    assert "cannot fetch the collector's certificates from 127.0.0.1:9" in one_line_error(
        code, capsys.readouterr().err
    )


def test_enroll_refuses_a_malformed_fingerprint(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code = cli.main(
        [
            *("enroll", "--collector", "127.0.0.1:9", "--token", TOKEN),
            *("--ca-fingerprint", "9f86d0", "--state-dir", str(state)),
        ]
    )
    assert "not a SHA-256 fingerprint" in one_line_error(code, capsys.readouterr().err)


# --- run: enrolled, not enrolled, insecure ----------------------------------------------------


def test_run_refuses_to_start_when_not_enrolled(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code, _, err = agent_cli(capsys, "run", "--state-dir", str(state), "--interval", "1")
    line = one_line_error(code, err)
    assert "not enrolled" in line
    assert "zonewatch-agent enroll --collector" in line
    assert "--insecure" in line
    assert not (state / "agent_id").exists() and not (state / "spool.db").exists()


def test_run_uses_the_collector_it_enrolled_with_unless_told_otherwise(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    assert enroll(capsys, collector, state)[0] == 0
    parser = cli.build_parser()
    assert cli._config(parser.parse_args(["run", "--state-dir", str(state)])).collector == collector.target
    other = ["run", "--state-dir", str(state), "--collector", "10.9.9.9:7390"]
    assert cli._config(parser.parse_args(other)).collector == "10.9.9.9:7390"
    insecure = ["run", "--state-dir", str(state), "--insecure"]
    assert cli._config(parser.parse_args(insecure)).collector == "127.0.0.1:7390"


def test_insecure_from_the_config_file_needs_no_enrollment(tmp_path: Path, state: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'insecure = true\nstate_dir = "{state}"\n', encoding="utf-8")
    config = cli._config(cli.build_parser().parse_args(["run", "--config", str(config_file)]))
    assert config.insecure
    assert cli._credentials(config) is None  # run proceeds with today's plaintext agent
    with pytest.raises(NotEnrolledError):
        cli._credentials(cli._config(cli.build_parser().parse_args(["run", "--state-dir", str(state)])))


@pytest.mark.parametrize("damage", ["agent id", "key mode", "other key", "other ca", "no enrollment.json"])
def test_run_refuses_an_inconsistent_enrollment(
    capsys: pytest.CaptureFixture[str],
    collector: MiniCollector,
    state: Path,
    other_authority: pki.Pki,
    damage: str,
) -> None:
    assert enroll(capsys, collector, state)[0] == 0
    paths = StatePaths.of(state)
    if damage == "agent id":
        record = json.loads(paths.enrollment.read_text(encoding="utf-8"))
        record["agent_id"] = "0" * 32
        paths.enrollment.write_text(json.dumps(record), encoding="utf-8")
        expected = "names '00000000000000000000000000000000'"
    elif damage == "key mode":
        paths.key.chmod(0o644)
        expected = "readable by others (mode 0644)"
    elif damage == "other key":
        enroll_keys.create_key(paths.key, overwrite=True)
        expected = "agent.key is not the key of"
    elif damage == "other ca":
        paths.ca.write_bytes(other_authority.ca_cert_pem)
        expected = "was not issued by the CA in"
    else:
        paths.enrollment.unlink()
        expected = "enrollment.json does not"
    with pytest.raises(CredentialsError, match=re.escape(expected)):
        load_credentials(state)
    code, _, err = agent_cli(capsys, "run", "--state-dir", str(state))
    assert expected in one_line_error(code, err)


def test_the_running_agent_never_imports_cryptography(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    """cryptography's OpenSSL bindings cost ~9 MB of RSS: loading the identity and building the
    agent must not pull them in."""
    assert enroll(capsys, collector, state)[0] == 0
    probe = (
        "import sys; from pathlib import Path\n"
        "from agent import cli\n"
        "from agent.runner import Agent\n"
        f"config = cli._config(cli.build_parser().parse_args(['run', '--state-dir', {str(state)!r}]))\n"
        "agent = Agent(config, credentials=cli._credentials(config))\n"
        "agent.transport._open_channel()\n"
        "agent._health()\n"
        "print(agent.agent_id, sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert result.stdout.split() == [load_credentials(state).agent_id, "[]"]


# --- status -----------------------------------------------------------------------------------


def test_status_shows_enrollment_identity_and_expiry(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    assert enroll(capsys, collector, state)[0] == 0
    credentials = load_credentials(state)
    code, out, err = agent_cli(capsys, "status", "--state-dir", str(state))
    assert code == 0, err
    assert out.splitlines()[0].startswith("enrolled        yes, ")
    assert f"agent id        {credentials.agent_id}" in out
    assert f"collector       {collector.target}" in out
    assert "labels          department=市公安局 county=高新区 site=主机房 role=server" in out
    assert "certificate     on: expires in 89 d" in out or "certificate     on: expires in 90 d" in out
    assert "spooled         nothing yet" in out


def test_status_says_when_the_certificate_has_expired(
    capsys: pytest.CaptureFixture[str], collector: MiniCollector, state: Path
) -> None:
    collector.issue_age = timedelta(days=100)  # a 90-day certificate issued 100 days ago
    assert enroll(capsys, collector, state)[0] == 0
    code, out, _ = agent_cli(capsys, "status", "--state-dir", str(state))
    assert code == 1
    assert "certificate     expired " in out
    assert "(10 d ago)" in out or "(9 d ago)" in out
    assert "enroll again with `zonewatch-agent enroll --force`" in out


def test_status_of_an_agent_that_ran_insecure(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    state.mkdir()
    (state / "agent_id").write_text("lab-agent-0001\n", encoding="utf-8")
    Spool(state / "spool.db").close()
    code, out, _ = agent_cli(capsys, "status", "--state-dir", str(state), "--insecure")
    assert code == 0
    assert "enrolled        insecure mode" in out and "agent id        lab-agent-0001" in out
    code, out, _ = agent_cli(capsys, "status", "--state-dir", str(state))
    assert code == 1
    assert "enrolled        no: not enrolled" in out
    assert "lab-agent-0001 (the random id of an earlier insecure run)" in out


def test_the_token_can_come_from_a_file_or_the_environment_not_the_process_list(
    capsys: pytest.CaptureFixture[str],
    collector: MiniCollector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = (
        "enroll", "--collector", collector.target, "--enroll-port", str(collector.enroll_port),
        "--ca-fingerprint", pki.fingerprint(collector.authority.ca_cert, prefixed=True),
        "--hostname", "ga-ws-01", "--timeout", "5",
    )  # fmt: skip
    monkeypatch.delenv("ZONEWATCH_TOKEN", raising=False)
    code, _, err = agent_cli(capsys, *common, "--state-dir", str(tmp_path / "none"))
    assert "no enrollment token: pass --token, --token-file FILE or set ZONEWATCH_TOKEN" in one_line_error(
        code, err
    )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    code, _, err = agent_cli(
        capsys, *common, "--token-file", str(token_file), "--state-dir", str(tmp_path / "a")
    )
    assert code == 0, err
    collector.tokens.add("zwt_" + "e" * 43)
    monkeypatch.setenv("ZONEWATCH_TOKEN", "zwt_" + "e" * 43)
    code, _, err = agent_cli(capsys, *common, "--state-dir", str(tmp_path / "b"))
    assert code == 0, err
    assert [r.token for r in collector.enroll_requests] == [TOKEN, "zwt_" + "e" * 43]

"""Structured logs (agent/logfmt.py): one event per line on stderr, JSON or text, journald priorities,
and no secret in any line: the real `serve` and `zonewatch-agent enroll`, and the formatter itself."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Collector, run_cli

from agent import logfmt

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----\n"
)


def events(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` is one JSON object with the four fields every event has."""
    parsed = []
    for line in text.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert TS.match(str(event["ts"])) and event["level"] in (
            "debug",
            "info",
            "warning",
            "error",
            "critical",
        )
        assert isinstance(event["logger"], str) and isinstance(event["msg"], str)
        parsed.append(event)
    return parsed


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """logfmt's handler on a StringIO; the process's logging is put back afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield stream
    for handler in [h for h in root.handlers if h.get_name() == "zonewatch"]:
        root.removeHandler(handler)
    root.setLevel(level)
    logfmt._secrets.clear()
    logfmt._in_force = "text"


def test_json_events_are_one_line_each_with_extras_and_tracebacks(captured: io.StringIO) -> None:
    assert logfmt.configure("json", stream=captured) == "json"
    log = logging.getLogger("collector.test")
    log.info("agent %s from %s", "web-01", "市公安局", extra={"county": "高新区", "facts": 3})
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        log.exception("commit failed")
    log.debug("not shown without --verbose")
    first, second = events(captured.getvalue())
    assert first["msg"] == "agent web-01 from 市公安局" and first["level"] == "info"
    assert (first["logger"], first["county"], first["facts"]) == ("collector.test", "高新区", 3)
    assert "市公安局" in captured.getvalue()  # ensure_ascii=False: readable, not \\u escapes
    assert second["level"] == "error" and "ValueError: line one\nline two" in str(second["exc"])
    assert len(captured.getvalue().splitlines()) == 2


def test_no_secret_reaches_a_line(captured: io.StringIO) -> None:
    logfmt.configure("json", stream=captured)
    logfmt.register_secret("s3cret-passphrase")
    token = "zwt_" + "Q" * 43
    log = logging.getLogger("agent.test")
    log.warning("enrolling with %s, key %s", token, PEM)
    log.info("config", extra={"password": "s3cret-passphrase", "keys": [PEM], "token": token})
    try:
        raise RuntimeError(f"cannot parse {PEM!r} for {token}")
    except RuntimeError:
        log.exception("failed")
    logfmt.report_error("zonewatch-agent", f"refused {token}")
    text = captured.getvalue()
    assert len(events(text)) == 4
    for secret in (token, "PRIVATE KEY", "MIGHAgEAMBMG", "s3cret-passphrase"):
        assert secret not in text
    assert "zwt_[redacted]" in text and "[redacted key]" in text


def test_a_malformed_log_call_is_logged_as_is_not_raised_into_the_caller(captured: io.StringIO) -> None:
    logfmt.configure("json", stream=captured)
    token = "zwt_" + "Q" * 43
    (handler,) = [h for h in logging.getLogger().handlers if h.get_name() == "zonewatch"]
    # Straight to our handler (pytest's own capture handler would raise first): one argument short.
    handler.handle(
        logging.LogRecord("agent.test", logging.WARNING, __file__, 1, "two %s and %d", (token,), None)
    )
    (event,) = events(captured.getvalue())
    assert "two %s and %d" in str(event["msg"]) and token not in captured.getvalue()


def test_text_on_a_terminal_json_elsewhere_and_journald_priorities(tmp_path: Path) -> None:
    controller, terminal_fd = os.openpty()
    with os.fdopen(terminal_fd, "w") as terminal, (tmp_path / "stderr").open("w") as file:
        assert logfmt.choose("auto", None, terminal) == "text"
        assert logfmt.choose("auto", None, file) == "json"
        assert logfmt.choose("auto", "1:2", terminal) == "json"  # journald took stderr
        assert logfmt.choose("text", "1:2", file) == "text"
        st = os.fstat(file.fileno())
        assert logfmt.under_journald(f"{st.st_dev}:{st.st_ino}", file)
        assert not logfmt.under_journald(f"{st.st_dev}:{st.st_ino + 1}", file)  # stderr redirected since
    os.close(controller)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert logfmt.JsonFormatter(journald=True).format(record).startswith('<4>{"ts": ')
    assert [line[:3] for line in logfmt.TextFormatter(journald=True).format(record).split("\n")] == [
        "<4>"
    ] * 2
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [logfmt.priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_serve_under_journald_prefixes_each_event_with_its_priority(tmp_path: Path) -> None:
    stderr = tmp_path / "journal"
    with stderr.open("w") as file:
        st = os.fstat(file.fileno())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = subprocess.run(
            [sys.executable, "-m", "collector.cli", "serve", "--db", str(tmp_path / "c.db")],
            stdout=subprocess.DEVNULL, stderr=file, env=env, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2  # no PKI yet: the error is an event too, at priority 3 (err)
    (line,) = stderr.read_text(encoding="utf-8").splitlines()
    assert line.startswith("<3>{")
    (event,) = events(line[3:])
    assert "zonewatch-collector init" in str(event["msg"]) and event["exit_status"] == 2


def test_enroll_and_serve_never_log_the_token_or_a_key(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    fingerprint = run_cli("zonewatch-collector", "init", "--db", str(db)).stdout.split("CA fingerprint")[1]
    fingerprint = fingerprint.split()[0]
    created = run_cli("zonewatch-collector", "tokens", "create", "--db", str(db), "--county", "高新区").stdout
    good = created.split(": ", 1)[1].split()[0]
    bad = "zwt_" + "b" * 43
    assert good.startswith("zwt_") and len(good) > 40
    collector = Collector(db, 0, tls=True)
    try:

        def enroll(token: str, state: str) -> subprocess.CompletedProcess[str]:
            return run_cli(
                "zonewatch-agent", "enroll", "--collector", collector.target, "--enroll-port",
                str(collector.enroll_port), "--token", token, "--ca-fingerprint", fingerprint, "--state-dir",
                str(tmp_path / state), "--hostname", "ga-ws-01", "--timeout", "10", "-v", check=False,
            )  # fmt: skip

        refused = enroll(bad, "refused")
        enrolled = enroll(good, "enrolled")
        collector.wait_for_line(re.compile(r"enrolled agent [0-9a-f]+ \(ga-ws-01\)"))
    finally:
        collector.stop()
    assert refused.returncode == 2, refused.stderr
    assert enrolled.returncode == 0, enrolled.stderr
    (last,) = events(refused.stderr)[-1:]
    assert last["level"] == "error" and "refused the token" in str(last["msg"])
    events(enrolled.stderr)
    served = events("\n".join(collector.lines))
    assert any(e["msg"].startswith("collector listening on") for e in served)  # type: ignore[union-attr]
    key = (tmp_path / "enrolled" / "tls" / "agent.key").read_text(encoding="ascii")
    body = key.splitlines()[1]
    everything = "\n".join([refused.stderr, enrolled.stderr, *collector.lines])
    for secret in (good, bad, "PRIVATE KEY", body):
        assert secret not in everything


CHILD = (
    """
import logging, multiprocessing
from agent import logfmt

def child(settings):
    logfmt.configure(**settings)  # what the collector's writer process does first (store/process.py)
    try:
        raise ValueError("a\\nb zwt_"""
    + "c" * 43
    + """")
    except ValueError:
        logging.getLogger("collector.store.process").exception("detection failed")

if __name__ == "__main__":
    logfmt.configure("auto")
    process = multiprocessing.get_context("spawn").Process(target=child, args=(logfmt.current(),))
    process.start()
    process.join()
"""
)


def test_a_child_process_logs_like_its_parent(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    (event,) = events(done.stderr)
    assert event["logger"] == "collector.store.process" and "ValueError: a\nb zwt_[redacted]" in str(
        event["exc"]
    )

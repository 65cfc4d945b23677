"""Shared fixtures: real collectors and agents as subprocesses, talking over loopback."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.sensors.interfaces import InterfaceSample
from agent.wire import REPORT_METHOD, batch_request, hello_request, parse_response
from protos.zonewatch.v1 import agent_pb2

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"collector listening on [\d.]+:(\d+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A zonewatch program in a subprocess; its stderr is collected for failure messages."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if m := pattern.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{pattern.pattern!r} not seen from {self.args}:\n" + self.log())
                self._seen.wait(min(left, 0.2))

    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"{self.args} did not stop on signal {sig}:\n{self.log()}") from None


ENROLLING = re.compile(r"enrollment on [\d.]+:(\d+)")


class Collector(Process):
    """A collector in a subprocess on 127.0.0.1. Plaintext (--insecure) unless ``tls``: then it
    serves mTLS with the PKI it finds beside ``db`` (``zonewatch-collector init`` it first)."""

    def __init__(self, db: Path, port: int = 0, *extra: str, tls: bool = False) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "collector.cli",
                "serve",
                "--db",
                str(db),
                "--listen",
                f"127.0.0.1:{port}",
                "--sample-interval",
                "1",
                "--interface",
                "lo",
                *([] if tls else ["--insecure"]),
                *extra,
            ]
        )
        self.db = db
        self.port = int(self.wait_for_line(LISTENING).group(1))
        self.enroll_port = int(self.wait_for_line(ENROLLING).group(1)) if tls else 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def run_cli(program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    module = {"zonewatch-collector": "collector.cli", "zonewatch-agent": "agent.cli"}[program]
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{program} {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def cli_json(program: str, *args: str) -> list[dict[str, object]]:
    return json.loads(run_cli(program, *args, "--format", "json").stdout)  # type: ignore[no-any-return]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_NETNS_TESTS] = {item.nodeid for item in items if item.get_closest_marker("netns")}


_NETNS_TESTS = pytest.StashKey[set[str]]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (root, packages installed by .ci/run) a skipped test-network test means something is broken."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    netns = session.config.stash.get(_NETNS_TESTS, set())
    skipped = [r.nodeid for r in (reporter.stats.get("skipped", []) if reporter else []) if r.nodeid in netns]
    if skipped:
        print(f"\nCI: {len(skipped)} test-network test(s) skipped; they must run in CI:", file=sys.stderr)
        for nodeid in skipped:
            print(f"  {nodeid}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where a store test's collector database lives (a module may define its own ``path``)."""
    return tmp_path / "collector.db"


@pytest.fixture
def db(path: Path) -> Iterator[sqlite3.Connection]:
    """The writer's connection to a fresh, migrated database at ``path``."""
    from collector.store.database import open_database

    con = open_database(path)
    yield con
    con.close()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(tmp_path / "collector.db")
    yield c
    c.stop()


def start_agent(collector_target: str, state_dir: Path, *extra: str) -> Process:
    return Process(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--insecure",  # beside the plaintext Collector above
            "--collector",
            collector_target,
            "--state-dir",
            str(state_dir),
            "--interval",
            "1",
            "--interface",
            "lo",
            "--department",
            "市公安局",
            "--county",
            "高新区",
            "--site",
            "主机房",
            "--role",
            "server",
            "--hostname",
            "web-01",
            *extra,
        ]
    )


# --- a raw Report stream, for tests that speak the protocol byte by byte --------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sample(**changes: Any) -> InterfaceSample:
    base = InterfaceSample(
        "eth0", 1000, 2000, 10, 20, 0, 0, 0, 0, 10_000, 800.0, 1600.0, 1_000_000_000, 1.6e-6, False
    )
    return base._replace(**changes)


class Stream:
    """A raw Report stream, one request answered by one response."""

    def __init__(
        self, target: str, agent_id: str, hello: bytes | None = None, channel: grpc.Channel | None = None
    ) -> None:
        self.agent_id = agent_id
        self.channel = channel or grpc.insecure_channel(target)
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        method = self.channel.stream_stream(
            REPORT_METHOD, request_serializer=None, response_deserializer=parse_response
        )
        self.responses = method(iter(self.requests.get, None), timeout=30)
        if hello is None:
            hello = hello_request(
                agent_id, "host-" + agent_id, "test", {"department": "市教育局"}, "", now_ms()
            )
            hello = hello.SerializeToString()
        self.welcome = self.send(hello)

    def send(self, data: bytes) -> agent_pb2.ReportResponse:
        self.requests.put(data)
        return next(self.responses)

    def batch(
        self, seq: int, *samples: InterfaceSample, sent_ms: int | None = None
    ) -> agent_pb2.ReportResponse:
        t = sent_ms if sent_ms is not None else now_ms()
        return self.send(batch_request(seq, t, t, list(samples) or [sample()]).SerializeToString())

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


# --- reports: their embedded figures, and a real browser -------------------------------------------


def embedded(html: str) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="zonewatch-report-data">(.*?)</script>', html, re.S
    )
    assert match, "no JSON data block"
    document: dict[str, Any] = json.loads(match.group(1))
    return document


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium, its whole process group ended if it outlives the timeout."""
    proc = subprocess.Popen(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            f"--user-data-dir={profile}",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("chromium did not finish in 90 s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def render_in_chromium(html: Path, workdir: Path) -> tuple[Path, Path]:
    """Render a report to a PNG screenshot and to PDF; fails on a browser or console error."""
    png, pdf = workdir / f"{html.stem}.png", workdir / f"{html.stem}.pdf"
    shot = chromium(f"--screenshot={png}", "--window-size=1240,1754", html.as_uri(), profile=workdir / "p1")
    printed = chromium(
        f"--print-to-pdf={pdf}", "--no-pdf-header-footer", html.as_uri(), profile=workdir / "p2"
    )
    for result in (shot, printed):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Uncaught" not in result.stderr and "ERROR:CONSOLE" not in result.stderr, result.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    return png, pdf

"""The agent executable keeps OpenSSL's Python bindings out of `run` (their libraries cost RSS) and
still runs; other commands are untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def test_run_maps_no_libssl_or_libcrypto_and_still_reports(tmp_path: Path) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--insecure", "--collector", "127.0.0.1:9",
         "--state-dir", str(tmp_path), "--interval", "0.5", "--interface", "lo"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (tmp_path / "spool.db").exists():
            time.sleep(0.1)
        time.sleep(1.5)  # a few ticks: the sampling loop, the transport retrying, the policy loop
        assert agent.poll() is None, agent.communicate()[1]
        libraries = {line.split()[-1] for line in Path(f"/proc/{agent.pid}/maps").read_text().splitlines()}
        assert not [lib for lib in libraries if "/libssl.so" in lib or "/libcrypto.so" in lib]
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, err
    status = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--insecure", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, env=env(), timeout=60, check=True,
    )  # fmt: skip
    (spooled,) = [line for line in status.stdout.splitlines() if line.startswith("spooled")]
    assert int(spooled.split()[1]) >= 2, status.stdout  # it sampled and spooled while running


def test_other_commands_keep_ssl(tmp_path: Path) -> None:
    probe = (
        "import contextlib, io, sys\n"
        "from agent.entry import main\n"
        "sys.argv = ['zonewatch-agent', 'status', '--help']\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main()\n"
        "import ssl\n"
        "print(ssl.OPENSSL_VERSION)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=60, check=True
    )
    assert "OpenSSL" in done.stdout

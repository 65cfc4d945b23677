"""Ctrl-C at a terminal: SIGINT to the collector's whole process group, its writer child included."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import LISTENING, ROOT, Stream, _env


def test_ctrl_c_stops_the_collector_cleanly_with_what_it_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "serve", "--db", str(db), "--listen", "127.0.0.1:0",
         "--insecure", "--log-format", "text"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
        start_new_session=True,  # a group of its own, as a terminal's foreground job has
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if match := LISTENING.search(line):
                break
        else:
            raise AssertionError("".join(lines))
        stream = Stream(f"127.0.0.1:{match.group(1)}", "ctrl-c-01")
        assert stream.batch(1).ack.acked_seq == 1
        stream.close()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    err = "".join(lines) + rest
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM batches WHERE status = 'stored'").fetchone() == (1,)
    finally:
        con.close()

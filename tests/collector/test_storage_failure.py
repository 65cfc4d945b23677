"""Storage failing under a running collector: streams end at once with UNAVAILABLE, nothing is acked,
and once storage works again the collector resumes by itself."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from conftest import Collector, Stream


def test_storage_failure_ends_the_stream_with_unavailable(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector.db")
    try:
        stream = Stream(collector.target, "disk-01")
        assert stream.batch(1).ack.acked_seq == 1
        # The samples table taken away: every commit from now on fails.
        saboteur = sqlite3.connect(collector.db, isolation_level=None)
        saboteur.execute("ALTER TABLE interface_samples RENAME TO interface_samples_away")
        saboteur.close()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream.batch(2)
        # At once, not after the agent's 30 s ack timeout.
        assert time.monotonic() - started < 5
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "storage" in (info.value.details() or "")
        stream.close()
        # New streams are refused the same way while storage fails ...
        with pytest.raises(grpc.RpcError) as again:
            Stream(collector.target, "disk-01")
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        con = sqlite3.connect(collector.db)
        (stored,) = con.execute("SELECT count(*) FROM batches WHERE status = 'stored'").fetchone()
        assert stored == 1, "batch 2 must not be recorded as stored"
        # ... and once it works again (space freed, the table back), the agent's retry is stored
        # without a restart.
        con.execute("ALTER TABLE interface_samples_away RENAME TO interface_samples")
        con.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                retry = Stream(collector.target, "disk-01")
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)
        assert retry.welcome.welcome.acked_seq == 1 and retry.batch(2).ack.acked_seq == 2
        retry.close()
    finally:
        collector.stop()
    con = sqlite3.connect(collector.db)
    (stored,) = con.execute("SELECT count(*) FROM batches WHERE status = 'stored'").fetchone()
    con.close()
    assert stored == 2
